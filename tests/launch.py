"""Launch drivers the way users do: torchrun subprocesses."""
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
HELPERS = Path(__file__).resolve().parent / "helpers"
# Small enough that a 4-process run takes seconds on 2 cores; 4 layers give 2 TP pairs (so one
# pair's input needs a gradient) and let the pipeline have 2, 3 or 4 stages.
SMALL = ["--batch-size", "32", "--input-dim", "64", "--hidden-dim", "128", "--num-classes", "10",
         "--steps", "3", "--layers", "4"]


def run(cmd, timeout=180, env=None):
    """Run cmd, returning (CompletedProcess, seconds) with stdout and stderr merged in .stdout.

    PYTHONFAULTHANDLER makes a crashing process print where Python was when it died."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})})
    return proc, time.perf_counter() - start


def torchrun(target, nproc, *args, timeout=180, env=None, torchrun_flags=()):
    """target: a module ("partlab.pipeline") or a script path (for the fault-injection helper);
    torchrun_flags go to torchrun itself (--max-restarts)."""
    launch = ["-m", target] if not target.endswith(".py") else [target]
    return run([TORCHRUN, "--standalone", "--nproc_per_node", str(nproc), *torchrun_flags,
                *launch, *args], timeout=timeout, env=env)

