"""`partlab plan --validate`: the planner's model (partlab/theory/step.py) against the lab's own
runs on this machine. The lab's configurations run as a user runs them; after each,
partlab/calibrate.py measures what the model takes as given (the compute of its stage calls,
what its schedule adds to a call, gloo's collectives and messages, the memory's bandwidth).
The model composes these into a step (the schedule's order, the collectives, the messages,
the optimizer) and each run prints its predicted step time, communication bytes and
activation memory next to the measured.

Targets: step time within +-25 %, communication bytes exact, activations within +-10 %. The
bytes and the activations are deterministic: a miss exits 1. Step times are measurements: they
are printed, never asserted.
"""
import dataclasses
import json
import os
import statistics
import sys
import tempfile

from partlab import lab, strategies
from partlab.calibrate import PROCESSES, calibrate
from partlab.config import Settings
from partlab.partition import stage_layers
from partlab.report import write_json
from partlab.theory import comm
from partlab.theory.step import Layout, activation_bytes, predict, replica_settings

# The lab's models: the handout's MLP (4 layers), the bubble target's width, the lab's gpt.
MODELS = {"mlp": ["--batch-size", "64", "--input-dim", "1024", "--hidden-dim", "2048",
                  "--num-classes", "10", "--layers", "4", "--steps", "10"],
          "mlp-4096": ["--batch-size", "512", "--input-dim", "1024", "--hidden-dim", "4096",
                       "--num-classes", "10", "--layers", "4", "--steps", "10"],
          "gpt": ["--model", "gpt", "--steps", "10"]}
QUICK = {"mlp": ["--batch-size", "16", "--input-dim", "32", "--hidden-dim", "64",
                 "--num-classes", "10", "--layers", "4", "--steps", "3"],
         "gpt": ["--model", "gpt", "--steps", "3"]}
QUICK["mlp-4096"] = QUICK["mlp"]
M4, M8 = ("--microbatches", "4"), ("--microbatches", "8")
# (label, registry key, model, flags)
RUNS = [("MLP, manual TP", "tp-manual", "mlp", ()),
        ("MLP, GPipe m=4", "pipeline-gpipe", "mlp", M4),
        ("MLP, 1F1B m=4", "pipeline-1f1b", "mlp", M4),
        ("MLP, interleaved 1F1B m=4", "pipeline-interleaved-1f1b", "mlp", M4),
        ("MLP, zero-bubble m=4", "pipeline-zero-bubble", "mlp", M4),
        ("MLP 4096, GPipe m=8", "pipeline-gpipe", "mlp-4096", M8),
        ("MLP 4096, 1F1B m=8", "pipeline-1f1b", "mlp-4096", M8),
        ("gpt, manual TP", "tp-manual", "gpt", ()),
        ("gpt, native TP + SP", "tp-native", "gpt", ("--sequence-parallel",)),
        ("gpt, GPipe m=4", "pipeline-gpipe", "gpt", ()),
        ("gpt, 1F1B m=4", "pipeline-1f1b", "gpt", ())]
QUICK_RUNS = ("MLP, manual TP", "MLP, zero-bubble m=4", "gpt, native TP + SP")


def stage_calls(record):
    """The stage calls a run's ranks make: [settings, (first layer, end), tp, impl] per
    stage; a tensor-parallel run's one stage is the whole model."""
    layout, s = layout_of(record), record["settings"]
    total = layout.pp * layout.virtual
    return [[s, (r[0], r[-1] + 1), layout.tp, comm.tp_impl(record)]
            for r in (stage_layers(s["layers"], st, total) for st in range(total))]


def schedule_of(record):
    """A pipeline run's (schedule, microbatches, chunks per rank): what calibrate times."""
    s = record["settings"]
    return s["schedule"], s["microbatches"], s["virtual_stages"]


def layout_of(record):
    s = record["settings"]
    if record["pipeline_ranks"]:
        return Layout(1, record["pipeline_ranks"], 1, s["microbatches"], s["schedule"],
                      s["virtual_stages"])
    return Layout(record["world_size"], 1, 1, 1, "gpipe",
                  sequence_parallel=s["sequence_parallel"])


def analytic_comm(record):
    return [{op: c["bytes"] for op, c in comm.run_comm(record, r).items()}
            for r in range(record["world_size"])]


