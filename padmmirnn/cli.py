"""The ``padmmirnn`` command line: the only module that parses argv.

    padmmirnn train [--config FILE.toml] [--set key=value ...] [--dataset NAME|PATH]
                    [--algo admm|sgd|adam|...] [--iterations N] [--parallel ...] [--out DIR]
                    [--checkpoint-every N] [--resume latest|PATH] [--max-walltime S]
    padmmirnn compare --algos admm,adam,... [--budget-seconds S] [train options] --out DIR
    padmmirnn data prepare adding|idx|imdb|csv|text --out NAME_train.h5 [--source PATH] ...
    padmmirnn data fetch mnist|fashion-mnist|imdb --to DIR [--base-url URL]
    padmmirnn data inspect FILE...  |  padmmirnn data list
    padmmirnn evaluate --weights FILE | --checkpoint FILE [--dataset NAME|PATH]
    padmmirnn checkpoint inspect FILE
    padmmirnn config options [--markdown]
    padmmirnn scaling plan|run|report ...
    padmmirnn --version

A user error (bad config, bad data) prints one line ``padmmirnn: error: ...`` and
exits 2 on every rank; any other exception prints the rank's traceback and, under
MPI, aborts the whole job so no rank is left waiting in a collective.
"""

from __future__ import annotations

import argparse
import json
import sys

