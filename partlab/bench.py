"""`partlab bench <sweep>`: run the drivers over a range of sizes; write DIR/<sweep>.json (every
run's record, its command and the provenance) and DIR/<sweep>.png, and print a table.

  step    step time, throughput and model FLOP/s vs hidden width: the reference, native TP,
          manual TP (fused and unfused); activations per rank (gpt: next to the analytic count)
  bubble  the bubble measured from each pipeline schedule's timeline vs microbatches, next to
          the theory (p-1)/(v*m+p-1); Gantt charts of the largest m
  comm    communication per step as the drivers count it vs the analytic count and bytes
  memory  activation memory per rank vs microbatches, GPipe vs 1F1B
  overhead  what the drivers' own measuring costs: their step loop vs a bare loop of the same
          strategy (partlab/bench_overhead.py)
  all     the five above

--model gpt runs every sweep on the transformer (partlab/gpt.py) at its own sizes; step and comm
run its tensor parallelism with and without --sequence-parallel.

Every point is one driver run launched exactly as a user would (torchrun ... --json ... --check,
via partlab.lab.run_strategy), so each number can be reproduced from the command stored with it.
A failed run is reported with its `partlab:` lines and makes the exit status 1; the sweep goes on.
`partlab bench op` (partlab/bench_op.py) is the fused op's micro-benchmark. (This file is longer
than partlab's usual 300 lines: five sweeps and their sizes for two models; the analytic
model they check lives in partlab/theory/, the plots in partlab/plots.py.)
"""
import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import statistics
import tempfile

from partlab import lab, plots, strategies
from partlab.config import UsageError
from partlab.report import write_json
from partlab.theory.comm import ring_wire_bytes, run_comm

# Sizes per sweep. Defaults take 4-10 s per run on 2 CPU cores; on GPUs pass bigger ones
# (--hidden-dims 16384 --batch-size 1024). A sweep that needs one width uses the largest of
# --hidden-dims; comm's pipeline the largest --microbatches. layers None: 2 per pipeline rank,
# what the interleaved schedules need. --quick: QUICK over the defaults, then the sweep's own.
SIZES = {
    # The handout's MLP; up to 8192 wide, where splitting the matmuls starts to pay on CPUs.
    "step": {"hidden_dims": [512, 1024, 2048, 4096, 8192], "batch_size": 64,
             "input_dim": 1024, "layers": 2, "steps": 20, "nproc": [2]},
    # input << hidden: both halves of the model hold the same work, so what is measured is the
    # schedule's bubble rather than one stage waiting for a slower one.
    "bubble": {"microbatches": [1, 2, 4, 8], "hidden_dims": [2048], "batch_size": 512,
               "input_dim": 64, "layers": None, "steps": 5, "nproc": [2]},
    # 4 layers: two TP pairs, so the second pair's backward all_reduce is counted too.
    "comm": {"hidden_dims": [512, 2048], "microbatches": [4], "batch_size": 64,
             "input_dim": 1024, "layers": 4, "steps": 3, "nproc": [2, 4]},
    "memory": {"microbatches": [2, 4, 8, 16], "hidden_dims": [2048], "batch_size": 64,
               "input_dim": 1024, "layers": None, "steps": 3, "nproc": [2]},
    # The lab's shape; 10 steps so the driver's one counted step weighs what it does in a run.
    "overhead": {"hidden_dims": [2048], "microbatches": [4], "batch_size": 64,
                 "input_dim": 1024, "layers": 4, "steps": 10, "nproc": [2]},
}
# --model gpt: its own defaults (--heads 4, --vocab-size 64), the sequence in place of the input.
# Blocks of width 64-512 take 5-15 s a run on 2 CPU cores.
GPT_SIZES = {
    "step": {"hidden_dims": [64, 128, 256, 512], "batch_size": 16, "seq_len": 64, "layers": 2,
             "steps": 10, "nproc": [2]},
    "bubble": {"microbatches": [1, 2, 4, 8], "hidden_dims": [256], "batch_size": 16,
               "seq_len": 64, "layers": None, "steps": 5, "nproc": [2]},
    "comm": {"hidden_dims": [64, 256], "microbatches": [4], "batch_size": 16, "seq_len": 32,
             "layers": 4, "steps": 3, "nproc": [2, 4]},
    "memory": {"microbatches": [2, 4, 8, 16], "hidden_dims": [256], "batch_size": 16,
               "seq_len": 64, "layers": None, "steps": 3, "nproc": [2]},
    "overhead": {"hidden_dims": [256], "microbatches": [4], "batch_size": 16, "seq_len": 64,
                 "layers": 4, "steps": 10, "nproc": [2]},
}
QUICK = {"mlp": {"hidden_dims": [64], "batch_size": 32, "input_dim": 64, "steps": 3,
                 "nproc": [2]},
         "gpt": {"hidden_dims": [32], "batch_size": 8, "seq_len": 16, "steps": 3, "nproc": [2]}}
