"""Measuring a run: the step loop (timing, communication counts), peak memory, and the report
that compares a strategy with the single-device reference.
"""
import collections
import contextlib
import dataclasses
import json
import math
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from partlab import model as mlp
from partlab.distributed import synchronize

# Dispatcher op name -> what the table calls it. c10d ops come from torch.distributed calls;
# the functional ones from DTensor. (wait_tensor and friends are bookkeeping, not communication.)
COMM_OPS = {
    "allreduce_": "all_reduce", "all_reduce": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast",
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "barrier": "barrier",
}

# Tolerances against the reference (max abs difference after all steps).
# fp32: sharding reorders sums (TP splits each dot product into world-size partial sums joined
# by all_reduce; the pipeline splits the batch mean into microbatch means). Each reordering moves
# a result by a few ulps (~1e-7 relative); after 5 SGD steps losses agree to ~2e-7 and
# parameters to ~1e-8. 1e-5 leaves room for longer runs yet is 100x below what a real bug
# (a missing reduce, a gradient scaled twice) produces.
# bf16: 8 mantissa bits (eps 7.8e-3), so one reordered rounding moves a value by ~4e-3
# relative; losses (~2.3) may differ by a few 1e-2 and weights (|w| < 0.05) by ~1e-3.
TOLERANCE = {"fp32": {"loss": 1e-5, "param": 1e-5}, "bf16": {"loss": 5e-2, "param": 5e-3}}


class CommCounter(TorchDispatchMode):
    """Counts the communication ops the dispatcher sees: c10d calls and DTensor's collectives.

    Ops issued while the autograd engine runs a backward node are also counted as backward.
    """

    def __init__(self):
        super().__init__()
        self.total = collections.Counter()
        self.backward = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = COMM_OPS.get(func._opname) if func.namespace in (
            "c10d", "_c10d_functional", "c10d_functional") else None
        if name:
            self.total[name] += 1
            if torch._C._current_autograd_node() is not None:
                self.backward[name] += 1
        return func(*args, **(kwargs or {}))


