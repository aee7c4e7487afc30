"""A real Slurm cluster for the tests, started on this machine by the test itself.

One node on localhost, or several "nodes" in network namespaces joined by a bridge:
each slurmd runs in its own namespace (``nsenter --net``) with its own hostname
(``unshare --uts``), so MPI sees separate nodes and talks over TCP between them. The
daemons (munged, slurmctld, one slurmd per node) get free ports and keep every file
under a temporary folder; they are stopped by the PIDs in their pid files, and the
namespaces, veths and bridge are removed by name, also when a test fails. Where root,
the tools or the packages are missing, the fixtures skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scancel", "scontrol", "sinfo", "squeue")
SEARCH_PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/sbin", "/usr/bin",
                               "/sbin", "/bin", os.environ.get("PATH", "")])


def _missing() -> list[str]:
    return [b for b in DAEMONS + CLIENTS if shutil.which(b, path=SEARCH_PATH) is None]


def install_reason() -> str | None:
    """Install Slurm and munge with apt-get if needed; the reason to skip, or None."""
    if os.geteuid() != 0:
        return "a local Slurm needs root (munged, slurmctld and slurmd run as root here)"
    if not _missing():
        return None
    if shutil.which("apt-get", path=SEARCH_PATH) is None:
        return f"Slurm is not installed ({', '.join(_missing())} missing) and apt-get is not here"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(cmd[:2])} failed: {exc}"
        if proc.returncode != 0:
            return f"{' '.join(cmd[:2])} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return f"still missing after apt-get: {', '.join(_missing())}" if _missing() else None


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sh(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": SEARCH_PATH})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
    return proc


@dataclass(frozen=True)
class Node:
    """A Slurm node: its name, the hostname its processes see, its address, and the
    network namespace it lives in (None: this host's own network)."""

    name: str
    hostname: str
    addr: str
    netns: str | None = None
    cpus: int = 2


# The MPICH wheel under ``srun --mpi=pmi2`` with its default UCX network module sends its
# address (a fixed 4.5 kB buffer whose tail is not initialised) through Slurm's PMI2
# server in 9 segments; for some buffer contents the server rejects a segment and the
# ranks wait in MPI_Init (the watchdog, PADMMIRNN_MPI_INIT_TIMEOUT, ends them). The
# fixtures avoid UCX (Bridge.ENV); a job that still fails this way is run again.
PMI2_STARTUP_FAILURE = "mpi/pmi2: invalid client request"


class Bridge:
    """``count`` network namespaces ``padmm-n1..`` joined by the bridge ``padmm-br0``
    (10.231.0.1 on this host; node i at 10.231.0.(i + 1) on its ``eth0``). :data:`ENV`
    makes MPICH use its OFI network module with libfabric's TCP provider between them.
    The default, UCX, has two problems here. It finds the shared memory of the
    namespaces (which share this machine's memory) unless held to ``UCX_TLS=tcp,self``.
    Its address exchange is a fixed 4.5 kB buffer sent in 9 PMI segments, and under
    ``srun --mpi=pmi2`` about 1 job in 3 failed or hung in MPI_Init with
    ``UCX_NET_DEVICES`` set, 1 in about 70 without it (:data:`PMI2_STARTUP_FAILURE`).
    OFI's address is one short value."""

    ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}

    BRIDGE, SUBNET = "padmm-br0", "10.231.0"

    def __init__(self, count: int):
        self.count = count
        self.host_addr = f"{self.SUBNET}.1"

    @staticmethod
    def skip_reason() -> str | None:
        if os.geteuid() != 0:
            return "network namespaces need root"
        missing = [t for t in ("ip", "nsenter", "unshare")
                   if shutil.which(t, path=SEARCH_PATH) is None]
        return f"missing {', '.join(missing)}" if missing else None

    def nodes(self, cpus: int = 1) -> list[Node]:
        return [Node(f"n{i}", f"n{i}", f"{self.SUBNET}.{i + 1}", f"padmm-n{i}", cpus)
                for i in range(1, self.count + 1)]

    def up(self) -> None:
        self.down()  # leftovers of an earlier, killed run
        _sh(["ip", "link", "add", self.BRIDGE, "type", "bridge"])
        _sh(["ip", "addr", "add", f"{self.host_addr}/24", "dev", self.BRIDGE])
        _sh(["ip", "link", "set", self.BRIDGE, "up"])
        for node in self.nodes():
            i = node.name[1:]
            ns = ["ip", "netns", "exec", node.netns]
            _sh(["ip", "netns", "add", node.netns])
            _sh(["ip", "link", "add", f"padmm-vp{i}", "type", "veth", "peer", "name",
                 f"padmm-vn{i}"])
            _sh(["ip", "link", "set", f"padmm-vn{i}", "netns", node.netns])
            _sh(["ip", "link", "set", f"padmm-vp{i}", "master", self.BRIDGE])
            _sh(["ip", "link", "set", f"padmm-vp{i}", "up"])
            _sh([*ns, "ip", "link", "set", f"padmm-vn{i}", "name", "eth0"])
            _sh([*ns, "ip", "addr", "add", f"{node.addr}/24", "dev", "eth0"])
            _sh([*ns, "ip", "link", "set", "eth0", "up"])
            _sh([*ns, "ip", "link", "set", "lo", "up"])

    def pids(self, node: Node) -> list[int]:
        """Every process in the node's namespace (its slurmd, steps and ranks)."""
        out = _sh(["ip", "netns", "pids", node.netns], check=False).stdout
        return [int(p) for p in out.split()]

    def down(self) -> None:
        for node in self.nodes():
            for pid in self.pids(node):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _sh(["ip", "netns", "del", node.netns], check=False)
            _sh(["ip", "link", "del", f"padmm-vp{node.name[1:]}"], check=False)
        _sh(["ip", "link", "del", self.BRIDGE], check=False)