QUICK_SWEEP = {"bubble": {"microbatches": [4]}, "memory": {"microbatches": [4]},
               "overhead": {"layers": 4}, "step": {"layers": 4}}  # step's TP runs = comm's
# The runs this process has made, by command: (the command as run, its record).
DONE = {}
NUM_CLASSES = 10
TP = strategies.of_kind("tp")
PIPELINES = strategies.of_kind("pipeline")


def with_sequence_parallel(entry):
    return dataclasses.replace(entry, key=entry.key + "-sp",
                               flags=(*entry.flags, "--sequence-parallel"),
                               label=entry.label + " + SP")


def tensor_parallel(model):
    """The tensor-parallel entries a sweep runs: the gpt's with and without SP."""
    return TP + [with_sequence_parallel(e) for e in TP] if model == "gpt" else TP


def ints(text):
    """A comma-separated list of positive integers (`--hidden-dims 512,1024`)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 512,1024, got {text!r}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"values must be at least 1, got {text!r}")
    return values


def make_parser(sweep):
    defaults = "".join(f"\n  {name}{' --model gpt' * (table is GPT_SIZES)}: "
                       + ", ".join(f"{k} {v}" for k, v in sizes.items())
                       for table in (SIZES, GPT_SIZES) for name, sizes in table.items()
                       if sweep in (name, "all"))
    p = argparse.ArgumentParser(prog=f"partlab bench {sweep}", description=__doc__,
                                epilog="default sizes (--quick: tiny ones):" + defaults,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("results", "bench"),
                   help="directory for <sweep>.json and <sweep>.png (default results/bench)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: a smoke test for CI, not a measurement")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="passed to every driver")
    p.add_argument("--model", choices=("mlp", "gpt"), default="mlp",
                   help="the model every run trains (gpt: step and comm also run TP with "
                        "--sequence-parallel)")
    p.add_argument("--hidden-dims", type=ints, metavar="N,...", help="model widths")
    p.add_argument("--microbatches", type=ints, metavar="M,...", help="pipeline microbatches")
    p.add_argument("--nproc", type=ints, metavar="P,...", help="processes per run")
    for flag in ("batch-size", "input-dim", "seq-len", "layers", "steps"):
        p.add_argument(f"--{flag}", type=int, help="overrides the sweep's default"
                       + {"input-dim": " (MLP)", "seq-len": " (gpt)"}.get(flag, ""))
    return p


def list_sweeps():
    """What `partlab bench` alone prints: the sweeps as this docstring lists them, and op."""
    return ("partlab bench SWEEP [--quick] [--out DIR] [sizes]; SWEEP is one of:\n"
            + __doc__.split("\n\n")[1]
            + "\n  op      the fused op's micro-benchmark (partlab bench op --help)"
            + "\n  checkpoint  what --checkpoint-dir costs vs model size (partlab bench "
              "checkpoint --help)"
            + "\nSizes and defaults: partlab bench SWEEP --help")


def main(sweep, argv):
    """Run one sweep (or all); exit status 1 when any run failed."""
    args = make_parser(sweep).parse_args(argv)
    other = {"mlp": ("seq_len", "--seq-len"), "gpt": ("input_dim", "--input-dim")}[args.model]
    if getattr(args, other[0]) is not None:
        raise UsageError(f"{other[1]} is the {'gpt' if args.model == 'mlp' else 'MLP'}'s size; "
                         f"with --model {args.model} leave it out")
    if not importlib.util.find_spec("matplotlib"):
        raise UsageError("partlab bench draws its plots with matplotlib, which is not "
                         "installed: pip install matplotlib")
    status = 0
    names = list(SWEEPS) if sweep == "all" else [sweep]
    for i, name in enumerate(names, 1):
        if len(names) > 1:
            print(f"partlab bench all: sweep {i}/{len(names)}", flush=True)
        defaults = (GPT_SIZES if args.model == "gpt" else SIZES)[name]
        quick = {**QUICK[args.model], **QUICK_SWEEP.get(name, {})} if args.quick else {}
        sizes = {**defaults, **quick,
                 **{k: v for k, v in vars(args).items() if k in defaults and v is not None}}
        status |= SWEEPS[name](Sweep(name, args, sizes))
    return status


class Sweep:
    """The shared runner and writer: launches drivers, keeps their records, writes the results."""

    def __init__(self, name, args, sizes):
        self.name, self.out, self.device, self.sizes = name, args.out, args.device, sizes
        self.model = args.model
        self.nproc, self.runs_on = lab.choose_processes(max(sizes["nproc"]), args.device)
        self.points, self.commands, self.failed = [], [], []
        os.makedirs(self.out, exist_ok=True)      # the runs write their timelines there
        print(f"partlab bench {name}: " + ", ".join(f"{k} {v}" for k, v in sizes.items())
              + f" ({'--quick: not a measurement' if args.quick else self.runs_on})", flush=True)

    def flags(self, hidden, *extra, layers=None):
        s = self.sizes
        model = ("--model", "gpt", "--seq-len", s["seq_len"]) if self.model == "gpt" else \
            ("--input-dim", s["input_dim"], "--num-classes", NUM_CLASSES)
        return [str(f) for f in ("--batch-size", s["batch_size"], *model, "--hidden-dim", hidden,
                                 "--layers", layers or s["layers"], "--steps", s["steps"],
                                 "--device", self.device, *extra)]

    def run(self, entry, nproc, flags, **params):
        """One run of a registry entry; returns its record (None when it failed). A run that an
        earlier sweep of this `partlab bench all` made with the same command is not repeated."""
        label = " ".join(f"{k}={v}" for k, v in {"nproc": nproc, **params}.items())
        same = (*entry.command(), nproc, *flags)
        if same in DONE:
            cmd, record = DONE[same]
            print(f"  {label:<52} ok (the same run as an earlier sweep's)", flush=True)
            self.commands.append(cmd)
            self.points.append({**params, "nproc": nproc, "command": cmd, "record": record})
            return record
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "record.json")
            cmd, proc, seconds = lab.run_strategy(entry, nproc, flags, path)
            if proc.returncode == 0:
                with open(path) as f:
                    record = json.load(f)
        self.commands.append(cmd)
        if proc.returncode:
            errors = lab.failure_lines(proc)
            self.failed.append({**params, "nproc": nproc, "command": cmd, "errors": errors})
            print(f"  {label:<52} FAILED (exit {proc.returncode}, {seconds:.1f} s): "
                  + "\n    ".join(errors), flush=True)
            return None
        print(f"  {label:<52} ok ({seconds:.1f} s)", flush=True)
        self.points.append({**params, "nproc": nproc, "command": cmd, "record": record})
        DONE[same] = cmd, record
        return record

    def write(self, rows, columns, **extra):
        """Print rows as a table (columns: (heading, key, format)), write the JSON and plot."""
        print(lab.aligned([[c[0] for c in columns]]
                    + [[cell(r.get(key), fmt) for _, key, fmt in columns] for r in rows]))
        stem = os.path.join(self.out, self.name)
        result = {"sweep": self.name, "sizes": self.sizes, "results": rows, **extra,
                  "provenance": lab.provenance(self.nproc, self.runs_on),
                  "commands": self.commands, "failed": self.failed, "points": self.points}
        write_json(result, stem + ".json")
        if rows:
            getattr(plots, self.name)(rows, stem + ".png", self.caption())
        for path in [stem + ".json"] + [stem + ".png"] * bool(rows) + extra.get("timelines", []):
            print(f"wrote {path}")
        print(flush=True)
        return 1 if self.failed else 0

    def caption(self):
        s = self.sizes
        layers = s["layers"] or "2/rank"
        model = f"gpt, sequence {s['seq_len']}, {layers} blocks" if self.model == "gpt" else \
            f"input {s['input_dim']}, {layers} layers"
        return f"batch {s['batch_size']}, {model}, {s['steps']} steps; {self.runs_on}"


def cell(value, fmt):
    """A table cell: "-" for no value, per-rank lists as a/b/..."""
    if value is None:
        return "-"
    return "/".join(fmt.format(v) for v in value) if isinstance(value, list) else fmt.format(value)


def step(sweep):
    """Step time, samples/s and model TFLOP/s vs hidden width, with each rank's activations
    measured and (gpt) analytic. The reference is the single-process step each driver times on
    rank 0 alone; per width it is the median over that width's runs."""
    s = sweep.sizes
    ms, records = {}, {}
    for hidden, nproc, entry in itertools.product(s["hidden_dims"], s["nproc"],
                                                  tensor_parallel(sweep.model)):
        name = entry.label
        record = sweep.run(entry, nproc, sweep.flags(hidden), strategy=name, hidden_dim=hidden)
        if record:
            ms[name, nproc, hidden] = record["step_time_s"] * 1e3
            records[name, nproc, hidden] = record
            ms.setdefault(("reference", 1, hidden), []).append(
                record["reference_step_time_s"] * 1e3)
    for key in [k for k in ms if k[0] == "reference"]:
        ms[key] = statistics.median(ms[key])
    rows = []
    for name, nproc, hidden in sorted(ms, key=lambda k: (k[2], k[0] != "reference")):
        t, native = ms[name, nproc, hidden], ms.get(("native TP", nproc, hidden))
        record = records.get((name, nproc, hidden), {})
        rows.append({"strategy": name, "nproc": nproc, "hidden_dim": hidden, "step_ms": t,
                     "samples_per_s": s["batch_size"] / t * 1e3,
                     "speedup_vs_reference": ms["reference", 1, hidden] / t,
                     "fused_over_native": t / native if name == "manual TP fused" and native
                     else None,
                     "gflops": record["tflops"] * 1e3 if record else None,
                     "mfu": record.get("mfu"),
                     "activation_mib": record.get("peak_activation_mib"),
                     "analytic_activation_mib": record.get("analytic_activation_mib")
                     if sweep.model == "gpt" else None})
    return sweep.write(rows, [
        ("strategy", "strategy", "{}"), ("ranks", "nproc", "{}"), ("hidden", "hidden_dim", "{}"),
        ("step ms", "step_ms", "{:.2f}"), ("samples/s", "samples_per_s", "{:,.0f}"),
        ("speedup vs reference", "speedup_vs_reference", "{:.2f}x"),
        ("fused/native step", "fused_over_native", "{:.2f}"),
        ("GFLOP/s", "gflops", "{:,.1f}"), ("MFU", "mfu", "{:.1%}"),
        ("activations MiB/rank", "activation_mib", "{:.2f}"),
        ("analytic", "analytic_activation_mib", "{:.2f}")])


