"""A real one-node SLURM cluster on this machine, for tests and for trying ``slurm.submit`` locally.

``LocalSlurm(root).start()`` installs Debian's ``slurm-wlm`` and ``munge`` when ``slurmctld`` is
missing (as root, through apt-get), writes a one-node configuration under ``root`` (2 CPUs by
default, no cgroups: this works in a container), starts ``munged``, ``slurmctld`` and ``slurmd`` in
the foreground as child processes, and waits until ``sinfo`` shows the node idle. Everything the
daemons write (state, spool, logs, munge socket and key) stays under ``root``, and the ports are
free ones, so it leaves the machine's own ``/etc/slurm`` and any other SLURM alone. Clients find the
cluster through ``SLURM_CONF``: use :meth:`LocalSlurm.env` for subprocesses.

``stop()`` cancels the cluster's jobs, then ends the daemons it started (by process id only).
When SLURM cannot be installed or started, :class:`SlurmUnavailable` says why (tests skip with it).

From a shell::

    python -m slurm.local_cluster start --root /tmp/slurm   # prints `export SLURM_CONF=...`
    python -m slurm.local_cluster stop --root /tmp/slurm
"""

from __future__ import annotations

import argparse
import atexit
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.distributed.spawn import free_port

DEBIAN_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
PARTITION = "debug"


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine; the message says why."""


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def install_slurm(timeout_s: int = 600) -> None:
    """``apt-get install slurm-wlm munge`` when ``slurmctld`` is missing; raise :class:`SlurmUnavailable`."""
    if all(_which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurmctld/slurmd/munged are not installed and this user is not root "
                               f"(install {' '.join(DEBIAN_PACKAGES)} with apt-get)")
    if not _which("apt-get"):
        raise SlurmUnavailable("slurmctld is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {exc}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SlurmUnavailable(f"{' '.join(cmd)} exited {proc.returncode}: {' | '.join(tail)}")
    missing = [d for d in DAEMONS if not _which(d)]
    if missing:
        raise SlurmUnavailable(f"apt-get installed {DEBIAN_PACKAGES} but {missing} are still missing")


@dataclass
class LocalSlurmConfig:
    """The generated cluster. ``cred_expire`` (seconds) is also how long a requeued job waits."""

    cpus: int = 2
    real_memory_mb: int = 2000
    cred_expire_s: int = 5
    kill_wait_s: int = 30  # seconds between SIGTERM and SIGKILL when a job is cancelled or requeued
    min_job_age_s: int = 3600  # finished jobs stay visible to `scontrol show job` this long


class LocalSlurm:
    """One-node SLURM under ``root`` (see the module docstring). Usable as a context manager."""

    def __init__(self, root: str | os.PathLike, config: LocalSlurmConfig | None = None):
        self.root = Path(root).resolve()
        self.config = config or LocalSlurmConfig()
        self.conf_path = self.root / "etc" / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ environment
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process' environment) without SLURM job variables, plus ``SLURM_CONF``.

        Job variables are dropped so that a test run inside another SLURM job (or under torchrun)
        does not leak its rank layout into the jobs submitted here.
        """
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))
               and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env["SLURM_CONF"] = str(self.conf_path)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    # ------------------------------------------------------------------ configuration
    def write_config(self) -> None:
        """Write slurm.conf, cgroup.conf, an empty plugstack.conf and a munge key under ``root``."""
        cfg, root, user = self.config, self.root, getpass.getuser()
        for sub in ("etc", "state", "spool", "log", "run", "munge", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o700)  # munged refuses a socket or key folder others may write to
        key = root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        lines = [
            "# Generated by slurm/local_cluster.py: one node, no cgroups (works inside a container).",
            "ClusterName=qwen3vl-local",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also the pause before a requeued job may start again (default 120 s).
            f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire={cfg.cred_expire_s}",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={root / 'etc' / 'plugstack.conf'}",
            f"TmpFS={root / 'tmp'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SchedulerType=sched/builtin",
            # The main scheduler also runs every sched_interval seconds (default 60): that is when a
            # requeued job, held for cred_expire seconds, starts again.
            "SchedulerParameters=sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",  # declare 2 CPUs whatever the machine has
            "ReturnToService=2",
            "JobRequeue=1",
            f"KillWait={cfg.kill_wait_s}",
            f"MinJobAge={cfg.min_job_age_s}",
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cfg.cpus} RealMemory={cfg.real_memory_mb} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self._write(self.conf_path, "\n".join(lines) + "\n")
        self._write(root / "etc" / "cgroup.conf", "# unused: ProctrackType=proctrack/linuxproc, TaskPlugin=task/none\n"
                                                  "CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        self._write(root / "etc" / "plugstack.conf", "")

    @staticmethod
    def _write(path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ daemons
    def start(self, timeout_s: float = 60.0) -> "LocalSlurm":
        """Install if needed, configure, start the daemons, wait for an idle node; raise SlurmUnavailable."""
        install_slurm()
        self.write_config()
        atexit.register(self.stop)  # also when the caller forgets, or dies of an exception
        munge = self.root / "munge"
        try:
            self._spawn("munged", [_which("munged"), "--foreground", "--force",
                                   f"--socket={munge / 'munge.socket'}", f"--key-file={munge / 'munge.key'}",
                                   f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                                   f"--log-file={self.root / 'log' / 'munged.log'}"])
            self._wait(lambda: (munge / "munge.socket").exists(), 15, "munged did not create its socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf_path)])
            self._wait(lambda: self._run(["scontrol", "ping"]).returncode == 0, timeout_s,
                       "slurmctld does not answer `scontrol ping`")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf_path)])
            self._wait(self._node_idle, timeout_s, "the node did not become idle in `sinfo`")
        except SlurmUnavailable:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.console", "ab")
        # A new session: a Ctrl-C in the terminal that started us does not reach the daemons first.
        self._procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                             start_new_session=True)
        log.close()
        self._write(self.root / "run" / "pids.json", json.dumps({k: p.pid for k, p in self._procs.items()}))

    def _run(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def _node_idle(self) -> bool:
        out = self._run(["sinfo", "-h", "-N", "-o", "%T"]).stdout.split()
        return bool(out) and all(state.rstrip("*") == "idle" for state in out)

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{dead[0]} exited with status {self._procs[dead[0]].returncode}: "
                                       f"{self._log_tail(dead[0])}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.5)
        raise SlurmUnavailable(f"{what} within {timeout_s:.0f} s: {self._log_tail('slurmd')} "
                               f"{self._log_tail('slurmctld')}")

    def _log_tail(self, name: str, lines: int = 4) -> str:
        texts = []
        for path in (self.root / "log" / f"{name}.console", self.root / "log" / f"{name}.log"):
            if path.is_file():
                texts += path.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(texts) or f"(no {name} log)"

    def stop(self) -> None:
        """Cancel the cluster's jobs and end the daemons this object started (by process id)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                self._run(["scancel", f"--partition={PARTITION}"], timeout=15)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and self._run(["squeue", "-h"], timeout=15).stdout.strip():
                    time.sleep(0.5)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in reversed(list(self._procs)):
            _terminate(self._procs[name])
        self._procs.clear()
        (self.root / "run" / "pids.json").unlink(missing_ok=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _stop_from_pid_file(root: Path) -> int:
    """``stop`` from another process: signal the daemons recorded in ``<root>/run/pids.json``."""
    pids_file = root / "run" / "pids.json"
    if not pids_file.is_file():
        print(f"no local SLURM recorded under {root}", file=sys.stderr)
        return 1
    cluster = LocalSlurm(root)
    try:
        cluster._run(["scancel", f"--partition={PARTITION}"], timeout=15)
    except (OSError, subprocess.SubprocessError):
        pass
    for name, pid in reversed(list(json.loads(pids_file.read_text()).items())):
        try:
            os.kill(pid, signal.SIGTERM)
            print(f"stopped {name} (pid {pid})")
        except ProcessLookupError:
            pass
    pids_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slurm.local_cluster",
                                     description="Start or stop a one-node SLURM on this machine.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--root", required=True, help="folder for its configuration, state and logs")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the node (default 2)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if args.action == "stop":
        return _stop_from_pid_file(root)
    cluster = LocalSlurm(root, LocalSlurmConfig(cpus=args.cpus))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        print(f"error: SLURM unavailable: {exc}", file=sys.stderr)
        return 1
    # The daemons outlive this command (they run in their own sessions); `stop` ends them.
    atexit.unregister(cluster.stop)
    cluster._procs.clear()
    print(f"local SLURM up: node {cluster.node}, {args.cpus} CPUs, partition {PARTITION}; logs in {root / 'log'}")
    print(f"export SLURM_CONF={cluster.conf_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
