"""The driver contract and the step loop every strategy runs under.

A driver module has parser(), validate(settings, launch) and build(settings, group) (the Driver
protocol below); build returns a Strategy. The harness runs its steps, timing each and counting
what the last one communicates and keeps for backward; partlab/report.py compares the run with
the single-device reference. Nothing here knows which model is trained: batches come from
partlab.model, and a strategy is only a step function and its parameters.
"""
import argparse
import contextlib
import dataclasses
import math
import resource
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import torch

from partlab import model as models
from partlab.checkpoint import TrainState
from partlab.config import Settings
from partlab.counters import ActivationMeter, CommCounter
from partlab.timeline import Timeline


@dataclasses.dataclass(frozen=True)
class PipelineLayout:
    """Where a pipelined model lives: `ranks` pipeline ranks, stage s owns stage_layers[s];
    tp: the tensor-parallel processes of each stage (None without tensor parallelism)."""

    ranks: int
    stage_layers: list[list[int]]
    tp: int | None = None


@dataclasses.dataclass
class Strategy:
    """What a driver built: its training step, and what the report needs to check it."""

    name: str
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]  # loss on loss_rank
    params: dict[str, torch.Tensor]       # this rank's parameters (plain tensors), reference names
    reference_slice: Callable[[str, torch.Tensor], torch.Tensor]  # full -> this rank's part
    loss_rank: int = 0
    timeline: Timeline | None = None
    layout: PipelineLayout | None = None
    activation_bytes: int | None = None   # the analytic count of the activations this rank saves
    train_state: TrainState | None = None   # what --checkpoint-dir saves


class Driver(Protocol):
    """A driver module (partlab.tensor_parallel_native, ...) as the launcher and the benchmarks
    use it. validate returns the settings with its defaults filled in (e.g. --layers)."""

    def parser(self) -> argparse.ArgumentParser: ...
    def validate(self, settings: Settings, launch) -> Settings: ...
    def build(self, settings: Settings, group) -> Strategy: ...


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


def matmul_tflops(device, dtype, repeats=5):
    """TFLOP/s of the best of `repeats` square matmuls in the run's dtype on `device`: the peak
    that a run's model FLOP utilisation is measured against, on this machine, in this run (on
    CPU one process's share: its own cores, torchrun's one thread)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


@dataclasses.dataclass
class Trace:
    losses: list[float]
    times: list[float]
    comm: CommCounter
    activations: ActivationMeter | None


def run_steps(settings, device, step_fn, params: Iterable[torch.Tensor] | None = None,
              timeline=None, start=0, after_step=None):
    """Run steps start .. settings.steps - 1 of step_fn(x, y) -> loss (or None on ranks without
    the loss); after_step(step), when given, runs after each (untimed: checkpoints).

    With `params` (this rank's parameters) the last step runs under CommCounter and
    ActivationMeter: by then one-off set-up traffic (the pipeline's shape exchange on its first
    step) is over, so the counts are what every step sends. Their Python hooks slow that step,
    so it is not timed (timed_steps). A timeline records every step.
    """
    losses, times = [], []
    counter, meter = CommCounter(), None
    if timeline is not None:
        timeline.align_clocks()
    for step in range(start, settings.steps):
        x, y = models.make_batch(settings, step, device)
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
        if timeline is not None:
            timeline.read()
        losses.append(math.nan if loss is None else loss.item())
        if after_step is not None:
            after_step(step)
    if timeline is not None:
        timeline.step = None
    return Trace(losses, times, counter, meter)