def run_pipeline(sweep, p, entry, m, *extra):
    """One run of a pipeline entry on p ranks of the sweep's widest model, 2 layers per rank
    unless --layers says otherwise (None, not run, where 1F1B would refuse: m < p)."""
    schedule = entry.flag("--schedule")
    if schedule == "1f1b" and m < p:
        print(f"  skip schedule=1f1b microbatches={m}: 1F1B needs at least {p} (the ranks)")
        return None
    s = sweep.sizes
    return sweep.run(entry, p, sweep.flags(
        max(s["hidden_dims"]), "--microbatches", m, *extra, layers=s["layers"] or 2 * p),
        schedule=schedule, microbatches=m)


def bubble(sweep):
    """Measured bubble per schedule vs microbatches, beside this model's ideal (the schedule's
    order simulated with the run's own call times) and the closed form for equal stages;
    --timeline charts for the largest m."""
    s = sweep.sizes
    rows, timelines = [], []
    for p, entry, m in itertools.product(s["nproc"], PIPELINES, s["microbatches"]):
        schedule = entry.flag("--schedule")
        prefix = os.path.join(sweep.out, f"timeline-{schedule}-m{m}"
                              + (f"-p{p}" if len(s["nproc"]) > 1 else ""))
        record = run_pipeline(sweep, p, entry, m,
                              *["--timeline", prefix] * (m == max(s["microbatches"])))
        if record:
            b = record["bubble"]
            rows.append({"schedule": schedule, "nproc": p, "microbatches": m,
                         "virtual_stages": record["settings"]["virtual_stages"],
                         "measured": b["measured"], "ideal": b["ideal"], "theory": b["theory"],
                         "ratio": b["measured"] / b["ideal"], "span_ms": b["span_s"] * 1e3,
                         "ideal_span_ms": b["ideal_span_s"] * 1e3,
                         "per_rank": b["per_rank"]})
            timelines += b["files"] or []
    return sweep.write(rows, [
        ("schedule", "schedule", "{}"), ("ranks", "nproc", "{}"), ("m", "microbatches", "{}"),
        ("v", "virtual_stages", "{}"), ("measured", "measured", "{:.1%}"),
        ("ideal (this model)", "ideal", "{:.1%}"), ("measured / ideal", "ratio", "{:.2f}x"),
        ("equal stages", "theory", "{:.1%}"), ("step span ms", "span_ms", "{:.1f}"),
        ("ideal span ms", "ideal_span_ms", "{:.1f}")], timelines=timelines)