from padmmirnn._version import __version__
from padmmirnn.errors import PadmmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="padmmirnn", description="Train recurrent neural networks with ADMM over MPI.")
    parser.add_argument("--version", action="version", version=f"padmmirnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    _training_parsers(sub)
    _config_parser(sub)
    _data_parser(sub)
    _scaling_parser(sub)
    _model_tools_parsers(sub)
    return parser


def _training_parsers(sub) -> None:
    """``train`` and ``compare``, which share the run options."""
    run = argparse.ArgumentParser(add_help=False)  # options train and compare share
    run.add_argument("--config", help="TOML configuration file or packaged preset name")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override one config value (repeatable; see padmmirnn config "
                          "options)")
    run.add_argument("--dataset", help="built-in name or path of a dataset .h5 file")
    run.add_argument("--iterations", type=int,
                     help="ADMM iterations / gradient epochs (of each run)")
    run.add_argument("--seed", type=int, help="random seed")
    run.add_argument("--parallel", help="auto (default: sync under MPI), none, sync or async")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    train = sub.add_parser("train", parents=[run], help="train a model")
    train.add_argument("--algo", help="training algorithm (admm)")
    train.add_argument("--staleness", type=int, metavar="TAU",
                       help="async: how many iterations a worker may run ahead (default 1)")
    train.add_argument("--staleness-kind", choices=("iterations", "publishes"),
                       help="async: bound the iteration gap (default) or the delay in "
                            "publishes (fast ranks do more iterations)")
    train.add_argument("--straggler", metavar="RANK:FACTOR",
                       help="slow one rank's compute by FACTOR (experiments)")
    train.add_argument("--out", help="output folder (default runs/ALGO-TIMESTAMP)")
    train.add_argument("--checkpoint-every", type=int, metavar="N",
                       help="write a checkpoint every N iterations")
    train.add_argument("--checkpoint-dir", help="checkpoint folder (default OUT/checkpoints)")
    train.add_argument("--keep-checkpoints", type=int, metavar="K", help="keep the newest K")
    train.add_argument("--resume", metavar="latest|PATH|none",
                       help="resume from the newest valid checkpoint or a given file")
    train.add_argument("--force", action="store_true", default=None,
                       help="resume even if the checkpoint's configuration differs")
    train.add_argument("--max-walltime", type=float, metavar="SECONDS",
                       help="checkpoint and exit 0 once this job has run this long")

    cmp_ = sub.add_parser("compare", parents=[run],
                          help="train several algorithms on the same data and clock")
    cmp_.add_argument("--algos", required=True, help="comma-separated, e.g. admm,adam,sgd")
    cmp_.add_argument("--budget-seconds", type=float, help="wall-clock budget of each run")
    cmp_.add_argument("--out", required=True, help="output folder")
    cmp_.add_argument("--thresholds", default="0.5,0.8", metavar="A1,A2,...",
                      help="test accuracies to report the time, iterations, synchronisations "
                           "and bytes to reach (default 0.5,0.8)")
    cmp_.add_argument("--loss-thresholds", default="", metavar="L1,L2,...",
                      help="test losses (at most) to report the same for, e.g. nats per "
                           "character of a language model")
    cmp_.add_argument("--no-plots", action="store_true", help="skip the PNG plots")



def _config_parser(sub) -> None:
    """``config options``."""
    conf = sub.add_parser("config", help="configuration tools")
    csub = conf.add_subparsers(dest="config_command", required=True)
    copts = csub.add_parser("options", help="every option: default, allowed values, meaning")
    copts.add_argument("--markdown", action="store_true", help="as the table of "
                       "docs/options.md")



def _data_parser(sub) -> None:
    """``data prepare|fetch|inspect|list``."""
    data = sub.add_parser("data", help="dataset tools: prepare, fetch, inspect, list")
    dsub = data.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="convert a dataset to padmmirnn's HDF5 format",
                           description="Convert a dataset to padmmirnn's HDF5 format. "
                           "--out NAME_train.h5 also writes NAME_test.h5 when there is a "
                           "test split. See data/README.md.")
    prep.add_argument("kind", choices=("adding", "idx", "imdb", "csv", "text"),
                      help="adding: synthetic adding problem; idx: MNIST/Fashion-MNIST IDX "
                      "folder; imdb: aclImdb folder; csv: text + label columns; text: plain "
                      "text for language modelling")
    prep.add_argument("--source", help="input folder (idx, imdb) or file (csv, text)")
    prep.add_argument("--out", required=True, help="output .h5 (NAME_train.h5: the test "
                      "split goes to NAME_test.h5)")
    prep.add_argument("--steps", type=int, help="sequence length T (adding 100, text 100; "
                      "imdb/csv: the 99th percentile of the training texts' token counts)")
    prep.add_argument("--samples", type=int, help="adding: training sequences (4000); "
                      "others: keep at most the first N training sequences")
    prep.add_argument("--test-samples", type=int, help="adding: test sequences (1000); "
                      "others: keep at most the first N test sequences")
    prep.add_argument("--classes", type=int, help="adding: bins of the sum (10); idx: labels "
                      "lie in [0, K) (10); csv: labels are the integers 0..K-1")
    prep.add_argument("--seed", type=int, default=0, help="generator / shuffle seed")
    prep.add_argument("--pixels", action="store_true",
                      help="idx: one pixel per step ([N, rows*cols, 1]) instead of rows")
    prep.add_argument("--level", choices=("char", "word"),
                      help="tokens: characters or words (imdb/csv: word, text: char)")
    prep.add_argument("--vocab-size", type=int, metavar="N", help="keep the N-2 most "
                      "frequent tokens plus <pad> and <unk> (default: all)")
    prep.add_argument("--padding", choices=("pre", "post"),
                      help="imdb/csv: post (default): real tokens first, then <pad>, with "
                      "the lengths written; pre: pads first, the text ends at T, no lengths")
    prep.add_argument("--truncating", choices=("pre", "post"), default="pre",
                      help="cut long texts at the start (pre, default: keep the end) or end")
    prep.add_argument("--text-column", default="text", help="csv: name or 0-based index")
    prep.add_argument("--label-column", default="label", help="csv: name or 0-based index")
    prep.add_argument("--labels", metavar="A,B,...", help="csv: keep only these labels, "
                      "class ids in this order (default: all labels, sorted)")
    prep.add_argument("--delimiter", default=",", help="csv field delimiter")
    prep.add_argument("--no-header", action="store_true", help="csv: no header row")
    prep.add_argument("--test-fraction", type=float, default=0.0, metavar="F",
                      help="csv: hold out this share of the (shuffled) rows; text: the last "
                      "share of the corpus, as NAME_test.h5")
    prep.add_argument("--license", help="licence recorded in the file (csv, text)")
    prep.add_argument("--attribution", help="source description recorded in the file")
    fetch = dsub.add_parser("fetch", help="download a public dataset (checksums verified)")
    fetch.add_argument("name", choices=("mnist", "fashion-mnist", "imdb"))
    fetch.add_argument("--to", required=True, help="destination folder")
    fetch.add_argument("--base-url", help="download from this URL instead of the public "
                       "location (also: env PADMMIRNN_DATA_URL)")
    insp = dsub.add_parser("inspect", help="shapes, classes, balance, vocabulary, source")
    insp.add_argument("files", nargs="+", metavar="FILE")
    dsub.add_parser("list", help="built-in dataset names")



