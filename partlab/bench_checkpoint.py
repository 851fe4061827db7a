"""`partlab bench checkpoint`: what --checkpoint-dir costs, against the model's size.

For each width, manual TP with AdamW on 2 processes runs 10 steps saving after every one (the
newest 6 kept), then resumes from its step-5 checkpoint: the checkpoint's size on disk, each
save's and the load's wall time (rank 0, ending in a barrier), and the share of a step that
saving every N steps adds (a save's time / (N x the step's)), next to the run's own step time.
Writes DIR/checkpoint.json.
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile

from partlab import lab, strategies
from partlab.config import UsageError
from partlab.model import parameter_count
from partlab.report import write_json


def main(argv):
    p = argparse.ArgumentParser(prog="partlab bench checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-dims", default="512,1024,2048",
                   help="model widths (default 512,1024,2048; 4 layers, input 1024)")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    p.add_argument("--out", default=os.path.join("results", "bench"))
    args = p.parse_args(argv)
    entry, rows, commands = strategies.get("tp-manual"), [], []
    for hidden in [int(h) for h in args.hidden_dims.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            ck, flags = os.path.join(tmp, "ck"), ["--hidden-dim", str(hidden), "--layers", "4",
                                                  "--optimizer", "adamw", "--device", "cpu"]
            saved = run(entry, args.nproc, [*flags, "--steps", "10", "--checkpoint-every", "1",
                                            "--keep-checkpoints", "6", "--checkpoint-dir", ck],
                        tmp, commands)
            for step in range(6, 11):
                shutil.rmtree(os.path.join(ck, f"step-{step:06d}"))
            resumed = run(entry, args.nproc, [*flags, "--steps", "10", "--checkpoint-dir", ck,
                                              "--resume"], tmp, commands)
        c, step_s = saved["checkpoints"], saved["step_time_s"]
        save_s = statistics.median(c["save_s"])
        settings = argparse.Namespace(**saved["settings"])
        rows.append({"hidden_dim": hidden, "parameters": parameter_count(settings),
                     "checkpoint_mib": c["bytes"] / 2**20, "save_ms": save_s * 1e3,
                     "load_ms": resumed["checkpoints"]["load_s"] * 1e3,
                     "step_ms": step_s * 1e3,
                     **{f"cost_every_{n}": save_s / (n * step_s) for n in (1, 10, 100)}})
    print(lab.aligned([["hidden", "parameters", "checkpoint MiB", "save ms", "load ms",
                        "step ms", "every 1", "every 10", "every 100"]] + [
        [str(r["hidden_dim"]), f"{r['parameters']:,}", f"{r['checkpoint_mib']:.1f}",
         f"{r['save_ms']:.0f}", f"{r['load_ms']:.0f}", f"{r['step_ms']:.1f}",
         *(f"+{r[f'cost_every_{n}']:.0%}" for n in (1, 10, 100))] for r in rows]))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "checkpoint.json")
    write_json({"sweep": "checkpoint", "results": rows, "commands": commands,
                "provenance": lab.provenance(args.nproc, f"{args.nproc} CPU processes (gloo)")},
               path)
    print(f"wrote {path}")
    return 0


def run(entry, nproc, flags, tmp, commands):
    """One driver run; its record (a failed run is a UsageError naming partlab's lines)."""
    path = os.path.join(tmp, "record.json")
    cmd, proc, _ = lab.run_strategy(entry, nproc, flags, path)
    commands.append(cmd)
    if proc.returncode:
        raise UsageError("a run failed: " + " ".join(lab.failure_lines(proc)))
    with open(path) as f:
        return json.load(f)
