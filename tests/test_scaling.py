"""padmmirnn scaling: plan (scripts, datasets, manifest), run (mpiexec), report (CSV,
speedup and efficiency, the fitted model and its projection)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_random_split

from padmmirnn import scaling
from padmmirnn.cli import main
from padmmirnn.datafiles import read_info
from padmmirnn.scaling import Measured, Model, Point, fit_model

MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which(
    "mpiexec")
TRAIN_SBATCH = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"


def _plan(study: Path, *args: str) -> int:
    return main(["scaling", "plan", *args, "--slurm-dir", str(TRAIN_SBATCH.parent),
                 "--out", str(study)])


def test_plan_writes_scripts_datasets_and_manifest(tmp_path, capsys):
    src = tmp_path / "src_train.h5"
    x, y = write_random_split(src, n=30, steps=4, dim=3, seed=3)
    study = tmp_path / "study"
    assert _plan(study, "--kind", "weak", "--ranks", "1,2,4", "--nodes", "1,1,2",
                 "--samples-per-rank", "10", "--dataset", str(src), "--iterations", "7",
                 "--set", "model.hidden=5", "--overcommit", "--partition", "p1") == 0
    assert _plan(study, "--kind", "strong", "--ranks", "2", "--samples", "12",
                 "--dataset", str(src), "--parallel", "async", "--threads", "2") == 0
    manifest = json.loads((study / "manifest.json").read_text())
    names = [p["name"] for p in manifest["points"]]
    assert names == ["weak-1r-1n", "weak-2r-1n", "weak-4r-2n", "strong-2r-1n"]
    by_name = {p["name"]: p for p in manifest["points"]}
    assert [by_name[n]["samples"] for n in names] == [10, 20, 40, 12]
    assert by_name["weak-1r-1n"]["parallel"] == "none"
    assert by_name["strong-2r-1n"]["parallel"] == "async"
    # weak, 4 ranks: 40 samples from a 30-sample source, repeated cyclically
    data = study / by_name["weak-4r-2n"]["dataset"]
    assert read_info(str(data)).n == 40
    with h5py.File(data) as f:
        np.testing.assert_array_equal(f["inputs"][30:], x[:10])
        np.testing.assert_array_equal(f["targets"][:30], y)
    assert not data.with_name(data.name.replace("_train", "_test")).exists()
    script = (study / "weak-4r-2n.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks=4", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --signal=B:USR1@120", "#SBATCH --overcommit",
                 "#SBATCH --partition=p1", "#SBATCH --exclusive"):
        assert line in script.splitlines()
    assert f"exec bash {study / 'train.sbatch'} --dataset {data}" in script
    assert "--iterations 7 --config fullbatch --set model.hidden=5 --resume none" in script
    assert "{{" not in script and "\n\n" not in script
    strong = (study / "strong-2r-1n.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=2" in strong and "--overcommit" not in strong
    assert (study / "train.sbatch").read_text() == TRAIN_SBATCH.read_text()
    subprocess.run(["bash", "-n", str(study / "weak-4r-2n.sbatch")], check=True, timeout=30)
    assert "Submit:" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--kind", "weak", "--ranks", "1,2"], "--samples-per-rank"),
    (["--kind", "strong", "--ranks", "1,2", "--samples-per-rank", "4"], "keeps the total"),
    (["--kind", "strong", "--ranks", "1,x"], "comma-separated integers"),
    (["--kind", "strong", "--ranks", "1,2", "--nodes", "1,2,3"], "one per rank count"),
    (["--kind", "strong", "--ranks", "2", "--nodes", "4"], "cannot fill 4 nodes"),
    (["--kind", "strong", "--ranks", "4", "--samples", "3"], "cannot be split over 4"),
    (["--kind", "strong", "--ranks", "2", "--set", "model.hiden=3"], "hiden"),
])
def test_plan_rejects_bad_requests(tmp_path, capsys, args, message):
    assert _plan(tmp_path / "study", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("padmmirnn: error:") and message in err


def test_report_without_a_study_is_a_clear_error(tmp_path, capsys):
    assert main(["scaling", "report", str(tmp_path), "--no-plots"]) == 2
    assert "no scaling study here" in capsys.readouterr().err


def _measured(ranks: int, samples: int, t_comp: float, t_comm: float, nodes: int = 1,
              cpus: int = 2, kind: str = "strong") -> Measured:
    point = Point(name=f"{kind}-{ranks}r-{nodes}n", kind=kind, ranks=ranks, nodes=nodes,
                  threads=1, samples=samples, steps=10, hidden=8, parallel="sync",
                  dataset="d", out="o", script="s", train_args=(), git_revision="abc")
    return Measured(point=point, parallel="sync", launcher="mpiexec", cpus_on_node=cpus,
                    git_revision="abc", iterations=10, timed_iterations=8,
                    t_iter_median_s=t_comp + t_comm, t_iter_max_s=t_comp + t_comm,
                    t_compute_s=t_comp, t_comm_s=t_comm, bytes_reduced_per_iteration=1000,
                    stopped=None)


def test_model_fit_recovers_known_parameters():
    truth = Model(compute_per_sample_step_s=2e-6, compute_fixed_s=0.01, latency_s=1e-3,
                  seconds_per_byte=1e-8, bytes_per_iteration=1000)
    points = [_measured(p, n, truth.compute(p, n, 10), truth.comm(p), cpus=64)
              for p, n in ((1, 1000), (2, 1000), (4, 1000), (8, 4000), (16, 8000))]
    model, notes = fit_model(points)
    assert model.compute_per_sample_step_s == pytest.approx(2e-6, rel=1e-6)
    assert model.compute_fixed_s == pytest.approx(0.01, rel=1e-6)
    assert model.latency_s == pytest.approx(1e-3, rel=1e-6)
    assert model.seconds_per_byte == pytest.approx(1e-8, rel=1e-6)
    assert notes == ["fitted to 5 of 5 measured points"]


def test_model_fit_with_one_rank_count_and_overrides():
    points = [_measured(1, 100, 1.0, 0.0), _measured(2, 100, 0.55, 0.02),
              _measured(4, 100, 2.0, 0.5)]  # 4 ranks on 2 CPUs: excluded
    model, notes = fit_model(points)
    assert "oversubscribed points excluded" in notes[0]
    assert any("cannot be told apart" in n for n in notes)
    assert model.latency_s == pytest.approx(0.02) and model.seconds_per_byte == 0.0
    assert model.compute(1, 100, 10) == pytest.approx(1.0)
    assert model.compute(2, 100, 10) == pytest.approx(0.55)
    assert model.comm(1) == 0.0
    assert model.comm(64) == pytest.approx(0.02 * 6)
    fixed, notes = fit_model(points, latency_s=2e-6, bandwidth=1e10)
    assert fixed.latency_s == 2e-6 and fixed.seconds_per_byte == pytest.approx(1e-10)
    assert any("not fitted" in n for n in notes)


def test_sync_timings_drop_warmup_and_take_the_median(tmp_path):
    rows = [{"iteration": k, "t_compute_s": c, "t_comm_s": m}
            for k, c, m in ((1, 9.0, 1.0), (2, 8.0, 1.0), (3, 1.0, 0.1), (4, 2.0, 0.2),
                            (5, 1.5, 0.3))]
    rows.append({"iteration": 5, "train_loss": 1.0})  # a final row without timings
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = scaling.iteration_timings(tmp_path, warmup=2)
    assert (t.timed, t.compute_s, t.comm_s) == (3, 1.5, 0.2)
    assert t.median_s == pytest.approx(1.8) and t.max_s == pytest.approx(2.2)


def test_async_timings_take_the_slowest_rank(tmp_path):
    for rank, scale in ((0, 1.0), (1, 2.0)):
        rows = [{"iteration": k, "iteration_s": scale * s, "comm_s": 0.1}
                for k, s in enumerate((5.0, 5.0, 1.0, 1.2, 1.1), start=1)]
        (tmp_path / f"async_rank{rank}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    t = scaling.iteration_timings(tmp_path, warmup=2)
    assert t.median_s == pytest.approx(2.2) and t.max_s == pytest.approx(2.4)
    assert t.compute_s == pytest.approx(2.1) and t.comm_s == pytest.approx(0.1)


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
def test_run_and_report_a_small_study(tmp_path, capsys):
    src = tmp_path / "src_train.h5"
    write_random_split(src, n=80, steps=5, dim=4, seed=1)
    study = tmp_path / "study"
    common = ["--dataset", str(src), "--iterations", "5", "--set", "model.hidden=6"]
    assert _plan(study, "--kind", "strong", "--ranks", "1,2", "--samples", "40", *common) == 0
    assert _plan(study, "--kind", "weak", "--ranks", "1,2", "--samples-per-rank", "20",
                 *common) == 0
    env = {**os.environ}
    for key in [k for k in env if k.startswith(("PMI_", "SLURM_"))]:
        del env[key]
    proc = subprocess.run([sys.executable, "-P", "-m", "padmmirnn", "scaling", "run",
                           str(study), "--timeout", "240"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("s/iteration") == 4
    summary = json.loads((study / "runs" / "weak-2r-1n" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["parallel"] == "sync"
    launch = (study / "runs" / "weak-2r-1n" / "launch.env").read_text()
    assert "launcher=mpiexec" in launch and "exit_code=0" in launch
    capsys.readouterr()
    try:
        import matplotlib  # noqa: F401
        plots = []
    except ImportError:
        plots = ["--no-plots"]
    assert main(["scaling", "report", str(study), "--project-nodes", "8", *plots]) == 0
    out = capsys.readouterr().out
    assert "| measured | strong | 1 | 2 | 40 |" in out and "| projected | weak |" in out
    with open(study / "scaling.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(scaling.CSV_COLUMNS)
    measured = [r for r in rows if r["source"] == "measured"]
    projected = [r for r in rows if r["source"] == "projected"]
    assert {(r["kind"], r["ranks"], r["samples"]) for r in measured} == {
        ("strong", "1", "40"), ("strong", "2", "40"), ("weak", "1", "20"), ("weak", "2", "40")}
    for r in measured:
        assert r["git_revision"] and r["launcher"] == "mpiexec" and r["threads"] == "1"
        assert int(r["timed_iterations"]) == 3  # 5 iterations, 2 of warm-up
        assert float(r["t_iter_median_s"]) <= float(r["t_iter_max_s"])
        t = float(r["t_iter_median_s"])
        assert float(r["samples_per_s"]) == pytest.approx(int(r["samples"]) / t, rel=1e-4)
        if r["ranks"] == "1":
            assert float(r["speedup"]) == 1.0 and float(r["efficiency"]) == 1.0
            assert float(r["t_comm_s"]) == 0.0
    strong2 = next(r for r in measured if r["kind"] == "strong" and r["ranks"] == "2")
    assert float(strong2["efficiency"]) == pytest.approx(float(strong2["speedup"]) / 2,
                                                         rel=1e-4)
    assert [int(r["nodes"]) for r in projected if r["kind"] == "weak"] == [1, 2, 4, 8]
    weak8 = next(r for r in projected if r["kind"] == "weak" and r["nodes"] == "8")
    assert weak8["ranks"] == "16" and weak8["samples"] == "320"  # 2 ranks/node, 20/rank
    model = json.loads((study / "model.json").read_text())
    # tiny problems: the fit may put all compute into the fixed part (noise decides)
    assert model["compute_per_sample_step_s"] >= 0 and model["compute_fixed_s"] >= 0
    assert model["compute_per_sample_step_s"] + model["compute_fixed_s"] > 0
    assert math.isfinite(model["latency_s"])
    if not plots:
        assert (study / "scaling-strong.png").stat().st_size > 0
        assert (study / "scaling-weak.png").stat().st_size > 0


def test_busiest_share_of_a_random_batch():
    """E[max over ranks of a batch's samples on a rank]: exact in the limits, and for
    N = 4, P = 2, batch 2 it is 1 + 2/6 (both samples on one rank in 2 of 6 pairs)."""
    from padmmirnn.scaling.accuracy import busiest_share

    assert busiest_share(64, 1, 4000) == 64
    assert busiest_share(4000, 8, 4000) == 500
    assert busiest_share(2, 2, 4, draws=4000) == pytest.approx(4 / 3, abs=0.03)
    shares = [busiest_share(64, p, 4000) for p in (2, 4, 8, 64)]
    assert 32 < shares[0] < 40 and shares == sorted(shares, reverse=True)
    assert shares[-1] >= 3  # 64 samples over 64 ranks: some rank gets several


def test_units_interpolate_in_log_log_and_the_fabric_cost():
    from padmmirnn.scaling.accuracy import Method, busiest_share, parse_fabrics

    m = Method("adam", step_by_batch={64: 2e-3, 256: 6e-3, 4000: 0.2}, bytes_per_step=1e6,
               units_by_batch={64: 8, 256: 32, 4000: 100}, samples=4000)
    assert m.units(64) == 8 and m.units(128) == pytest.approx(16)  # slope 1 in log-log
    assert m.units(32) is None and m.units(8000) == pytest.approx(100)
    fabric = parse_fabrics("50:10")[0]
    assert fabric.alpha_s == pytest.approx(50e-6) and fabric.bytes_per_s == 10e9 / 8
    assert fabric.allreduce(1, 1e6) == 0
    assert fabric.allreduce(2, 1e6) == pytest.approx(50e-6 + 1e6 / 1.25e9)
    assert fabric.allreduce(8, 1e6) == pytest.approx(3 * 50e-6 + 2 * 7 / 8 * 1e6 / 1.25e9)
    # the step cost: measured at 64, 256 and 4000, linear between, proportional outside
    assert m.step_at(64) == 2e-3 and m.step_at(160) == pytest.approx(4e-3)
    assert m.step_at(32) == pytest.approx(1e-3) and m.step_at(8000) == pytest.approx(0.4)
    units, seconds = m.time(128, 2, fabric)
    steps = math.ceil(4000 / 128)
    share = busiest_share(128, 2, 4000)
    assert 64 < share < 80 and m.step(128, 2) == pytest.approx(m.step_at(share))
    assert seconds == pytest.approx(units * steps * (m.step_at(share)
                                                     + fabric.allreduce(2, 1e6)))


@pytest.mark.parametrize("args,message", [
    (["--target", "85"], "--target"),
    (["--adam-batches", "64,-1"], "--adam-batches"),
    (["--validate-latency-us", "fast"], "--validate-latency-us"),
])
def test_accuracy_plan_rejects_bad_requests(tmp_path, capsys, args, message):
    assert _plan(tmp_path / "study", "--kind", "accuracy", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "study").exists()


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
def test_accuracy_study_projects_time_to_target(tmp_path, capsys):
    """A small accuracy study run here: the 2-rank points need as many passes (ADMM,
    SP = serial) and epochs (Adam at global batch 128 = data parallel) as the one-process
    runs the projection takes them from; the report projects every fabric and checks
    each measured point."""
    study = tmp_path / "study"
    assert _plan(study, "--kind", "accuracy", "--target", "0.6", "--set", "model.hidden=16",
                 "--admm-batches", "32,64", "--adam-batches", "64,128",
                 "--validate-latency-us", "1000", "--max-units", "30") == 0
    assert main(["scaling", "run", str(study), "--mpiexec", MPIEXEC]) == 0
    capsys.readouterr()
    assert main(["scaling", "report", str(study), "--no-plots"]) == 0
    text = capsys.readouterr().out
    model = json.loads((study / "accuracy_model.json").read_text())
    checks = {c["point"]: c for c in model["checks"]}
    for name in ("accuracy-admm-b64-2r-a1000us", "accuracy-adam-b128-2r-a1000us"):
        c = checks[name]
        assert c["measured_units"] is not None and c["measured_units"] == c["projected_units"]
        assert c["error"] is not None
    with open(study / "time_to_accuracy.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["fabric"] for r in rows} == {"2 us / 100 Gb/s", "50 us / 10 Gb/s",
                                           "5000 us / 1 Gb/s"}
    assert set(model["crossovers"]) == {r["fabric"] for r in rows}
    assert {r["method"] for r in rows} == {"ADMM, global batch 64 P", "ADMM, global batch 64",
                                           "Adam, global batch 64 P", "Adam, global batch 64"}
    assert "crossover" in text