def run(label, key, flags):
    """The record of one run of strategy `key` with `flags`, or None (said why) if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "record.json")
        _, proc, _ = lab.run_strategy(strategies.get(key), PROCESSES, flags, path)
        if proc.returncode:
            print(f"partlab: error: {label} failed:\n" + "\n".join(lab.failure_lines(proc)),
                  file=sys.stderr)
            return None
        with open(path) as f:
            return json.load(f)


def median_row(repeats):
    """One configuration's repeats as one row: the median measured and predicted step, the
    median of the repeats' ratios (each a run against its own calibration), each ratio, and
    every repeat whole."""
    row = dict(repeats[0])
    row["step_ms"] = statistics.median(r["step_ms"] for r in repeats)
    row["predicted_step_ms"] = statistics.median(r["predicted_step_ms"] for r in repeats)
    row["step_ratio"] = statistics.median(r["step_ratio"] for r in repeats)
    row["step_ratios"] = " ".join(f"{r['step_ratio']:.2f}" for r in repeats)
    row["comm_exact"] = all(r["comm_exact"] for r in repeats)
    row["repeats"] = repeats
    for key in ("predicted", "machine", "schedule_call_s", "calibration"):
        del row[key]
    return row


def compare(label, record, machine, stage_s, call_s):
    """One run's predicted-vs-measured row; stage_s: its stage calls' measured seconds, call_s
    what its schedule adds to each."""
    s = Settings(**record["settings"])
    layout = layout_of(record)
    predicted = predict(s, layout, machine, state_bytes=8, compute_s=lambda st: stage_s[st],
                        impl=comm.tp_impl(record), call_s=call_s)
    per_rank = [activation_bytes(replica_settings(s, layout), rank, layout.pp, layout.tp, False)
                for rank in range(layout.pp)]
    activations = None if None in per_rank else max(per_rank) / 2**30
    measured_mib = max(record["peak_activation_mib"])
    return {"run": label, "strategy": record["strategy"], "layout": layout.describe(),
            "step_ms": record["step_time_s"] * 1e3,
            "predicted_step_ms": predicted["time_s"]["step"] * 1e3,
            "step_ratio": predicted["time_s"]["step"] / record["step_time_s"],
            "predicted": predicted["time_s"],
            "comm_bytes": sum(sum(r.values()) for r in record["comm_bytes_per_step"]),
            "comm_exact": record["comm_bytes_per_step"] == analytic_comm(record),
            "activation_mib": measured_mib,
            "predicted_activation_mib": None if activations is None else activations * 1024,
            "activation_ratio": None if activations is None else
            activations * 1024 / measured_mib}


def main(args):
    from partlab.bench import cell
    rows = []
    for label, key, model, flags in RUNS:
        if args.quick and label not in QUICK_RUNS:
            continue
        flags = [*(QUICK if args.quick else MODELS)[model], *flags]
        repeats = []
        for _ in range(args.repeats):
            record = run(label, key, flags)
            if record is None:
                return 1
            # Calibrated at once, so that both see the machine at one speed: this VM's drifts
            # by tens of percent within minutes.
            schedules = [list(schedule_of(record))] if record["pipeline_ranks"] else []
            machine, overhead, measured = calibrate(stage_calls(record), schedules)
            call_s = overhead[schedule_of(record)] if schedules else 0.0
            repeats.append({**compare(label, record, machine, measured["stages"], call_s),
                            "machine": dataclasses.asdict(machine), "schedule_call_s": call_s,
                            "calibration": measured})
            m = machine
            print(f"  {label}: ran; calibrated: matmul {m.peak_tflops * 1e3:,.1f} GFLOP/s, "
                  f"memory {m.memory_gbps:,.1f} GB/s, a collective {m.call_latency_us:,.0f} us "
                  f"a call + {m.intra_latency_us:,.0f} us a message + {m.intra_gbps:,.2f} GB/s, "
                  f"a message point to point {m.p2p_latency_us:,.0f} us"
                  + (f", the schedule {call_s * 1e6:,.0f} us a call" if schedules else "")
                  + f"; predicted/measured {repeats[-1]['step_ratio']:.2f}", flush=True)
        rows.append(median_row(repeats))
    columns = [("run", "run", "{}"), ("layout", "layout", "{}"),
               ("step ms", "step_ms", "{:.1f}"), ("predicted", "predicted_step_ms", "{:.1f}"),
               ("predicted/measured", "step_ratio", "{:.2f}"),
               ("each repeat", "step_ratios", "{}"),
               ("comm bytes/step", "comm_bytes", "{:,}"), ("exact", "comm_exact", "{}"),
               ("activations MiB", "activation_mib", "{:.2f}"),
               ("predicted", "predicted_activation_mib", "{:.2f}"),
               ("ratio", "activation_ratio", "{:.3f}")]
    print(lab.aligned([[c[0] for c in columns]]
                      + [[cell(r[key], fmt) for _, key, fmt in columns] for r in rows]))
    within = sum(0.75 <= r["step_ratio"] <= 1.25 for r in rows)
    print(f"step time within +-25 %: {within} of {len(rows)} runs")
    if args.json:
        write_json({"runs": rows, "provenance": lab.provenance(PROCESSES, "CPU, gloo")},
                   args.json)
    misses = [r["run"] for r in rows for x in r["repeats"] if not x["comm_exact"]
              or x["activation_ratio"] is not None and not 0.9 <= x["activation_ratio"] <= 1.1]
    misses = list(dict.fromkeys(misses))
    if misses:
        print("partlab: error: communication not exact or activations beyond +-10 % in: "
              + ", ".join(misses), file=sys.stderr)
        return 1
    return 0