def _scaling_parser(sub) -> None:
    """``scaling plan|run|report``."""
    scal = sub.add_parser("scaling", help="strong/weak scaling studies: Slurm scripts, local "
                          "runs, CSV report, model and plots")
    ssub = scal.add_subparsers(dest="scaling_command", required=True)
    splan = ssub.add_parser("plan", help="write one sbatch script per point, the datasets and "
                            "a manifest", description="Write DIR/{kind}-{P}r-{M}n.sbatch for "
                            "each rank count, the datasets the points need (weak: N = n * P "
                            "samples; taken from --dataset, repeated cyclically if it is "
                            "smaller) and DIR/manifest.json. See slurm/README.md.")
    splan.add_argument("--kind", required=True, choices=("strong", "weak", "accuracy"),
                       help="strong or weak scaling of an iteration; accuracy: runs to "
                       "--target for the time-to-accuracy projection of the report")
    splan.add_argument("--ranks", metavar="P1,P2,...", help="rank counts (strong, weak)")
    splan.add_argument("--nodes", metavar="M1,M2,...",
                       help="nodes of each point, or one value for all (default 1)")
    ssize = splan.add_mutually_exclusive_group()
    ssize.add_argument("--samples", type=int, metavar="N",
                       help="strong: total training samples (default: the whole dataset)")
    ssize.add_argument("--samples-per-rank", type=int, metavar="n",
                       help="weak: training samples per rank")
    splan.add_argument("--dataset", default="default",
                       help="source of the samples: built-in name or _train.h5 path")
    splan.add_argument("--algo", default="admm", help="training algorithm (admm)")
    splan.add_argument("--parallel", dest="study_parallel", choices=("sync", "async"),
                       default="sync", help="mode of the multi-rank points (1 rank: none)")
    splan.add_argument("--iterations", type=int, default=20, help="iterations per point")
    splan.add_argument("--threads", type=int, default=1,
                       help="threads per rank (--cpus-per-task; default 1)")
    splan.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="config override for every point (repeatable)")
    splan.add_argument("--time", default="00:30:00", help="walltime of each job")
    splan.add_argument("--signal-seconds", type=int, default=120,
                       help="SIGUSR1 (checkpoint and exit) this long before the walltime")
    splan.add_argument("--partition", help="Slurm partition")
    splan.add_argument("--account", help="Slurm account")
    splan.add_argument("--overcommit", action="store_true",
                       help="allow more ranks than CPUs (e.g. 4 ranks on a 2-core node)")
    splan.add_argument("--launcher", choices=("srun", "mpiexec"), default="srun",
                       help="how the jobs start the ranks (default srun --mpi=pmi2)")
    splan.add_argument("--slurm-dir", metavar="DIR", help="folder with train.sbatch and "
                       "scaling-point.sbatch.in (default: slurm/ of the source tree)")
    splan.add_argument("--out", required=True, help="study folder")
    sacc = splan.add_argument_group("--kind accuracy")
    sacc.add_argument("--target", type=float, default=0.85, help="test accuracy to reach")
    sacc.add_argument("--admm-batches", default="16,32,64,128,256,1024,0", metavar="B1,...",
                      help="ADMM global batches, one process each, at the batch rule's "
                      "settings (0: the whole dataset)")
    sacc.add_argument("--adam-batches", default="64,128,256,1024,0", metavar="B1,...",
                      help="Adam global batches, one process each (0: the whole dataset)")
    sacc.add_argument("--adam-lr-scaling", default="sqrt", choices=("none", "sqrt", "linear"),
                      help="Adam's learning rate against its batch (default sqrt)")
    sacc.add_argument("--validate-latency-us", default="0,5000", metavar="A1,...",
                      help="2-rank check points over these simulated latencies")
    sacc.add_argument("--max-units", type=int, default=200,
                      help="passes or epochs at most per point")
    srun_ = ssub.add_parser("run", help="run a study's points here with mpiexec, one by one")
    srun_.add_argument("dir", help="study folder written by scaling plan")
    srun_.add_argument("--points", metavar="NAME,...", help="only these points")
    srun_.add_argument("--mpiexec", help="mpiexec to use (default: beside python, or PATH)")
    srun_.add_argument("--timeout", type=float, default=900.0,
                       help="seconds per point before it is killed (default 900)")
    srep = ssub.add_parser("report", help="scaling.csv, fitted model, projection, PNG plots")
    srep.add_argument("dir", help="study folder")
    srep.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    srep.add_argument("--ranks-per-node", type=int,
                      help="ranks per node of the projection (default: as measured)")
    srep.add_argument("--project-nodes", type=int, default=64,
                      help="project up to this many nodes (default 64)")
    srep.add_argument("--latency-us", type=float,
                      help="use this reduction latency per stage instead of the fitted one")
    srep.add_argument("--bandwidth-gbs", type=float,
                      help="use this reduction bandwidth (GB/s) instead of the fitted one")
    srep.add_argument("--fabrics", default="2:100,50:10,5000:1", metavar="US:GBIT,...",
                      help="accuracy points: project on these fabrics (latency in us : "
                      "bandwidth in Gbit/s)")