class SlurmCluster:
    """A Slurm cluster of ``nodes`` whose state lives in ``root``; the controller runs
    on this host at ``controller`` (hostname, address); ``extra_env`` is added to the
    environment of every command and job."""

    def __init__(self, root: Path, nodes: list[Node],
                 controller: tuple[str, str] = ("localhost", "127.0.0.1"),
                 extra_env: dict[str, str] | None = None):
        self.root, self.nodes, self.controller = root, nodes, controller
        self.conf = root / "slurm.conf"
        self.pid_files = {"slurmctld": root / "slurmctld.pid",
                          "munged": root / "munge" / "munged.pid",
                          **{f"slurmd-{n.name}": root / f"slurmd-{n.name}.pid" for n in nodes}}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "PMI_", "PMIX_"))}
        self.env = {**env, "SLURM_CONF": str(self.conf), "PATH": SEARCH_PATH,
                    "PADMMIRNN_PYTHON": sys.executable,
                    "PADMMIRNN_NUMBA_CACHE": str(root / "numba"),
                    "PADMMIRNN_MPI_INIT_TIMEOUT": "30", **(extra_env or {})}
        self.startup_retries = 0  # jobs run again after PMI2_STARTUP_FAILURE

    def start(self) -> None:
        munge = self.root / "munge"
        for sub in (munge, self.root / "state", self.root / "log",
                    *(self.root / f"spool-{n.name}" for n in self.nodes)):
            sub.mkdir(mode=0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._daemon(["munged", "--force", f"--socket={munge / 'munge.sock'}",
                      f"--key-file={key}", f"--pid-file={self.pid_files['munged']}",
                      f"--log-file={munge / 'munged.log'}",
                      f"--seed-file={munge / 'munged.seed'}"])
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        names = ",".join(n.name for n in self.nodes)
        self.conf.write_text("\n".join([
            "ClusterName=padmmtest", f"SlurmctldHost={self.controller[0]}({self.controller[1]})",
            f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.sock'}", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "ReturnToService=2",
            "KillWait=5", "InactiveLimit=0", "SlurmdTimeout=5", "MessageTimeout=5",
            # job ids unique across the clusters the tests start: MPICH names its
            # shared-memory segments after the job and step, and a killed job's segment
            # left in /dev/shm made the next job with the same ids fail in MPI_Init
            f"FirstJobId={int.from_bytes(os.urandom(3), 'big') + 1000}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            *(f"NodeName={n.name} NodeHostname={n.hostname} NodeAddr={n.addr} CPUs={n.cpus} "
              "State=UNKNOWN" for n in self.nodes),
            f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP", ""]))
        self._daemon(["slurmctld", "-f", str(self.conf)])
        for node in self.nodes:
            self.start_slurmd(node)
        self.wait_idle()

    def start_slurmd(self, node: Node) -> None:
        cmd = ["slurmd", "-f", str(self.conf), "-N", node.name]
        if node.netns:
            cmd = ["nsenter", f"--net=/var/run/netns/{node.netns}", "unshare", "--uts", "sh",
                   "-c", f"hostname {node.hostname} && exec {' '.join(cmd)}"]
        self._daemon(cmd)

    def wait_idle(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while self.run(["sinfo", "-h", "-n", node.name, "-o", "%T"]).stdout.strip() \
                    != "idle":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Slurm node {node.name} did not become idle in "
                                       f"{timeout} s:\n" + self.logs())
                time.sleep(0.3)

    def _daemon(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr}\n"
                               + self.logs())

    def run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=self.env)

    def run_job(self, cmd: list[str], timeout: float, logs=None,
                attempts: int = 3) -> subprocess.CompletedProcess:
        """Run a job command (``srun``, ``sbatch --wait``); run it again (up to
        ``attempts`` times) only when it failed at MPI start-up with
        :data:`PMI2_STARTUP_FAILURE` in its output or in ``logs()`` (the job's log files,
        read after each attempt)."""
        proc = self.run(cmd, timeout)
        for _ in range(attempts - 1):
            text = proc.stdout + proc.stderr + (logs() if logs else "")
            if proc.returncode == 0 or PMI2_STARTUP_FAILURE not in text:
                break
            self.startup_retries += 1
            proc = self.run(cmd, timeout)
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, ...)."""
        line = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def wait_ended(self, job_id: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id)).get("JobState") in ("PENDING", "RUNNING",
                                                               "COMPLETING", "CONFIGURING"):
            assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')}"
            time.sleep(0.3)
        return info

    def logs(self) -> str:
        parts = []
        for log in sorted(self.root.glob("log/*.log")) + [self.root / "munge" / "munged.log"]:
            if log.is_file():
                parts.append(f"== {log.name}\n" + "\n".join(log.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    def stop_daemon(self, name: str) -> None:
        """Stop one daemon (``slurmctld``, ``munged``, ``slurmd-<node>``) by its pid file."""
        try:
            pid = int(self.pid_files[name].read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        if name.split("-")[0].encode() not in cmdline:  # not ours any more (PID reused)
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons by the PIDs in their pid files."""
        if self.conf.exists() and self.pid_files["slurmctld"].exists():
            try:
                self.run(["scancel", f"--user={os.getuid()}"])
                deadline = time.monotonic() + 20
                while self.run(["squeue", "-h"]).stdout.strip() and time.monotonic() < deadline:
                    time.sleep(0.3)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in [n for n in self.pid_files if n.startswith("slurmd-")] + ["slurmctld",
                                                                             "munged"]:
            self.stop_daemon(name)
