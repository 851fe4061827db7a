"""`partlab lab`: run every strategy on this machine, check each against the reference, and print
one table (written as JSON with provenance under --out).

Each strategy runs as its own `torchrun --standalone` job, exactly as a user would launch it, on
every GPU when there are at least two (the most of them that every strategy can split its sizes
over: 4 of 6), else on two CPU processes with gloo.
"""
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import partlab
from partlab import ops
from partlab.config import UsageError, parse
from partlab.distributed import Launch
from partlab.harness import Driver
from partlab.report import write_json
from partlab.strategies import BY_KEY, STRATEGIES


def add_arguments(p):
    p.add_argument("--out", default="results", help="directory for lab-<timestamp>.json")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per strategy (default: the GPUs if at least 2, else 2 CPUs)")
    p.add_argument("--only", action="append", metavar="KEY",
                   help="run only the strategy KEY, or those whose key contains it "
                        "(repeatable; keys: " + ", ".join(s.key for s in STRATEGIES) + ")")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="passed to every driver (auto: GPUs when there are at least 2)")


def usable_gpus(device):
    return torch.cuda.device_count() if torch.cuda.is_available() and device != "cpu" else 0


def choose_processes(nproc, device):
    """The process count and what they run on (`partlab env` reports the same)."""
    gpus = usable_gpus(device)
    if nproc is None:
        nproc = gpus if gpus >= 2 else 2
    if nproc < 1:
        raise UsageError(f"--nproc must be at least 1 (got {nproc})")
    on = f"{nproc} GPUs (NCCL)" if gpus >= nproc else f"{nproc} CPU processes (gloo)"
    return nproc, on


def git_revision():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) if rev else None


def command_line():
    """How this lab was started, as the user typed it (`partlab lab ...` or `python -m ...`)."""
    program = os.path.basename(sys.argv[0])
    head = ["python", "-m", "partlab"] if program == "__main__.py" else [program]
    return head + sys.argv[1:]