def _model_tools_parsers(sub) -> None:
    """``checkpoint inspect``, ``evaluate``, ``predict``, ``generate`` and ``export``."""
    ck = sub.add_parser("checkpoint", help="checkpoint tools")
    cksub = ck.add_subparsers(dest="checkpoint_command", required=True)
    inspect = cksub.add_parser("inspect", help="print what a checkpoint holds")
    inspect.add_argument("path")

    ev = sub.add_parser("evaluate", help="evaluate weights or a checkpoint on a dataset")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="weights.h5 written by train")
    src.add_argument("--checkpoint", help="a checkpoint file (its weights are evaluated)")
    ev.add_argument("--dataset", help="built-in name or dataset .h5 path (default: the "
                    "checkpoint's dataset, else the built-in default)")
    ev.add_argument("--split", choices=("test", "train"), default="test",
                    help="which split of a built-in dataset (default test)")

    pr = sub.add_parser("predict", help="predict the classes of new inputs")
    pr.add_argument("--weights", required=True, help="weights.h5 or a checkpoint")
    pr.add_argument("--input", required=True, help="an HDF5 split, a CSV file with a "
                    "text column, or a text file with one sequence per line")
    pr.add_argument("--column", default="text", help="the CSV's text column (default text)")
    pr.add_argument("--out", required=True, help="CSV: one row per sample, the predicted "
                    "class name and every class's probability")

    ge = sub.add_parser("generate", help="sample text from a language model")
    ge.add_argument("--weights", required=True, help="weights.h5 or a checkpoint")
    ge.add_argument("--prompt", default="", help="text to start from")
    ge.add_argument("--length", type=int, default=200, help="tokens to sample (default 200)")
    ge.add_argument("--temperature", type=float, default=1.0,
                    help="softmax temperature; 0 is greedy decoding (default 1)")
    ge.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    ex = sub.add_parser("export", help="export weights to ONNX or PyTorch (safetensors)")
    ex.add_argument("--weights", required=True, help="weights.h5 or a checkpoint")
    ex.add_argument("--format", required=True, choices=("onnx", "torch"))
    ex.add_argument("--out", required=True, help="the file to write")
    ex.add_argument("--lengths", action="store_true",
                    help="onnx: a second input 'lengths' (int32 [N]), every recurrent "
                         "operator's sequence_lens (padded sequences)")


FLAG_KEYS = {"dataset": "data.dataset", "algo": "train.algo", "iterations": "train.iterations",
             "seed": "train.seed", "parallel": "train.parallel", "out": "output.dir",
             "budget_seconds": "train.budget_seconds", "checkpoint_every": "checkpoint.every",
             "checkpoint_dir": "checkpoint.dir", "keep_checkpoints": "checkpoint.keep",
             "resume": "checkpoint.resume", "force": "checkpoint.force",
             "max_walltime": "checkpoint.max_walltime", "staleness": "train.staleness",
             "staleness_kind": "train.staleness_kind",
             "straggler": "train.straggler"}


def _config(args):
    """The run configuration: file, then --set, then the explicit flags."""
    from padmmirnn.config import load_config, parse_override

    overrides = dict(parse_override(s) for s in args.set)
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return load_config(args.config, overrides)


def _train(args, comm, cfg) -> int:
    from padmmirnn.training import run_training

    run_training(cfg, comm)
    return 0


def _compare(args, comm, cfg) -> int:
    from pathlib import Path

    from padmmirnn.compare import run_compare

    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    if not algos or len(set(algos)) != len(algos):
        raise PadmmError(f"--algos needs distinct algorithm names, got {args.algos!r}")
    out = Path(args.out)
    run_compare(cfg, algos, out, comm, plots=not args.no_plots,
                thresholds=_floats(args.thresholds, "--thresholds"),
                loss_thresholds=_floats(args.loss_thresholds, "--loss-thresholds"))
    return 0


