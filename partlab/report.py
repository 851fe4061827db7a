"""The report of a run: train the single-device reference beside the strategy, compare them,
and turn what every rank measured into one typed record that rank 0 prints and writes (--json).
"""
import dataclasses
import json
import math
import os
import statistics
import sys

import torch
import torch.distributed as dist

from partlab import checkpoint, nvidia
from partlab import model as models
from partlab import timeline as pipeline_timeline
from partlab.config import default_lr, require
from partlab.harness import matmul_tflops, peak_memory_mib, run_steps, timed_steps
from partlab.theory.compute import flops_per_step

# Tolerances against the reference (max abs difference after all steps).
# fp32: sharding reorders sums (TP splits each dot product into world-size partial sums joined
# by all_reduce; the pipeline splits the batch mean into microbatch means). Each reordering moves
# a result by a few ulps (~1e-7 relative); after 5 SGD steps losses agree to ~2e-7 and
# parameters to ~1e-8. Rarely a pre-activation lies within rounding of 0 and its ReLU flips
# between the two runs: that unit's gradient then differs by a whole term, and over 20 steps at
# --hidden-dim 4096 a weight moved 1.7e-5 (losses still within 5e-7). Hence 1e-5 for losses,
# 1e-4 for parameters: both 8x or more below what a real bug produces (manual TP without its
# forward all_reduce: |dloss| 8.6e-3, |dparam| 7.8e-4 after 3 steps of the tests' small MLP).
# bf16: 8 mantissa bits (eps 7.8e-3), so one reordered rounding moves a value by ~4e-3
# relative; losses (~2.3) may differ by a few 1e-2 and weights (|w| < 0.05) by ~1e-3.
TOLERANCE = {"fp32": {"loss": 1e-5, "param": 1e-4}, "bf16": {"loss": 5e-2, "param": 5e-3}}


def tolerance(settings):
    """The run's tolerances. AdamW divides each gradient element by its own running RMS, so an
    element whose gradient is rounding noise (a unit no sample activates) still moves by up to
    --lr a step, in whatever direction the noise points: two orderings of the same sums can
    leave such a weight 2 lr apart per step (handout MLP, hidden 1024, 10 steps at 1e-3: 2.4e-3,
    with the losses 6e-7 apart). Its parameter tolerance is therefore lr x steps; the loss's
    stays, and still catches a real bug."""
    tol = dict(TOLERANCE[settings.dtype])
    if settings.optimizer == "adamw":
        tol["param"] = max(tol["param"], settings.lr * settings.steps)
    return tol


@dataclasses.dataclass
class Checkpoints:
    """What --checkpoint-dir cost this run (rank 0's clock; each save ends in a barrier)."""

    save_s: list[float]            # each save's wall time, outside the timed steps
    bytes: int | None              # the last checkpoint's files, all ranks together
    load_s: float | None           # reading the checkpoint a resumed run started from


@dataclasses.dataclass
class Record:
    """One run, as rank 0 prints it and writes it with --json. Per-rank fields are lists
    indexed by rank; comm_* map a collective's name to its count (or bytes) per step."""

    strategy: str
    world_size: int
    backend: str
    device: str
    dtype: str
    losses: list[float]
    reference_losses: list[float]
    max_abs_dloss: float
    max_abs_dparam: float
    tolerance: dict[str, float]
    ok: bool
    step_time_s: float
    reference_step_time_s: float
    samples_per_s: float
    model_flops_per_step: int      # theory.compute.flops_per_step: the maths, any layout
    tflops: float                  # model FLOPs per step / step time: all ranks together
    matmul_peak_tflops: float      # a square matmul on rank 0's device, measured in this run
    datasheet_peak_tflops: float | None   # the GPU's datasheet peak in the run's dtype, if known
    mfu: float                     # tflops / (world size x the datasheet peak, else the matmul's)
    peak_memory_mib: list[float]
    peak_activation_mib: list[float | None]
    analytic_activation_mib: list[float | None]   # the model's count for the rank, when known
    comm_per_step: list[dict[str, int]]
    comm_in_backward: list[dict[str, int]]
    comm_bytes_per_step: list[dict[str, int]]
    settings: dict
    pipeline_ranks: int | None = None
    stage_layers: list[list[int]] | None = None
    tp: int | None = None
    bubble: pipeline_timeline.Bubble | None = None
    # Where the workers' process group met (MASTER_ADDR:MASTER_PORT, as torchrun set them).
    store: str | None = None
    first_step: int = 1            # the step losses[0] is (above 1 when resumed)
    checkpoints: Checkpoints | None = None

    def to_json(self):
        return dataclasses.asdict(self)