def provenance(nproc, runs_on):
    cuda = torch.cuda.is_available()
    return {
        "partlab": partlab.__version__, "torch": torch.__version__,
        "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version()))
        if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda else [platform.processor() or platform.machine()],
        "runs_on": runs_on, "world_size": nproc, "python": platform.python_version(),
        "host": platform.node(), "git_revision": git_revision(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "command": command_line(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# What NCCL prints when its watchdog ends a collective that ran past the timeout, just before it
# aborts the process (SIGABRT): partlab's own error line never comes.
NCCL_WATCHDOG = "Watchdog caught collective operation timeout"


def failure_lines(proc):
    """What a failed driver run said: its `partlab:` lines, else the last 12 lines of output;
    an NCCL watchdog abort is named as such, with NCCL's line for the collective."""
    lines = (proc.stderr + proc.stdout).splitlines()
    ours = [line for line in lines if line.startswith("partlab:")]
    watchdog = [line for line in lines if NCCL_WATCHDOG in line]
    if watchdog and not ours:
        ours = ["partlab: error: an NCCL collective ran past --timeout and NCCL's watchdog "
                "aborted the process: another rank crashed, hung or was launched differently "
                "(raise --timeout if it is only slow; README: Troubleshooting)", watchdog[0]]
    return ours or lines[-12:]


def run_strategy(entry, nproc, flags, json_path):
    """One run of a registry entry as a user launches it: torchrun, --json, --check."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), *entry.command(), *flags, "--json", json_path,
           "--check"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return cmd, proc, time.perf_counter() - start


def table(records):
    head = ("strategy", "final loss", "max|dloss|", "max|dparam|", "step ms", "ref ms",
            "speedup", "samples/s", "MFU", "activations MiB/rank (analytic)",
            "bubble (ideal, equal stages)", "comm/step (rank 0)")
    rows = [head]
    for name, r in records:
        comm = ", ".join(f"{op} x{n}" for op, n in sorted(r["comm_per_step"][0].items()))
        bubble = r.get("bubble")
        if bubble:
            bubble = f"{bubble['measured']:.0%} ({bubble['ideal']:.0%}, {bubble['theory']:.0%})"
        rows.append((name, f"{r['losses'][-1]:.6f}", f"{r['max_abs_dloss']:.1e}",
                     f"{r['max_abs_dparam']:.1e}", f"{r['step_time_s'] * 1e3:.2f}",
                     f"{r['reference_step_time_s'] * 1e3:.2f}",
                     f"{r['reference_step_time_s'] / r['step_time_s']:.2f}x",
                     f"{r['samples_per_s']:,.0f}", f"{r['mfu']:.1%}",
                     activations(r), bubble or "-", comm or "none"))
    return aligned(rows)


def activations(record):
    """Each rank's measured activations, then the analytic count where the model has one (once
    when every rank's is the same)."""
    measured = "/".join(f"{m:.2f}" for m in record["peak_activation_mib"])
    analytic = [f"{m:.2f}" for m in record.get("analytic_activation_mib") or [] if m is not None]
    if len(set(analytic)) == 1:
        analytic = analytic[:1]
    return f"{measured} ({'/'.join(analytic)})" if analytic else measured


def aligned(rows):
    """rows (the first is the header) as left-aligned columns with a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def selects(only, key):
    """--only KEY: that strategy when KEY is one, else every key containing it (e.g. pipeline)."""
    return only == key if only in BY_KEY else only in key


def refusals(chosen, nproc, driver_flags):
    """Each driver's own validation, here, before anything is launched: {reason: [keys]} for the
    strategies that nproc processes cannot run."""
    launch = Launch(rank=0, world_size=nproc, local_rank=0, local_world_size=nproc)
    found = {}
    for entry in chosen:
        driver: Driver = importlib.import_module(entry.module)
        try:
            with contextlib.redirect_stderr(io.StringIO()):   # warnings: the run prints them
                driver.validate(parse(driver.parser(), [*entry.flags, *driver_flags]), launch)
        except UsageError as e:
            found.setdefault(str(e), []).append(entry.key)
    return found


def with_lab_defaults(driver_flags, nproc, device):
    """The flags every strategy gets: the device, and (unless given) --layers 2 x nproc, so the
    interleaved pipelines have a layer for each of 2 stages per process, TP an even count, and
    every row the same model."""
    flags = [*driver_flags, "--device", device]
    return flags if "--layers" in flags else [*flags, "--layers", str(2 * nproc)]


def runnable(matching, nproc):
    """(the strategies nproc processes are enough for, the keys of those that need more)."""
    return ([s for s in matching if nproc >= s.min_processes],
            [s.key for s in matching if nproc < s.min_processes])


def most_processes_that_fit(matching, gpus, driver_flags, device):
    """The most processes, at most one per GPU, on which every chosen strategy can split its
    sizes (the handout's hidden 2048 and batch 64 split 2, 4 or 8 ways, not 3 or 6)."""
    for n in range(gpus, 2, -1):
        chosen, _ = runnable(matching, n)
        if not refusals(chosen, n, with_lab_defaults(driver_flags, n, device)):
            return n
    return 2


def unfused_without_cuda_kernels(chosen, on_gpus):
    """On GPUs with an extension that has no CUDA kernels (built where nvcc was missing), the
    fused manual-TP rows run unfused, with a note, instead of failing."""
    if not on_gpus or ops.extension_info()["cuda"]:
        return chosen
    fused = [e for e in chosen if "--fused" in e.flags]
    if fused:
        print(f"partlab lab: note: {', '.join(e.key for e in fused)} run(s) unfused: the "
              "extension has no CUDA kernels (rebuild with nvcc: PARTLAB_BUILD=cuda "
              "pip install --no-build-isolation -e .)", flush=True)
    return [dataclasses.replace(e, key=f"{e.key} (unfused)",
                                flags=tuple("--no-fused" if f == "--fused" else f
                                            for f in e.flags)) if e in fused else e
            for e in chosen]


def main(args, driver_flags):
    """Run the chosen strategies; driver_flags (e.g. --steps 5) go to every driver unchanged."""
    nproc, runs_on = choose_processes(args.nproc, args.device)
    matching = [s for s in STRATEGIES if not args.only or any(selects(o, s.key) for o in args.only)]
    if not matching:
        raise UsageError(f"--only {args.only} matches none of: "
                         + ", ".join(s.key for s in STRATEGIES))
    if args.nproc is None and nproc > 2:
        fits = most_processes_that_fit(matching, nproc, driver_flags, args.device)
        if fits < nproc:
            print(f"partlab lab: using {fits} of the {nproc} GPUs: on {nproc}, some strategies "
                  f"cannot split these sizes (--nproc {nproc} says which and why)", flush=True)
            nproc, runs_on = choose_processes(fits, args.device)
    driver_flags = with_lab_defaults(driver_flags, nproc, args.device)
    chosen, skipped = runnable(matching, nproc)
    if not chosen:
        raise UsageError(f"{', '.join(skipped)} need more than --nproc {nproc} processes")
    chosen = unfused_without_cuda_kernels(chosen, usable_gpus(args.device) >= nproc)
    found = refusals(chosen, nproc, driver_flags)
    if found:
        raise UsageError("\npartlab: error: ".join(
            f"{', '.join(keys)} on --nproc {nproc}: {reason}" for reason, keys in found.items()))
    print(f"partlab lab: {len(chosen)} strategies on {runs_on}"
          + (f" ({', '.join(skipped)}: need more processes)" if skipped else "")
          + f", each with {' '.join(driver_flags)}", flush=True)
    records, commands, failed = [], [], []
    width = max(len(entry.key) for entry in chosen)
    with tempfile.TemporaryDirectory() as tmp:
        for i, entry in enumerate(chosen):
            json_path = os.path.join(tmp, f"{i}.json")
            cmd, proc, seconds = run_strategy(entry, nproc, driver_flags, json_path)
            commands.append(cmd)
            if proc.returncode == 0:
                with open(json_path) as f:
                    records.append((entry.key, json.load(f)))
                print(f"  {entry.key:<{width}}  ok ({seconds:.1f} s)", flush=True)
            else:
                failed.append(entry.key)
                print(f"  {entry.key:<{width}}  FAILED (exit {proc.returncode}, {seconds:.1f} s): "
                      + "\n    ".join(failure_lines(proc)[-12:]), flush=True)
    if records:
        print()
        print(table(records))
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"lab-{stamp}.json")
    result = {"provenance": provenance(nproc, runs_on), "commands": commands, "failed": failed,
              "runs": [dict(r, name=name) for name, r in records]}
    write_json(result, path)
    print(f"\nwrote {path}")
    return 1 if failed else 0
