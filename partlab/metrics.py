"""Measuring a run: the step loop (timing, communication counts and bytes, activation memory,
the pipeline timeline), and the report that compares a strategy with the single-device reference.
"""
import contextlib
import dataclasses
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from partlab import model as mlp
from partlab import timeline as pipeline_timeline
from partlab.config import DEFAULTS
from partlab.counters import ActivationMeter, CommCounter

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


@dataclasses.dataclass
class Strategy:
    """What a driver built: its training step, and what the report needs to check it."""

    name: str
    step: Callable                 # step(x, y) -> the loss on loss_rank, None elsewhere
    params: dict                   # this rank's parameters (plain tensors), reference names
    reference_slice: Callable      # (name, full reference tensor) -> this rank's part of it
    loss_rank: int = 0
    timeline: pipeline_timeline.Timeline | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def peak_memory_mib(device):
    """CUDA: the caching allocator's peak since the last reset. CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(times):
    """The step times the summary uses: without step 1 (warm-up) and the last step (measured
    under CommCounter and ActivationMeter, whose Python hooks slow it), when there are enough."""
    return times[1:-1] if len(times) >= 3 else times


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class Trace:
    losses: list
    times: list
    comm: CommCounter
    activations: ActivationMeter | None


def run_steps(settings, device, step_fn, params=None, timeline=None):
    """Run `settings.steps` steps of step_fn(x, y) -> loss (or None on ranks without the loss).

    With `params` (this rank's parameters) the last step runs under CommCounter and
    ActivationMeter: by then one-off set-up traffic (the pipeline's shape exchange on its first
    step) is over, so the counts are what every step sends. Their Python hooks slow that step,
    so it is not timed (timed_steps). A timeline records every step.
    """
    losses, times = [], []
    counter, meter = CommCounter(), None
    if timeline is not None:
        timeline.align_clocks()
    for step in range(settings.steps):
        x, y = mlp.make_batch(settings, step, device)
        measuring = params is not None and step == settings.steps - 1
        if measuring:
            meter = ActivationMeter(params)
        if timeline is not None:
            timeline.step = step
        synchronize(device)
        start = time.perf_counter()
        with (counter if measuring else contextlib.nullcontext()), \
                (meter if measuring else contextlib.nullcontext()):
            loss = step_fn(x, y)
        synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(math.nan if loss is None else loss.item())
    if timeline is not None:
        timeline.step = None
    return Trace(losses, times, counter, meter)


def train_and_report(build, settings, group):
    """Build the strategy (build(settings, group) -> Strategy), train it, compare it with the
    reference and report: a driver's work (distributed.run)."""
    strategy = build(settings, group)
    trace = run_steps(settings, group.device, strategy.step, strategy.params.values(),
                      strategy.timeline)
    return finish(strategy, settings, group, trace)


def max_abs_diff(pairs):
    return max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.numel()),
               default=0.0)


def finish(strategy, settings, group, trace):
    """Compare this run with the reference, print the summary on rank 0, write --json (and the
    pipeline's --timeline files). Returns the exit status (1 when --check and beyond tolerance).
    """
    peak_mib = peak_memory_mib(group.device)
    # The reference runs on every rank (same device, same seed), after the strategy so it
    # does not count in the strategy's peak memory. On CPU rank 0 times it alone while the
    # others wait (so their --timeout must cover it): its step time is then one process's, not
    # slowed by the other ranks sharing the machine's cores. (GPUs are not shared.)
    ref_model = mlp.build_model(settings, group.device)
    ref_step = mlp.reference_step_fn(ref_model, settings)
    alone = group.device.type == "cpu"
    if alone and group.rank != 0:
        dist.barrier()
    ref = run_steps(settings, group.device, ref_step)
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
    events = strategy.timeline.events if strategy.timeline else []
    dist.all_gather_object(per_rank, (peak_mib, dict(trace.comm.total), dict(trace.comm.backward),
                                      dict(trace.comm.bytes), activation_mib, events))
    if group.rank != 0:
        return 0

    losses = loss_t.tolist()
    dparam, step_s = stats.tolist()
    ref_step_s = statistics.median(timed_steps(ref.times))
    dloss = max(abs(a - b) for a, b in zip(losses, ref.losses, strict=True))
    tol = TOLERANCE[settings.dtype]
    ok = dloss <= tol["loss"] and dparam <= tol["param"]
    record = {
        "strategy": strategy.name, "world_size": group.world_size, "backend": group.backend,
        "device": group.device.type, "dtype": settings.dtype,
        "losses": losses, "reference_losses": ref.losses,
        "max_abs_dloss": dloss, "max_abs_dparam": dparam, "tolerance": tol, "ok": ok,
        "step_time_s": step_s, "reference_step_time_s": ref_step_s,
        "samples_per_s": settings.batch_size / step_s,
        "peak_memory_mib": [r[0] for r in per_rank],
        "peak_activation_mib": [r[4] for r in per_rank],
        "comm_per_step": [r[1] for r in per_rank],
        "comm_in_backward": [r[2] for r in per_rank],
        "comm_bytes_per_step": [r[3] for r in per_rank],
        "settings": dataclasses.asdict(settings),
        **strategy.extra,
    }
    if strategy.timeline:
        record["bubble"] = report_timeline(
            [(rank, *e) for rank, r in enumerate(per_rank) for e in r[5]], settings, record)
    print_summary(record)
    if settings.json:
        with open(settings.json, "w") as f:
            json.dump(record, f, indent=1)
    if settings.check and not ok:
        first = ref.losses[0]
        worst = max(ref.losses, key=lambda v: math.inf if math.isnan(v) else v)
        if not math.isfinite(worst) or worst > 10 * first:
            print(f"partlab: error: the run diverged (the reference's own loss went from "
                  f"{first:.3g} to {worst:.3g}), so float rounding no longer bounds the "
                  f"difference: lower --lr (now {settings.lr:g}; default {DEFAULTS.lr:g})",
                  file=sys.stderr, flush=True)
        else:
            print(f"partlab: error: {strategy.name} deviates from the reference beyond "
                  "tolerance", file=sys.stderr, flush=True)
        return 1
    return 0