def train_and_report(build, settings, group):
    """A driver's work (distributed.run): build(settings, group) -> Strategy, train it under the
    harness, compare it with the reference and report. Returns the exit status."""
    strategy = build(settings, group)
    start = checkpoint.check(settings)     # checked before the group, read again here
    chosen = torch.tensor([start], device=group.device)
    dist.broadcast(chosen, src=0)
    require(int(chosen) == start, f"rank {group.rank} finds step {start} the newest checkpoint "
            f"in --checkpoint-dir, rank 0 step {int(chosen)}: every rank must see the same "
            "directory (one file system shared by the nodes)")
    load_s = checkpoint.load(strategy.train_state, settings, start) if start else None
    saver = checkpoint.Saver(strategy.train_state, settings, group.rank) \
        if settings.checkpoint_dir else None
    trace = run_steps(settings, group.device, strategy.step, strategy.params.values(),
                      strategy.timeline, start=start, after_step=saver)
    saved = Checkpoints(saver.seconds, saver.bytes, load_s) if saver else None
    return finish(strategy, settings, group, trace, start, saved)


def max_abs_diff(pairs):
    return max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.numel()),
               default=0.0)


def finish(strategy, settings, group, trace, start=0, checkpoints=None):
    """Compare this run (steps start + 1 .. --steps; start > 0 when resumed) with the reference,
    print the summary on rank 0, write --json (and the pipeline's --timeline files). Returns the
    exit status (1 when --check and beyond tolerance)."""
    peak_mib = peak_memory_mib(group.device)
    # The reference runs on every rank (same device, same seed), after the strategy so it
    # does not count in the strategy's peak memory. On CPU rank 0 times it alone while the
    # others wait (so their --timeout must cover it): its step time is then one process's, not
    # slowed by the other ranks sharing the machine's cores. (GPUs are not shared.)
    ref_model = models.build_model(settings, group.device)
    ref_step = models.reference_step_fn(
        ref_model, settings, models.make_optimizer(ref_model.parameters(), settings))
    alone = group.device.type == "cpu"
    if alone and group.rank != 0:
        dist.barrier()
    ref = run_steps(settings, group.device, ref_step)
    # A peak measured on rank 0, alone on CPU like the reference: what MFU is against where
    # the device has no datasheet figure (a CPU, an unlisted GPU).
    peak = matmul_tflops(group.device, models.DTYPES[settings.dtype]) if group.rank == 0 else None
    datasheet = nvidia.datasheet_tflops(torch.cuda.get_device_name(group.device), settings.dtype) \
        if group.device.type == "cuda" else None
    if alone and group.rank == 0:
        dist.barrier()
    ref_params = dict(ref_model.named_parameters())
    dparam = max_abs_diff((p.detach(), strategy.reference_slice(n, ref_params[n].detach()))
                          for n, p in strategy.params.items())

    # Post-run bookkeeping (not part of any step): bring the numbers to rank 0.
    loss_t = torch.tensor(trace.losses, dtype=torch.float64, device=group.device)
    dist.broadcast(loss_t, src=strategy.loss_rank)
    stats = torch.tensor([dparam, statistics.median(timed_steps(trace.times))],
                         dtype=torch.float64, device=group.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    per_rank = [None] * group.world_size
    activation_mib = trace.activations.peak / 2**20 if trace.activations else None
    analytic_mib = strategy.activation_bytes / 2**20 if strategy.activation_bytes else None
    events = strategy.timeline.events if strategy.timeline else []
    dist.all_gather_object(per_rank, (peak_mib, dict(trace.comm.total), dict(trace.comm.backward),
                                      dict(trace.comm.bytes), activation_mib, events,
                                      analytic_mib))
    if group.rank != 0:
        return 0

    losses = loss_t.tolist()
    dparam, step_s = stats.tolist()
    ref_losses = ref.losses[start:]
    dloss = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    tol = tolerance(settings)
    layout = strategy.layout
    flops = flops_per_step(settings)
    tflops = flops / step_s / 1e12
    record = Record(
        strategy=strategy.name, world_size=group.world_size, backend=group.backend,
        device=group.device.type, dtype=settings.dtype,
        losses=losses, reference_losses=ref_losses, max_abs_dloss=dloss, max_abs_dparam=dparam,
        tolerance=tol, ok=dloss <= tol["loss"] and dparam <= tol["param"],
        step_time_s=step_s, reference_step_time_s=statistics.median(timed_steps(ref.times)),
        samples_per_s=settings.batch_size / step_s,
        model_flops_per_step=flops, tflops=tflops, matmul_peak_tflops=peak,
        datasheet_peak_tflops=datasheet, mfu=tflops / (group.world_size * (datasheet or peak)),
        peak_memory_mib=[r[0] for r in per_rank], peak_activation_mib=[r[4] for r in per_rank],
        analytic_activation_mib=[r[6] for r in per_rank],
        comm_per_step=[r[1] for r in per_rank], comm_in_backward=[r[2] for r in per_rank],
        comm_bytes_per_step=[r[3] for r in per_rank], settings=dataclasses.asdict(settings),
        pipeline_ranks=layout.ranks if layout else None,
        stage_layers=layout.stage_layers if layout else None, tp=layout.tp if layout else None,
        store=f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if "MASTER_ADDR" in os.environ else None, first_step=start + 1, checkpoints=checkpoints)
    if strategy.timeline:
        events = [(rank, *e) for rank, r in enumerate(per_rank) for e in r[5]]
        record.bubble = pipeline_timeline.measure(
            events, settings, layout.ranks, group.world_size,
            timed_steps(sorted({e[1] for e in events})), strategy.timeline.clock.name,
            record.strategy)
    print_summary(record)
    if settings.json:
        write_json(record.to_json(), settings.json)
    if settings.check and not record.ok:
        print(f"partlab: error: {failure_reason(record, settings)}", file=sys.stderr, flush=True)
        return 1
    return 0


def write_json(data, path):
    """Write through a temporary file and rename, so `path` is never left half-written."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(partial, path)


def failure_reason(record, settings):
    """Why --check failed: the reference itself diverged (too high a learning rate), or the
    strategy differs from a reference that trained normally (a parallelism bug)."""
    first = record.reference_losses[0]
    worst = max(record.reference_losses, key=lambda v: math.inf if math.isnan(v) else v)
    if not math.isfinite(worst) or worst > 10 * first:
        default = default_lr(settings.model, settings.optimizer)
        return (f"the run diverged (the reference's own loss went from {first:.3g} to "
                f"{worst:.3g}), so float rounding no longer bounds the difference: lower --lr "
                f"(now {settings.lr:g}; default {default:g})")
    return f"{record.strategy} deviates from the reference beyond tolerance"


def comm_summary(total, backward, size):
    if not total:
        return "none"
    return ", ".join(f"{op} x{n} ({backward.get(op, 0)} in backward, {size.get(op, 0):,} bytes)"
                     for op, n in sorted(total.items()))


def print_summary(r):
    s = r.settings
    print(f"{r.strategy}: {r.world_size} ranks, {r.device}/{r.backend}, {r.dtype}, "
          f"{models.describe(s)}, batch {s['batch_size']}")
    print(f"{'step':>4}  {'loss':>10}  {'reference':>10}  {'|dloss|':>8}")
    for i, (a, b) in enumerate(zip(r.losses, r.reference_losses, strict=True), r.first_step):
        print(f"{i:>4}  {a:>10.6f}  {b:>10.6f}  {abs(a - b):>8.1e}")
    tol = r.tolerance
    print(f"max |dloss| {r.max_abs_dloss:.1e} (tol {tol['loss']:.0e}), max |dparam| "
          f"{r.max_abs_dparam:.1e} (tol {tol['param']:.0e}): {'OK' if r.ok else 'EXCEEDED'}")
    print(f"step time {r.step_time_s * 1e3:.2f} ms (reference on one device "
          f"{r.reference_step_time_s * 1e3:.2f} ms), {r.samples_per_s:,.0f} samples/s")
    measured = f"a matmul measured on rank 0's {r.device} in this run"
    peak = f"{r.datasheet_peak_tflops * 1e3:,.0f} GFLOP/s, the datasheet's {r.dtype} peak; " \
        f"{measured}: {r.matmul_peak_tflops * 1e3:,.0f}" if r.datasheet_peak_tflops else \
        f"{r.matmul_peak_tflops * 1e3:,.1f} GFLOP/s, {measured}"
    print(f"model FLOPs per step {r.model_flops_per_step / 1e9:,.3f} G: {r.tflops * 1e3:,.2f} "
          f"GFLOP/s over {r.world_size} ranks, MFU {r.mfu:.1%} (of {r.world_size} x {peak})")
    kind = "CUDA allocator peak" if r.device == "cuda" else "peak RSS"
    print(f"peak memory per rank ({kind}, MiB): "
          + ", ".join(f"{m:.0f}" for m in r.peak_memory_mib)
          + "; activations saved for backward (MiB): "
          + ", ".join(f"{m:.2f}" for m in r.peak_activation_mib)
          + (" (analytic " + ", ".join(f"{m:.2f}" for m in r.analytic_activation_mib) + ")"
             if r.analytic_activation_mib[0] is not None else ""))
    for rank, (total, bwd, size) in enumerate(zip(r.comm_per_step, r.comm_in_backward,
                                                  r.comm_bytes_per_step, strict=True)):
        print(f"communication per step, rank {rank}: {comm_summary(total, bwd, size)}")
    if r.checkpoints:
        c = r.checkpoints
        print(f"checkpoints: {len(c.save_s)} saved, {statistics.median(c.save_s) * 1e3:,.0f} ms "
              f"each (median), {c.bytes / 2**20:,.1f} MiB"
              + (f"; resumed from step {r.first_step - 1}, loaded in {c.load_s * 1e3:,.0f} ms"
                 if c.load_s is not None else ""))
    if r.bubble:
        print(pipeline_timeline.summary(r.bubble, s, r.pipeline_ranks))
