"""Run a study's points on this machine, one after another, with ``mpiexec -n P``
(a workstation, or inside an interactive allocation), each under a timeout that kills
the whole process group of a point that hangs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from padmmirnn.errors import PadmmError
from padmmirnn.scaling.manifest import manifest_points, read_manifest
from padmmirnn.scaling.planning import _absolute_args, git_revision

THREAD_VARIABLES = ("PADMMIRNN_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def _find_mpiexec(path: str | None) -> str:
    found = path or shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or \
        shutil.which("mpiexec")
    if not found:
        raise PadmmError("mpiexec not found: pass --mpiexec PATH")
    return found


def _write_launch_env(out: Path, values: dict) -> None:
    with open(out / "launch.env", "a") as f:
        f.writelines(f"{k}={v}\n" for k, v in values.items())


def run_points(directory: str, only: str | None = None, mpiexec: str | None = None,
               timeout: float = 900.0, say: Callable[[str], None] = print) -> list[str]:
    """Run the study's points one after another on this machine with ``mpiexec -n P``
    (a workstation, or inside an interactive allocation), each under ``timeout``;
    ``say`` gets one line per finished point. Returns the closing lines."""
    root = Path(directory).resolve()
    points = manifest_points(read_manifest(root))
    if only:
        wanted = {n.strip() for n in only.split(",") if n.strip()}
        unknown = wanted - {p.name for p in points}
        if unknown:
            raise PadmmError(f"no such point(s): {', '.join(sorted(unknown))}")
        points = [p for p in points if p.name in wanted]
    launcher = _find_mpiexec(mpiexec)
    (root / "logs").mkdir(exist_ok=True)
    failed = []
    for point in points:
        out = root / point.out
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        env = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(point.threads))}
        _write_launch_env(out, {"launcher": "mpiexec", "job_id": "", "nodes": 1,
                                "ranks": point.ranks, "threads": point.threads,
                                "cpus_on_node": len(os.sched_getaffinity(0)),
                                "node_list": os.uname().nodename,
                                "git_revision": git_revision(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        cmd = [launcher, "-n", str(point.ranks), sys.executable, "-P", "-m", "padmmirnn",
               "train", *_absolute_args(point, root)]
        log = root / "logs" / f"{point.name}-local.out"
        t0 = time.monotonic()
        code = _run_with_timeout(cmd, env, log, timeout)
        _write_launch_env(out, {"exit_code": code})
        summary = out / "summary.json"
        if code == 0 and summary.is_file():
            s = json.loads(summary.read_text())
            say(f"{point.name}: {s['iterations']} iterations, "
                f"{s['time_per_iteration_s']:.3f} s/iteration "
                f"({time.monotonic() - t0:.0f} s with start-up)")
        else:
            failed.append(point.name)
            say(f"{point.name}: FAILED (exit {code}), see {log}")
    if failed:
        raise PadmmError(f"{len(failed)} point(s) failed: {', '.join(failed)}")
    return [f"ran {len(points)} point(s); next: padmmirnn scaling report {root}"]


def _run_with_timeout(cmd: list[str], env: dict, log: Path, timeout: float) -> int:
    """Run ``cmd`` in its own process group, output to ``log``; on timeout the whole
    group (mpiexec and its ranks) is killed and -9 returned."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\nscaling run: killed after {timeout:.0f} s\n")
            return -9