def report_timeline(events, settings, record):
    """The bubble measured on the timed steps next to the theory; --timeline files of the last."""
    p, ranks = record["pipeline_ranks"], record["world_size"]
    by_step = pipeline_timeline.bubble(events, ranks)
    steps = timed_steps(sorted(by_step))
    measured = statistics.median(by_step[s][0] for s in steps)
    theory = None if settings.schedule == "zero-bubble" else \
        pipeline_timeline.theory(p, settings.microbatches, settings.virtual_stages)
    result = {"measured": measured, "theory": theory, "steps": [s + 1 for s in steps],
              "per_step": [by_step[s][0] for s in sorted(by_step)],
              "per_rank": [statistics.median(by_step[s][1][r] for s in steps)
                           for r in range(ranks)], "files": None}
    if settings.timeline:
        os.makedirs(os.path.dirname(settings.timeline) or ".", exist_ok=True)
        png, trace = settings.timeline + ".png", settings.timeline + ".json"
        pipeline_timeline.chrome_trace(events, trace)
        title = (f"{record['strategy']}: p={p}, m={settings.microbatches}, "
                 f"v={settings.virtual_stages}, step {steps[-1] + 1}; bubble "
                 f"{by_step[steps[-1]][0]:.1%}" + (f" (theory {theory:.1%})" if theory else ""))
        pipeline_timeline.gantt(events, steps[-1], ranks, png, title)
        result["files"] = [png, trace]
    return result


def comm_summary(total, backward, size):
    if not total:
        return "none"
    return ", ".join(f"{op} x{n} ({backward.get(op, 0)} in backward, {size.get(op, 0):,} bytes)"
                     for op, n in sorted(total.items()))


def print_summary(r):
    s = r["settings"]
    print(f"{r['strategy']}: {r['world_size']} ranks, {r['device']}/{r['backend']}, {r['dtype']}, "
          f"MLP {s['input_dim']}-{s['hidden_dim']}-{s['num_classes']} ({s['layers']} layers), "
          f"batch {s['batch_size']}")
    print(f"{'step':>4}  {'loss':>10}  {'reference':>10}  {'|dloss|':>8}")
    for i, (a, b) in enumerate(zip(r["losses"], r["reference_losses"], strict=True), 1):
        print(f"{i:>4}  {a:>10.6f}  {b:>10.6f}  {abs(a - b):>8.1e}")
    tol = r["tolerance"]
    print(f"max |dloss| {r['max_abs_dloss']:.1e} (tol {tol['loss']:.0e}), max |dparam| "
          f"{r['max_abs_dparam']:.1e} (tol {tol['param']:.0e}): {'OK' if r['ok'] else 'EXCEEDED'}")
    print(f"step time {r['step_time_s'] * 1e3:.2f} ms (reference on one device "
          f"{r['reference_step_time_s'] * 1e3:.2f} ms), {r['samples_per_s']:,.0f} samples/s")
    kind = "CUDA allocator peak" if r["device"] == "cuda" else "peak RSS"
    print(f"peak memory per rank ({kind}, MiB): "
          + ", ".join(f"{m:.0f}" for m in r["peak_memory_mib"])
          + "; activations saved for backward (MiB): "
          + ", ".join(f"{m:.2f}" for m in r["peak_activation_mib"]))
    for rank, (total, bwd, size) in enumerate(zip(r["comm_per_step"], r["comm_in_backward"],
                                                  r["comm_bytes_per_step"], strict=True)):
        print(f"communication per step, rank {rank}: {comm_summary(total, bwd, size)}")
    if "bubble" in r:
        b, s = r["bubble"], r["settings"]
        formula = "(p-1)/(m+p-1)" if s["virtual_stages"] == 1 else "(p-1)/(v*m+p-1)"
        theory = f"theory {formula} = {b['theory']:.1%}" if b["theory"] is not None else \
            "no closed-form theory for this schedule"
        print(f"bubble (idle share of a step, from the timeline, median of steps "
              f"{b['steps'][0]}-{b['steps'][-1]}): {b['measured']:.1%}; {theory}")
        if b["files"]:
            print("timeline: " + ", ".join(b["files"]))