def comm(sweep):
    """Measured communication per step per rank vs tp_comm / pipeline_comm: payloads must agree
    exactly (a mismatch is a driver doing more or less than the design says)."""
    s = sweep.sizes
    chosen = [e for e in tensor_parallel(sweep.model) if "--no-fused" not in e.flags] \
        + [strategies.get("pipeline-gpipe")]
    rows = []
    for p, hidden, entry in itertools.product(s["nproc"], s["hidden_dims"], chosen):
        name, pipelined = entry.label, entry.kind == "pipeline"
        extra = ["--microbatches", max(s["microbatches"])] if pipelined else []
        record = sweep.run(entry, p, sweep.flags(hidden, *extra), strategy=name,
                           hidden_dim=hidden)
        for rank in range(p) if record else ():
            for op, want in sorted(run_comm(record, rank).items()):
                got = record["comm_bytes_per_step"][rank].get(op, 0)
                rows.append({"strategy": name, "nproc": p, "hidden_dim": hidden, "rank": rank,
                             "op": op, "count": record["comm_per_step"][rank].get(op, 0),
                             "count_analytic": want["count"], "bytes": got,
                             "bytes_analytic": want["bytes"], "ratio": got / want["bytes"],
                             "wire_bytes": ring_wire_bytes(op, want["bytes"], p)})
    merged = {}  # ranks with the same numbers share a row
    for r in rows:
        same = tuple(v for k, v in r.items() if k != "rank")
        merged.setdefault(same, {**r, "rank": []})["rank"].append(r["rank"])
    return sweep.write(list(merged.values()), [
        ("strategy", "strategy", "{}"), ("ranks", "nproc", "{}"), ("hidden", "hidden_dim", "{}"),
        ("rank(s)", "rank", "{}"), ("op", "op", "{}"), ("count", "count", "{}"),
        ("analytic", "count_analytic", "{}"), ("bytes", "bytes", "{:,}"),
        ("analytic", "bytes_analytic", "{:,}"), ("ratio", "ratio", "{:.2f}"),
        ("wire bytes sent", "wire_bytes", "{:,.0f}")])