def _floats(text: str, flag: str) -> tuple[float, ...]:
    """A comma-separated list of numbers (empty: none)."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise PadmmError(f"{flag} needs comma-separated numbers, got {text!r}") from None


def _data(args, comm) -> int:
    if comm.size > 1:
        raise PadmmError("padmmirnn data runs on one process")
    if args.data_command == "prepare":
        from padmmirnn.converters import PrepareOptions, prepare

        lines = prepare(PrepareOptions.from_mapping(vars(args)))
    elif args.data_command == "fetch":
        from padmmirnn.fetch import fetch

        lines = fetch(args.name, args.to, args.base_url)
    else:
        from padmmirnn import datafiles
        from padmmirnn.fetch import SOURCES

        if args.data_command == "inspect":
            lines = [datafiles.describe(path) for path in args.files]
        else:
            lines = [datafiles.builtin_listing(), "fetchable: " + ", ".join(SOURCES)]
    print("\n".join(lines))
    return 0


def _evaluate(args, comm) -> int:
    import numpy as np

    from padmmirnn import datafiles
    from padmmirnn.checkpoint import load_weights
    from padmmirnn.evaluation import evaluate_split
    from padmmirnn.splits import load_split

    params, meta = load_weights(args.weights or args.checkpoint)
    if args.checkpoint:
        from padmmirnn.config import load_config_text

        cfg = load_config_text(meta["config_toml"])
        meta.update({"activation": cfg.model.activation, "loss": cfg.model.loss,
                     "input_dim": params.U.shape[1], "classes": params.V.shape[0]})
        if args.dataset is None:
            args.dataset = cfg.data.dataset
    train_path, test_path = datafiles.resolve(args.dataset or "default")
    path = test_path if args.split == "test" and test_path else train_path
    split = load_split(path, comm, np.float64, None, args.split)
    info = split.info
    if (info.dim, info.classes) != (meta["input_dim"], meta["classes"]):
        raise PadmmError(f"{path}: dataset ({info.kind}, input size {info.dim}, {info.classes} "
                         f"classes) does not fit the weights {args.weights or args.checkpoint}")
    metrics = evaluate_split(params, split.parts, comm, meta["activation"], meta["loss"],
                             np.float64, False, "split")
    if comm.rank == 0:
        print(json.dumps({"dataset": path, "samples": info.n, "loss": metrics["split_loss"],
                          "accuracy": metrics["split_accuracy"]}))
    return 0


def _model(path: str):
    """The model of ``--weights``; a bad file is one line (exit 2)."""
    from padmmirnn.api import load

    try:
        return load(path)
    except ValueError as exc:
        raise PadmmError(str(exc)) from None


def _predict(args, comm) -> int:
    from padmmirnn.api import read_inputs

    model = _model(args.weights)
    if model.many_to_many:
        raise PadmmError(f"{args.weights}: predict writes one row per sequence; this model "
                         f"predicts every step (use the Python API, or generate)")
    try:
        inputs = read_inputs(args.input, args.column)
        prob = (model.predict_proba(inputs) if model.loss == "ce"
                else model.logits(inputs))
    except ValueError as exc:
        raise PadmmError(f"{args.input}: {exc}") from None
    if comm.rank == 0:
        import csv
        import io

        from padmmirnn.atomic import atomic_write_text

        names = model.class_names or [str(k) for k in range(model.classes)]
        text = io.StringIO()
        w = csv.writer(text)
        w.writerow(["sample", "predicted", *[f"p_{n}" for n in names]])
        for i, row in enumerate(prob):
            w.writerow([i, names[int(row.argmax())], *[f"{v:.6g}" for v in row]])
        atomic_write_text(args.out, text.getvalue())
        print(f"wrote {args.out}: {len(prob)} predictions")
    return 0


def _generate(args, comm) -> int:
    model = _model(args.weights)
    try:
        text = model.generate(args.prompt, args.length, args.temperature, args.seed)
    except ValueError as exc:
        raise PadmmError(f"{args.weights}: {exc}") from None
    if comm.rank == 0:
        print(text)
    return 0


def _export(args, comm) -> int:
    from padmmirnn.export import export

    model = _model(args.weights)
    if comm.rank == 0:
        try:
            export(model, args.format, args.out, args.lengths)
        except ValueError as exc:
            raise PadmmError(str(exc)) from None
        print(f"wrote {args.out} ({args.format})")
    return 0


def _config_tools(args, comm) -> int:
    from padmmirnn.config import describe_options

    if comm.rank == 0:
        print(describe_options(markdown=args.markdown))
    return 0


def _scaling(args, comm) -> int:
    from padmmirnn import scaling

    if comm.size > 1:
        raise PadmmError("padmmirnn scaling runs on one process (it starts the MPI jobs)")
    if args.scaling_command == "plan":
        from padmmirnn.scaling.planning import parse_float_list, parse_int_list

        lines = scaling.plan(scaling.PlanOptions.from_text(
            args.ranks, args.nodes, kind=args.kind, samples=args.samples,
            samples_per_rank=args.samples_per_rank, dataset=args.dataset, algo=args.algo,
            parallel=args.study_parallel, iterations=args.iterations, threads=args.threads,
            sets=tuple(args.set), time_limit=args.time, signal_seconds=args.signal_seconds,
            partition=args.partition, account=args.account, overcommit=args.overcommit,
            launcher=args.launcher, slurm_dir=args.slurm_dir, out=args.out,
            target=args.target,
            admm_batches=tuple(parse_int_list(args.admm_batches, "--admm-batches", low=0)),
            adam_batches=tuple(parse_int_list(args.adam_batches, "--adam-batches", low=0)),
            adam_lr_scaling=args.adam_lr_scaling,
            validate_latency_us=tuple(parse_float_list(args.validate_latency_us,
                                                       "--validate-latency-us")),
            max_units=args.max_units))
    elif args.scaling_command == "run":
        lines = scaling.run_points(args.dir, args.points, args.mpiexec, args.timeout,
                                   say=lambda line: print(line, flush=True))
    else:
        if args.project_nodes < 1 or (args.ranks_per_node is not None and
                                      args.ranks_per_node < 1):
            raise PadmmError("--project-nodes and --ranks-per-node must be positive")
        lines = scaling.report(args.dir, not args.no_plots, args.ranks_per_node,
                               args.project_nodes, args.latency_us, args.bandwidth_gbs,
                               args.fabrics)
    print("\n".join(lines))
    return 0


def _checkpoint(args, comm) -> int:
    from pathlib import Path

    from padmmirnn.checkpoint import describe_checkpoint

    if comm.rank == 0:
        if not Path(args.path).is_file():
            raise PadmmError(f"{args.path}: checkpoint file not found")
        print(describe_checkpoint(Path(args.path)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from padmmirnn.comm import (
        SimulatedNetwork,
        abort_job,
        abort_on_exception,
        launcher_rank,
        make_comm,
    )
    from padmmirnn.logs import setup_logging

    comm = None
    rank, size = launcher_rank(), 1
    try:
        if args.command in ("train", "compare"):
            if args.command == "compare" and args.budget_seconds and args.iterations is None:
                args.iterations = 1_000_000  # the budget ends each run
            # the configuration (validated, no MPI yet) says how to run, --parallel included
            cfg = _config(args)
            comm = make_comm(cfg.train.parallel, SimulatedNetwork(cfg.train.net_latency_us,
                                                                  cfg.train.net_bandwidth_gbs),
                             cfg.train.collective_timeout_s)
            rank, size = comm.rank, comm.size
            setup_logging(rank, size, getattr(args, "verbose", False))
            return {"train": _train, "compare": _compare}[args.command](args, comm, cfg)
        comm = make_comm("auto")
        rank, size = comm.rank, comm.size
        setup_logging(rank, size, getattr(args, "verbose", False))
        handler = {"data": _data, "checkpoint": _checkpoint, "evaluate": _evaluate,
                   "predict": _predict, "generate": _generate, "export": _export,
                   "scaling": _scaling, "config": _config_tools}[args.command]
        return handler(args, comm)
    except PadmmError as exc:
        if rank == 0:
            print(f"padmmirnn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"[{rank}/{size}] interrupted", file=sys.stderr)
        abort_job(size, 130)  # windows may be locked and ranks in collectives: end them all
        return 130
    except Exception:
        abort_on_exception(rank, size)
        return 1
    finally:
        if comm is not None:
            comm.free()


if __name__ == "__main__":
    sys.exit(main())
