"""`partlab plan --validate`: the planner's model (partlab/theory/step.py) against the lab's own
runs on this machine. The lab's configurations run as a user runs them; then a
micro-benchmark measures what the model takes as given, as two processes see it, both busy at
once as in a run: a process's matmul peak, each stage's forward and backward of one microbatch
alone (no communication; on CPU a small layer's rate depends on its shape, so the stages are
timed rather than their FLOPs assumed), the memory's bandwidth, gloo's all_reduce latency and
bandwidth and a message's latency (its bytes at the all_reduce's bandwidth). The model
composes these into a step (the schedule's order, the all_reduces, the messages, the
optimizer) and each run prints its predicted step time, communication bytes and activation
memory next to the measured.

Targets: step time within +-25 %, communication bytes exact, activations within +-10 %. The
bytes and the activations are deterministic: a miss exits 1. Step times are measurements: they
are printed, never asserted. (Some 300 lines: the calibration worker, which torchrun launches
as this module, sits with the comparison it serves.)
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from partlab import lab, strategies
from partlab import model as models
from partlab.config import Settings
from partlab.harness import matmul_tflops
from partlab.partition import stage_layers
from partlab.report import write_json
from partlab.theory import comm
from partlab.theory.step import Layout, Machine, activation_bytes, predict, replica_settings

PROCESSES = 2
# Bytes: a latency-bound size, and one whose bandwidth term (~20 ms on gloo) dwarfs the noise.
SIZES = (4096, 16 * 2**20)
# The lab's models: the handout's MLP (4 layers), the bubble target's width, the lab's gpt.
MODELS = {"mlp": ["--batch-size", "64", "--input-dim", "1024", "--hidden-dim", "2048",
                  "--num-classes", "10", "--layers", "4", "--steps", "5"],
          "mlp-4096": ["--batch-size", "512", "--input-dim", "1024", "--hidden-dim", "4096",
                       "--num-classes", "10", "--layers", "4", "--steps", "5"],
          "gpt": ["--model", "gpt", "--steps", "5"]}
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


STREAM = 2**24                              # floats a memory-bandwidth pass adds


def median_seconds(once, repeats=7):
    """The median call, every rank calling at once (a barrier first): in a run the ranks
    compute together, and two processes can share what one alone would have."""
    once()
    dist.barrier()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def stage_module(s, layers, tp):
    """What one rank of a stage of `layers` computes, as plain modules, and its input: the
    MLP's layers with a tensor-parallel rank's shard shapes (column layers 1/t of the outputs,
    row layers 1/t of the inputs); the gpt's stage whole (tp: see `compare`)."""
    batch = s.batch_size // (s.microbatches or 1)
    if s.model == "gpt":
        module = models.build_model(s, torch.device("cpu"), keep=layers)
        x = torch.randint(s.vocab_size, (batch, s.seq_len)) if layers[0] == 0 else \
            torch.randn(batch, s.seq_len, s.hidden_dim, requires_grad=True)
        return module, x, torch.randint(s.vocab_size, (batch, s.seq_len))
    dims = models.mlp_dims(s)
    linears = [torch.nn.Linear(dims[i] // (1 if i % 2 == 0 else tp),
                               dims[i + 1] // (tp if i % 2 == 0 else 1)) for i in layers]
    x = torch.randn(batch, dims[layers[0]] // (1 if layers[0] % 2 == 0 else tp),
                    requires_grad=layers[0] > 0)
    return Layers(linears, [i < s.layers - 1 for i in layers], s.activation), x, \
        torch.randint(s.num_classes, (batch,))


class Layers(torch.nn.Module):
    """Linear layers, each that `activated` says followed by the activation."""

    def __init__(self, linears, activated, activation):
        super().__init__()
        self.linears, self.activated = torch.nn.ModuleList(linears), activated
        self.act = models.activation_fn(activation)

    def forward(self, x):
        for linear, activated in zip(self.linears, self.activated, strict=True):
            x = self.act(linear(x)) if activated else linear(x)
        return x


def stage_seconds(s, layers, tp):
    """(forward, backward) seconds of a microbatch through the stage; the last stage's loss in
    its forward."""
    module, x, target = stage_module(s, layers, tp)
    last = layers[-1] == s.layers - 1

    def forward():
        out = module(x)
        return models.loss_fn(out, target) if last else out.float().sum()

    def both():
        module.zero_grad(set_to_none=True)
        forward().backward()
    f = median_seconds(forward)
    return f, max(median_seconds(both) - f, 0.0)


def worker(calls_path, out):
    """Each of PROCESSES ranks, all at once: the matmul peak, each stage call in `calls_path`
    (JSON [[settings, layers, tp], ...]) and a memory pass; then rank 0's view of all_reduce and
    of a ping-pong's one-way send, per size."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    dist.barrier()
    rate = matmul_tflops(torch.device("cpu"), torch.float32)
    with open(calls_path) as f:
        calls = json.load(f)
    stages = [stage_seconds(Settings(**settings), range(*layers), tp)
              for settings, layers, tp in calls]
    a, b = torch.zeros(STREAM), torch.ones(STREAM)
    stream = median_seconds(lambda: a.add_(b))
    times = {"all_reduce": {}, "send": {}}
    for size in SIZES:
        x = torch.zeros(size // 4)
        for op, once in (("all_reduce", dist.all_reduce), ("send", ping_pong)):
            times[op][size] = median_seconds(lambda call=once, x=x: call(x), 20) \
                / (2 if op == "send" else 1)
    if dist.get_rank() == 0:
        write_json({"tflops": rate, "stages": stages, "stream_s": stream, "seconds": times},
                   out)
    dist.destroy_process_group()


def ping_pong(x):
    if dist.get_rank() == 0:
        dist.send(x, 1)
        dist.recv(x, 1)
    else:
        dist.recv(x, 0)
        dist.send(x, 0)


def fit(seconds, steps):
    """(latency in us, GB/s) from the two sizes' times: steps x latency + bytes / bandwidth."""
    (small, t_small), (large, t_large) = sorted(seconds.items())
    per_byte = (t_large - t_small) / (large - small)
    if per_byte <= 0:
        raise SystemExit(f"partlab: error: the calibration's {large:,}-byte messages took no "
                         f"longer than its {small:,}-byte ones ({t_large * 1e3:.2f} vs "
                         f"{t_small * 1e3:.2f} ms): the machine is too busy to measure; run "
                         "again when it is quieter")
    return max(t_small - small * per_byte, 0) / steps * 1e6, 1 / per_byte / 1e9


def calibrate(calls):
    """This machine as the planner sees it, measured with PROCESSES gloo processes, and the
    (forward, backward) seconds of each stage call [settings, layers, tp] in `calls`."""
    with tempfile.TemporaryDirectory() as tmp:
        out, calls_path = os.path.join(tmp, "calibration.json"), os.path.join(tmp, "calls.json")
        write_json(calls, calls_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(PROCESSES), "-m", "partlab.plan_validate", calls_path, out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit("partlab: error: the calibration failed:\n"
                             + "\n".join(lab.failure_lines(proc)))
        with open(out) as f:
            measured = json.load(f)
    seconds = {op: {int(k): v for k, v in by_size.items()}
               for op, by_size in measured["seconds"].items()}
    # A ring all_reduce on 2 ranks: 2 steps, each rank sending half the payload per step.
    latency, gbps = fit(seconds["all_reduce"], 2)
    p2p_latency, _ = fit(seconds["send"], 1)
    machine = Machine(name="this machine (gloo, CPU)", gpus_per_node=PROCESSES,
                      memory_gib=float("inf"), peak_tflops=measured["tflops"], efficiency=1.0,
                      intra_gbps=gbps, inter_gbps=gbps, intra_latency_us=latency,
                      inter_latency_us=latency, p2p_latency_us=p2p_latency,
                      memory_gbps=3 * 4 * STREAM / measured["stream_s"] / 1e9)
    return machine, measured


def stage_calls(record):
    """The stage calls a run's ranks make: [settings, (first layer, end), tp] per stage. A gpt
    tensor-parallel rank is timed whole, and `compare` takes 1/t of it."""
    layout, s = layout_of(record), record["settings"]
    total = layout.pp * layout.virtual
    tp = 1 if s["model"] == "gpt" else layout.tp
    return [[s, (r[0], r[-1] + 1), tp]
            for r in (stage_layers(s["layers"], st, total) for st in range(total))]


def layout_of(record):
    s = record["settings"]
    if record["bubble"]:
        return Layout(1, record["pipeline_ranks"], 1, s["microbatches"], s["schedule"],
                      s["virtual_stages"])
    return Layout(record["world_size"], 1, 1, 1, "gpipe",
                  sequence_parallel=s["sequence_parallel"])


def analytic_comm(record):
    return [{op: c["bytes"] for op, c in comm.run_comm(record, r).items()}
            for r in range(record["world_size"])]


def compare(label, record, machine, stage_s):
    """One run's predicted-vs-measured row; stage_s: its stage calls' measured seconds."""
    s = Settings(**record["settings"])
    layout = layout_of(record)
    share = layout.tp if s.model == "gpt" else 1
    predicted = predict(s, layout, machine, state_bytes=8,
                        compute_s=lambda stage: [x / share for x in stage_s[stage]])
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
    records = {}
    for label, key, model, flags in RUNS:
        if args.quick and label not in QUICK_RUNS:
            continue
        flags = [*(QUICK if args.quick else MODELS)[model], *flags]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "record.json")
            _, proc, _ = lab.run_strategy(strategies.get(key), PROCESSES, flags, path)
            if proc.returncode:
                print(f"partlab: error: {label} failed:\n" + "\n".join(lab.failure_lines(proc)),
                      file=sys.stderr)
                return 1
            with open(path) as f:
                records[label] = json.load(f)
        print(f"  {label}: ran", flush=True)
    calls = {label: stage_calls(record) for label, record in records.items()}
    machine, measured = calibrate([c for mine in calls.values() for c in mine])
    m = machine
    print(f"calibration ({PROCESSES} gloo processes, each): matmul {m.peak_tflops * 1e3:,.1f} "
          f"GFLOP/s; memory {m.memory_gbps:,.1f} GB/s; all_reduce {m.intra_latency_us:,.0f} us "
          f"a step + {m.intra_gbps:,.2f} GB/s; a message {m.p2p_latency_us:,.0f} us; "
          f"{len(measured['stages'])} stage calls timed", flush=True)
    timed, rows = iter(measured["stages"]), []
    for label, record in records.items():
        stage_s = [next(timed) for _ in calls[label]]
        rows.append(compare(label, record, machine, stage_s))
    columns = [("run", "run", "{}"), ("layout", "layout", "{}"),
               ("step ms", "step_ms", "{:.1f}"), ("predicted", "predicted_step_ms", "{:.1f}"),
               ("predicted/measured", "step_ratio", "{:.2f}"),
               ("comm bytes/step", "comm_bytes", "{:,}"), ("exact", "comm_exact", "{}"),
               ("activations MiB", "activation_mib", "{:.2f}"),
               ("predicted", "predicted_activation_mib", "{:.2f}"),
               ("ratio", "activation_ratio", "{:.3f}")]
    print(lab.aligned([[c[0] for c in columns]]
                      + [[cell(r[key], fmt) for _, key, fmt in columns] for r in rows]))
    within = sum(0.75 <= r["step_ratio"] <= 1.25 for r in rows)
    print(f"step time within +-25 %: {within} of {len(rows)} runs")
    if args.json:
        write_json({"machine": dataclasses.asdict(machine), "calibration": measured,
                    "runs": rows, "provenance": lab.provenance(PROCESSES, "CPU, gloo")},
                   args.json)
    misses = [r["run"] for r in rows if not r["comm_exact"] or r["activation_ratio"] is not None
              and not 0.9 <= r["activation_ratio"] <= 1.1]
    if misses:
        print("partlab: error: communication not exact or activations beyond +-10 % in: "
              + ", ".join(misses), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