def memory(sweep):
    """Peak activation memory per rank, GPipe vs 1F1B, vs microbatches, measured and analytic
    (partlab/theory/memory.py). GPipe keeps all m microbatches' activations until the backwards
    start; 1F1B at most p - rank of them, so on rank 0 the ratio should be m/p (1 while
    m <= p)."""
    rows = []
    for p, m in itertools.product(sweep.sizes["nproc"], sweep.sizes["microbatches"]):
        row = {"nproc": p, "microbatches": m, "expected_ratio_rank0": m / min(m, p)}
        for schedule in ("gpipe", "1f1b"):
            record = run_pipeline(sweep, p, strategies.get(f"pipeline-{schedule}"), m)
            if record:
                row[f"{schedule}_activation_mib"] = record["peak_activation_mib"]
                row[f"{schedule}_analytic_mib"] = record["analytic_activation_mib"]
                row[f"{schedule}_peak_memory_mib"] = record["peak_memory_mib"]
        if "gpipe_activation_mib" in row and "1f1b_activation_mib" in row:
            row["ratio"] = [g / f for g, f in zip(row["gpipe_activation_mib"],
                                                  row["1f1b_activation_mib"], strict=True)]
            rows.append(row)
    return sweep.write(rows, [
        ("ranks", "nproc", "{}"), ("m", "microbatches", "{}"),
        ("gpipe act MiB/rank", "gpipe_activation_mib", "{:.2f}"),
        ("1f1b act MiB/rank", "1f1b_activation_mib", "{:.2f}"),
        ("analytic gpipe", "gpipe_analytic_mib", "{:.2f}"),
        ("analytic 1f1b", "1f1b_analytic_mib", "{:.2f}"),
        ("gpipe/1f1b per rank", "ratio", "{:.2f}"),
        ("m/p (rank 0)", "expected_ratio_rank0", "{:.2f}"),
        ("peak MiB gpipe", "gpipe_peak_memory_mib", "{:.0f}"),
        ("peak MiB 1f1b", "1f1b_peak_memory_mib", "{:.0f}")])