def peak_memory_mib(device):
    """CUDA: the caching allocator's peak since the last reset. CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_steps(times):
    """The step times the summary uses: without step 1 (warm-up) and the last step (counted
    under CommCounter, whose Python hook slows every op), when there are enough steps."""
    return times[1:-1] if len(times) >= 3 else times


def run_steps(settings, device, step_fn, count_comm=True):
    """Run `settings.steps` steps of step_fn(x, y) -> loss (or None on ranks without the loss).

    The last step runs under CommCounter: by then one-off set-up traffic (the pipeline's shape
    exchange on its first step) is over, so the counts are what every step sends.
    """
    losses, times, counter = [], [], CommCounter()
    for step in range(settings.steps):
        x, y = mlp.make_batch(settings, step, device)
        counting = count_comm and step == settings.steps - 1
        synchronize(device)
        start = time.perf_counter()
        with counter if counting else contextlib.nullcontext():
            loss = step_fn(x, y)
        synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(math.nan if loss is None else loss.item())
    return losses, times, counter


def max_abs_diff(pairs):
    return max((float((a.float() - b.float()).abs().max()) for a, b in pairs if a.numel()),
               default=0.0)


def finish(strategy, settings, group, trace, local_params, reference_slice, loss_rank=0,
           extra=None):
    """Compare this run with the reference, print the summary on rank 0, write --json.

    local_params: {name: this rank's tensor}; reference_slice(name, full) -> the same part of
    the reference's tensor. Returns the exit status (1 when --check and beyond tolerance).
    """
    losses, times, counter = trace
    peak_mib = peak_memory_mib(group.device)
    # The reference runs on every rank (same device, same seed), after the strategy so it
    # does not count in the strategy's peak memory.
    ref_model = mlp.build_model(settings, group.device)
    ref_losses, ref_times, _ = run_steps(settings, group.device,
                                         mlp.reference_step_fn(ref_model, settings),
                                         count_comm=False)
    ref_params = dict(ref_model.named_parameters())
    dparam = max_abs_diff((p.detach(), reference_slice(n, ref_params[n].detach()))
                          for n, p in local_params.items())

    # Post-run bookkeeping (not part of any step): bring the numbers to rank 0.
    loss_t = torch.tensor(losses, dtype=torch.float64, device=group.device)
    dist.broadcast(loss_t, src=loss_rank)
    stats = torch.tensor([dparam, statistics.median(timed_steps(times))], dtype=torch.float64,
                         device=group.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    per_rank = [None] * group.world_size
    dist.all_gather_object(per_rank, (peak_mib, dict(counter.total), dict(counter.backward)))
    if group.rank != 0:
        return 0

    losses = loss_t.tolist()
    dparam, step_s = stats.tolist()
    ref_step_s = statistics.median(timed_steps(ref_times))
    dloss = max(abs(a - b) for a, b in zip(losses, ref_losses))
    tol = TOLERANCE[settings.dtype]
    ok = dloss <= tol["loss"] and dparam <= tol["param"]
    record = {
        "strategy": strategy, "world_size": group.world_size, "backend": group.backend,
        "device": group.device.type, "dtype": settings.dtype,
        "losses": losses, "reference_losses": ref_losses,
        "max_abs_dloss": dloss, "max_abs_dparam": dparam, "tolerance": tol, "ok": ok,
        "step_time_s": step_s, "reference_step_time_s": ref_step_s,
        "samples_per_s": settings.batch_size / step_s,
        "peak_memory_mib": [r[0] for r in per_rank],
        "comm_per_step": [r[1] for r in per_rank],
        "comm_in_backward": [r[2] for r in per_rank],
        "settings": dataclasses.asdict(settings),
        **(extra or {}),
    }
    print_summary(record)
    if settings.json:
        with open(settings.json, "w") as f:
            json.dump(record, f, indent=1)
    if settings.check and not ok:
        print(f"partlab: error: {strategy} deviates from the reference beyond tolerance",
              file=sys.stderr, flush=True)
        return 1
    return 0


def comm_summary(total, backward):
    if not total:
        return "none"
    return ", ".join(f"{op} x{n} ({backward.get(op, 0)} in backward)"
                     for op, n in sorted(total.items()))


def print_summary(r):
    s = r["settings"]
    print(f"{r['strategy']}: {r['world_size']} ranks, {r['device']}/{r['backend']}, {r['dtype']}, "
          f"MLP {s['input_dim']}-{s['hidden_dim']}-{s['num_classes']} ({s['layers']} layers), "
          f"batch {s['batch_size']}")
    print(f"{'step':>4}  {'loss':>10}  {'reference':>10}  {'|dloss|':>8}")
    for i, (a, b) in enumerate(zip(r["losses"], r["reference_losses"]), 1):
        print(f"{i:>4}  {a:>10.6f}  {b:>10.6f}  {abs(a - b):>8.1e}")
    tol = r["tolerance"]
    print(f"max |dloss| {r['max_abs_dloss']:.1e} (tol {tol['loss']:.0e}), max |dparam| "
          f"{r['max_abs_dparam']:.1e} (tol {tol['param']:.0e}): {'OK' if r['ok'] else 'EXCEEDED'}")
    print(f"step time {r['step_time_s'] * 1e3:.2f} ms (reference on one device "
          f"{r['reference_step_time_s'] * 1e3:.2f} ms), {r['samples_per_s']:,.0f} samples/s")
    kind = "CUDA allocator peak" if r["device"] == "cuda" else "peak RSS"
    print(f"peak memory per rank ({kind}, MiB): "
          + ", ".join(f"{m:.0f}" for m in r["peak_memory_mib"]))
    for rank, (total, bwd) in enumerate(zip(r["comm_per_step"], r["comm_in_backward"])):
        print(f"communication per step, rank {rank}: {comm_summary(total, bwd)}")
