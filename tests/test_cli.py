"""The command line: outputs of a run, evaluate, configuration, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import write_random_split

from padmmirnn.cli import main
from padmmirnn.config import ConfigError, build_config, load_config, parse_override

REQUIRED_METRICS = {"iteration", "wall_time_s", "train_loss", "train_accuracy", "test_loss",
                    "test_accuracy", "syncs", "bytes"}
FULLBATCH_METRICS = {"objective", "residual_a", "residual_s", "residual_o"}
REQUIRED_SUMMARY = {"algo", "parallel", "ranks", "iterations", "train_loss", "train_accuracy",
                    "test_loss", "test_accuracy", "wall_time_s", "time_per_iteration_s"}


def test_default_run_writes_outputs_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--iterations", "3", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"metrics.jsonl", "summary.json", "config.toml",
                                              "weights.h5"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(REQUIRED_METRICS | {"batch_loss"} <= set(r) for r in rows)
    losses = [r["train_loss"] for r in rows]
    assert losses[0] > losses[1] > losses[2]
    summary = json.loads((out / "summary.json").read_text())
    assert REQUIRED_SUMMARY <= set(summary)
    assert summary["iterations"] == 3 and summary["ranks"] == 1 and summary["algo"] == "admm"
    assert summary["test_accuracy"] == rows[-1]["test_accuracy"]
    assert summary["test_accuracy"] > 0.25  # chance is 0.10: the weights have learned
    # the saved config reproduces the run's configuration
    saved = load_config(out / "config.toml")
    assert saved.train.iterations == 3
    assert saved.hash() == build_config(overrides={"train.iterations": 3}).hash()
    # evaluate the saved weights: the same test accuracy as the run reported
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(out / "weights.h5")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
    assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-10)


def test_fullbatch_run_reports_the_augmented_lagrangian(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", "fullbatch", "--iterations", "3", "--out",
                 str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(REQUIRED_METRICS | FULLBATCH_METRICS <= set(r) for r in rows)
    objective = [r["objective"] for r in rows]
    assert objective[0] > objective[1] > objective[2]


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[model]\nhidden = 8\nactivation = "relu"\n[admm]\nrho1 = 0.5\n')
    cfg = load_config(cfg_file, dict([parse_override("admm.rho1=2"),
                                      parse_override("train.dtype=float32")]))
    assert (cfg.model.hidden, cfg.model.activation, cfg.admm.rho1, cfg.train.dtype) == (
        8, "relu", 2.0, "float32")
    with pytest.raises(ConfigError, match="frozen|cannot assign"):
        try:
            cfg.model.hidden = 3
        except Exception as exc:  # dataclasses.FrozenInstanceError
            raise ConfigError(str(exc)) from exc


def _bad_nan(path):
    x, y = write_random_split(path)
    x[3, 2, 1] = np.nan
    with h5py.File(path, "r+") as f:
        f["inputs"][...] = x


def _bad_labels(path):
    write_random_split(path)
    with h5py.File(path, "r+") as f:
        f["targets"][5] = 7


def _bad_shape(path):
    write_random_split(path)
    with h5py.File(path, "r+") as f:
        del f["targets"]
        f["targets"] = np.zeros(41, np.int32)


def _empty(path):
    path.write_bytes(b"")


def _not_hdf5(path):
    path.write_text("pixel,label\n1,2\n")


BAD_DATA = [
    (_bad_nan, "NaN"),
    (_bad_labels, "labels must lie in [0, 3)"),
    (_bad_shape, "does not match inputs"),
    (_empty, "file is empty"),
    (_not_hdf5, "not a readable HDF5 file"),
]

BAD_CONFIG = [
    (["--set", "admm.rho9=1"], "unknown config key 'admm.rho9'"),
    (["--set", "model.hidden=abc"], "config key 'model.hidden' must be of type int"),
    (["--set", "admm.rho2=-1"], "config key 'admm.rho2' must be > 0.0"),
    (["--set", "model.activation=sigmoid"], "must be one of tanh, relu"),
    (["--set", "nosection=1"], "must be written section.key"),
    (["--iterations", "-3"], "train.iterations' must be >= 0"),
    (["--dataset", "/nonexistent/x.h5"], "dataset not found: /nonexistent/x.h5"),
    (["--config", "/nonexistent/c.toml"], "config file not found"),
]


def _assert_one_line_error(capsys, code, expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("padmmirnn: error: ")
    assert expected in err[0]


@pytest.mark.parametrize("args,expected", BAD_CONFIG)
def test_bad_config_is_one_clear_line(tmp_path, capsys, args, expected):
    out = tmp_path / "out"
    code = main(["train", "--out", str(out), *args])
    _assert_one_line_error(capsys, code, expected)
    assert not out.exists()


@pytest.mark.parametrize("make,expected", BAD_DATA)
def test_bad_data_is_one_clear_line_naming_the_file(tmp_path, capsys, make, expected):
    path = tmp_path / "bad_train.h5"
    make(path)
    out = tmp_path / "out"
    code = main(["train", "--dataset", str(path), "--out", str(out)])
    _assert_one_line_error(capsys, code, expected)
    assert not out.exists()


@pytest.mark.parametrize("make", [m for m, _ in BAD_DATA])
def test_bad_data_message_names_file(tmp_path, capsys, make):
    path = tmp_path / "named_train.h5"
    make(path)
    main(["train", "--dataset", str(path), "--out", str(tmp_path / "o")])
    assert str(path) in capsys.readouterr().err


def test_bad_config_toml_syntax(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[model\nhidden = 3\n")
    code = main(["train", "--config", str(cfg)])
    _assert_one_line_error(capsys, code, "is not valid TOML")


def test_process_exit_code_and_no_traceback(tmp_path):
    """The real entry point: exit status 2 and no traceback for a user error."""
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "padmmirnn", "train", "--set", "admm.rho1=-0.5", "--out",
         str(tmp_path / "o")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "padmmirnn: error: config key 'admm.rho1' must be > 0.0; got -0.5"


def test_version():
    proc = subprocess.run([sys.executable, "-P", "-m", "padmmirnn", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("padmmirnn ")


def test_every_subpackage_is_installed():
    """setup.cfg lists packages by name: a new subpackage missing from it imports
    in the source tree but not from a clean install (CI's failure mode)."""
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    on_disk = {".".join(p.parent.relative_to(root).parts)
               for p in (root / "padmmirnn").rglob("__init__.py")}
    assert on_disk <= listed, f"add to setup.cfg [options] packages: {on_disk - listed}"


@pytest.mark.parametrize("kind,m2m", [("dense", True), ("tokens", False), ("tokens", True)])
def test_train_on_prepared_files(tmp_path, kind, m2m):
    """A user's own files (train + test beside it) in each input and target layout."""
    write_random_split(tmp_path / "toy_train.h5", kind, m2m, n=30, dim=6, seed=1)
    write_random_split(tmp_path / "toy_test.h5", kind, m2m, n=10, dim=6, seed=2)
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "toy_train.h5"), "--iterations", "4",
                 "--out", str(out), "--set", "model.hidden=5", "--config", "fullbatch"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.all(np.diff([r["objective"] for r in rows]) <= 1e-12)
    mini = tmp_path / "mini"
    assert main(["train", "--dataset", str(tmp_path / "toy_train.h5"), "--iterations", "4",
                 "--out", str(mini), "--set", "model.hidden=5", "--set",
                 "admm.batch_size=8"]) == 0
    rows = [json.loads(line) for line in (mini / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    if m2m:
        assert "train_perplexity" in rows[-1]
    assert rows[-1]["test_accuracy"] is not None


def test_option_table_in_docs_is_generated_from_the_config(capsys):
    """Each option's default, allowed values and doc live beside its field; the CLI
    prints them and docs/options.md holds the same table."""
    from pathlib import Path

    from padmmirnn.config import describe_options, options

    assert main(["config", "options"]) == 0
    printed = capsys.readouterr().out
    keys = [key for key, _, _ in options()]
    assert len(keys) > 50 and all(f"{key} = " in printed for key in keys)
    assert all(meta["doc"] for _, _, meta in options())
    docs = Path(__file__).resolve().parents[1] / "docs" / "options.md"
    assert describe_options(markdown=True) in docs.read_text(), \
        "docs/options.md is stale: regenerate it with padmmirnn config options --markdown"


def test_choices_and_bounds_come_from_the_fields():
    with pytest.raises(ConfigError, match="'train.staleness_kind' must be one of iterations, "
                                          "publishes"):
        build_config(overrides={"train.staleness_kind": "delay"})
    with pytest.raises(ConfigError, match=r"'admm.rho2' must be > 0"):
        build_config(overrides={"admm.rho2": 0.0})
    with pytest.raises(ConfigError, match=r"'optim.batch_size' must be >= 1"):
        build_config(overrides={"optim.batch_size": 0})


def test_state_that_cannot_fit_stops_with_one_line_and_writes_nothing(tmp_path, capsys,
                                                                      monkeypatch):
    from padmmirnn import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: (250 * 2 ** 20, "MemAvailable"))
    out = tmp_path / "run"
    assert main(["train", "--config", "fullbatch", "--iterations", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("padmmirnn: error: the ADMM state of 4000 "
                                               "samples needs")
    assert "GiB" in err[0] and "float32" in err[0] and "admm.batch_size" in err[0]
    assert not out.exists()
    # mini-batch ADMM (the default) needs a batch's workspace only: it fits where the
    # full-batch state does not
    assert main(["train", "--iterations", "1", "--out", str(out)]) == 0


def test_state_estimate_is_what_the_engine_allocates():
    from conftest import make_local

    from padmmirnn.admm import AdmmEngine
    from padmmirnn.comm import SerialComm
    from padmmirnn.memory import admm_state_bytes

    for kind, m2m, dtype in (("dense", False, "float64"), ("tokens", True, "float32")):
        data = make_local(kind, m2m, n=30, steps=7, dim=5, classes=4)
        cfg = build_config(overrides={"model.hidden": 6, "train.dtype": dtype})
        eng = AdmmEngine(cfg, [data], 30, SerialComm())
        st = eng.parts[0].state
        held = st.A.nbytes + st.Z.nbytes + st.O.nbytes + st.L2.nbytes + st.L3.nbytes \
            + eng.parts[0].work.nbytes
        assert admm_state_bytes(data.info, cfg, 30) == held