def under_overhead_benchmark(entry):
    """`entry` run by partlab/bench_overhead.py instead of its own driver."""
    return dataclasses.replace(entry, module="partlab.bench_overhead",
                               flags=("--strategy", entry.key))


def overhead(sweep):
    """The drivers' step as they measure it vs a bare loop of the same strategy, same run
    (partlab/bench_overhead.py): target at most +5 %. The whole loop also pays for the last
    step, which counts collectives and saved activations under Python hooks."""
    s = sweep.sizes
    m = max(s["microbatches"])
    chosen = [strategies.get(k) for k in ("tp-native", "tp-manual", "pipeline-gpipe",
                                          "pipeline-1f1b")]
    rows = []
    for p, entry in itertools.product(s["nproc"], chosen):
        extra = ["--microbatches", m] if entry.kind == "pipeline" else []
        result = sweep.run(under_overhead_benchmark(entry), p,
                           sweep.flags(max(s["hidden_dims"]), *extra), strategy=entry.label)
        if result:
            rows.append({"strategy": entry.label, "nproc": p,
                         "step_ms": statistics.median(result["reported_step_s"]) * 1e3,
                         "bare_step_ms": statistics.median(result["bare_step_s"]) * 1e3,
                         "step_overhead": result["step_overhead"],
                         "loop_overhead": result["loop_overhead"]})
    return sweep.write(rows, [
        ("strategy", "strategy", "{}"), ("ranks", "nproc", "{}"),
        ("driver step ms", "step_ms", "{:.2f}"), ("bare step ms", "bare_step_ms", "{:.2f}"),
        ("step overhead", "step_overhead", "{:+.1%}"),
        ("whole loop", "loop_overhead", "{:+.1%}")])


SWEEPS = {"step": step, "bubble": bubble, "comm": comm, "memory": memory, "overhead": overhead}
