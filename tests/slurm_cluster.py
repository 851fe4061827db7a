"""A real, throwaway Slurm for the tests: munged, slurmctld and two slurmd daemons on this machine.

The two slurmd processes emulate two nodes, n1 and n2, both on 127.0.0.1 (each on its own port:
Slurm's multiple-slurmd mode), so `--nodes=2` jobs and torchrun's c10d rendezvous across
"nodes" run for real. Configuration, state, spool, sockets and logs live under one temporary
directory; the daemons run in the foreground as children of the test process and are stopped by
their saved PIDs (SIGTERM, then SIGKILL), never by name. Nothing outside the directory is changed
except installing the Debian packages when they are missing (apt-get, as root).
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd"]
NODES = ["n1", "n2"]
CPUS_PER_NODE = 2


class SlurmUnavailable(RuntimeError):
    """Slurm could not be brought up; the message says why."""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def apt_install(packages):
    """apt-get install as root (CI: a fresh machine); returns "" or why it failed."""
    if os.geteuid() != 0:
        return f"not root: run `apt-get install -y {' '.join(packages)}` as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for the dpkg lock rather than fail when another apt-get is running.
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    install = [*apt, "install", "-y", "--no-install-recommends", *packages]
    proc = subprocess.run(install, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=900, check=False)
    if proc.returncode != 0:      # a fresh machine may have no package lists yet
        subprocess.run([*apt, "update"], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=900, check=False)
        proc = subprocess.run(install, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=900, check=False)
    if proc.returncode != 0:
        return (f"`{' '.join(install)}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
    return ""


def ensure_installed():
    """Install the Slurm and MUNGE packages unless their daemons are already there."""
    if all(_sbin(d) for d in DAEMONS) and shutil.which("sbatch"):
        return
    why = apt_install(PACKAGES)
    if why or not all(_sbin(d) for d in DAEMONS):
        raise SlurmUnavailable(f"Slurm is not installed: {why or 'daemons missing after install'}")


def slurm_conf(d, ctld_port, node_ports, host):
    """A minimal single-machine cluster: no accounting, no cgroups, root runs everything."""
    lines = [
        "ClusterName=partlabtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={d}/munge.socket",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "KillWait=5",                 # SIGTERM -> SIGKILL when a step is killed (default 30 s)
        "MinJobAge=600",              # keep finished jobs visible to scontrol for the tests
        "InactiveLimit=0",
        f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool/%n",
        f"SlurmctldPidFile={d}/slurmctld.pid",
        f"SlurmdPidFile={d}/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/log/slurmctld.log",
        f"SlurmdLogFile={d}/log/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name, port in zip(NODES, node_ports, strict=True):
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                     f"CPUs={CPUS_PER_NODE} Boards=1 SocketsPerBoard=1 "
                     f"CoresPerSocket={CPUS_PER_NODE} ThreadsPerCore=1 RealMemory=4000 "
                     "State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE "
                 "State=UP")
    return "\n".join(lines) + "\n"


class SlurmCluster:
    """Start with .start(), stop with .stop(); .env has SLURM_CONF for the client commands."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.procs = []               # (name, Popen) in start order
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout=60):
        ensure_installed()
        d = self.dir
        for sub in ("state", "log", "spool/n1", "spool/n2"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", [_sbin("munged"), "--foreground", "--force",
                               f"--socket={d}/munge.socket", f"--key-file={key}",
                               f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log",
                               f"--seed-file={d}/munged.seed"])
        self._wait(lambda: (d / "munge.socket").exists(), 15, "munged never created its socket",
                   d / "log/munged.log")
        host = socket.gethostname().split(".")[0]
        self.conf.write_text(slurm_conf(d, _free_port(), [_free_port() for _ in NODES], host))
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._run(["scontrol", "ping"]).stdout.count("UP") > 0, timeout,
                   "slurmctld does not answer `scontrol ping`", d / "log/slurmctld.log")
        for node in NODES:
            self._spawn(f"slurmd {node}", [_sbin("slurmd"), "-D", "-N", node, "-f",
                                           str(self.conf)])
        self._wait(self._all_idle, timeout, "the nodes never became idle (`sinfo`)",
                   d / "log/slurmd-n1.log")
        return self

    def stop(self):
        """Cancel what is still queued, then stop every daemon we started by its PID."""
        if any(p.poll() is None for n, p in self.procs if n == "slurmctld"):
            self._run(["scancel", "--full", "-u", "root"], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._run(["squeue", "-h"]).stdout.strip():
                time.sleep(0.5)
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()      # slurmd may ignore SIGTERM
                    proc.wait(10)
        self.procs.clear()

    # -- helpers -----------------------------------------------------------------------------
    def _spawn(self, name, argv):
        with open(self.dir / "log" / f"{name.replace(' ', '-')}.stdout", "w") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.procs.append((name, proc))
        (self.dir / f"{name.replace(' ', '-')}.started-pid").write_text(f"{proc.pid}\n")
        return proc

    def _run(self, argv, check=False, timeout=30):
        return subprocess.run(argv, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check, stdin=subprocess.DEVNULL)

    def _all_idle(self):
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n, "").startswith("idle") for n in NODES)

    def _wait(self, ready, timeout, what, logfile):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [(n, p.returncode) for n, p in self.procs if p.poll() is not None]
            if dead:
                break
            if ready():
                return
            time.sleep(0.25)
        else:
            dead = []
        tail = logfile.read_text()[-2000:] if logfile.exists() else "(no log)"
        stdouts = "".join(f"\n--- {f.name}\n{f.read_text()[-800:]}"
                          for f in sorted((self.dir / "log").glob("*.stdout")))
        raise SlurmUnavailable(f"{what} after {timeout} s; exited daemons: {dead or 'none'}\n"
                               f"--- {logfile}\n{tail}{stdouts}")

    # -- jobs --------------------------------------------------------------------------------
    def sbatch(self, args, env=None, cwd=None):
        """Submit; returns the job id. args: sbatch options, the script, the script's args."""
        proc = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, check=False)
        assert proc.returncode == 0, f"sbatch {args} failed: {proc.stderr}{proc.stdout}"
        return proc.stdout.strip().split(";")[0]

    def requeue(self, job):
        """Kill the job's run and put it back in the queue, as preemption does; Slurm makes a
        requeued job wait 2 minutes before it may start again, which the tests skip."""
        proc = self._run(["scontrol", "requeue", job])
        assert proc.returncode == 0, f"scontrol requeue {job}: {proc.stderr}{proc.stdout}"
        self._wait(lambda: self.job_info(job).get("JobState") == "PENDING", 60,
                   f"job {job} back in the queue", self.dir / "log/slurmctld.log")
        proc = self._run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        assert proc.returncode == 0, f"scontrol update {job}: {proc.stderr}{proc.stdout}"

    def job_info(self, job):
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, RunTime, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", job]).stdout
        info = {}
        for field in out.split():
            key, _, value = field.partition("=")
            info.setdefault(key, value)
        return info

    def wait(self, job, timeout):
        """Poll `squeue -h -j JOB` until the job has left the queue (not `sbatch --wait`: it
        polls slowly). Returns scontrol's record; raises TimeoutError (job cancelled) if late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self._run(["squeue", "-h", "-j", job, "-o", "%T"])
            if proc.returncode == 0 and not proc.stdout.strip():
                return self.job_info(job)
            time.sleep(0.5)
        info = self.job_info(job)
        self._run(["scancel", job])
        raise TimeoutError(f"job {job} still {info.get('JobState')} after {timeout} s")
