"""Pipeline parallelism with torch.distributed.pipelining: stages of the MLP on different processes.

The MLP's layers are cut into consecutive stages. Each step splits the batch into microbatches
that flow through the stages; between neighbours only activations (forward) and their gradients
(backward) travel, point to point. Schedules (p pipeline ranks, m microbatches):
  gpipe             all forwards, then all backwards (Huang et al. 2019): simple, keeps every
                    microbatch's activations alive until its backward
  1f1b              after a warm-up, each rank alternates one forward and one backward
                    (Narayanan et al. 2019, PipeDream-Flush): same bubble, at most p microbatches'
                    activations alive instead of m
  interleaved-1f1b  each rank holds v model chunks (--virtual-stages; rank r holds stages r,
                    r+p, ...), so the pipeline fills v times faster (Narayanan et al. 2021)
  zero-bubble       interleaved, with the backward split into input- and weight-gradient parts;
                    the weight parts fill the idle slots (Qi et al. 2024, ZB1P)
Idle time (the bubble) is (p-1)/(v*m+p-1) of a step, v = 1 for gpipe and 1f1b: more
microbatches or chunks shrink it. partlab/timeline.py measures it. The schedule divides
gradients by m (scale_grads=True) and the loss per microbatch is a plain mean, so the result
equals the full-batch step.

Run: torchrun --standalone --nproc_per_node 2 -m partlab.pipeline --schedule gpipe
"""
import functools
import importlib.util
import sys

import torch

from partlab import distributed, metrics, missing_torch_feature
from partlab import model as mlp
from partlab.config import INTERLEAVED, add_pipeline_flags, make_parser, require
from partlab.timeline import Timeline, theory

try:
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )
except ImportError as e:
    raise SystemExit(missing_torch_feature("torch.distributed.pipelining", e)) from None

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved-1f1b": ScheduleInterleaved1F1B,
             "zero-bubble": ScheduleInterleavedZeroBubble}


def stage_layers(num_layers, stage, num_stages, unit=1):
    """The layers stage `stage` owns: an even, contiguous share of the model's units (single
    layers, or column/row pairs when the stage is also tensor-parallel)."""
    units = num_layers // unit
    return range(stage * units // num_stages * unit, (stage + 1) * units // num_stages * unit)


def stage_ids(rank, ranks, virtual_stages):
    """The stages pipeline rank `rank` holds: r, r+p, r+2p, ... (the interleaved placement)."""
    return [rank + k * ranks for k in range(virtual_stages)]


def validate_schedule(settings, ranks, local_rank, unit=1, processes_per_rank=1):
    """What any pipeline needs: a unit (a layer, or a column/row pair when unit=2) per stage,
    whole microbatches, and the schedule's own constraints. ranks: pipeline ranks, each of
    processes_per_rank processes (the 2-D mode's --tp)."""
    p, m, v = ranks, settings.microbatches, settings.virtual_stages
    require(settings.stages in (None, p),
            f"--stages {settings.stages} but {p} pipeline ranks: --stages must equal them, so "
            f"run {(settings.stages or p) * processes_per_rank} processes "
            "(torchrun --nproc_per_node)")
    require(settings.layers // unit >= p * v,
            f"--layers {settings.layers} cannot make {p * v} stages ({p} ranks x {v} virtual "
            f"stages) of at least {unit} layer(s): use --layers {p * v * unit} or more")
    require(settings.batch_size % m == 0,
            f"--batch-size {settings.batch_size} is not divisible by --microbatches {m}: "
            f"use a multiple of {m}")
    require(settings.schedule != "1f1b" or m >= p,
            f"--schedule 1f1b needs --microbatches >= stages ({m} < {p}): raise --microbatches")
    require(settings.schedule not in INTERLEAVED or m < p or m % p == 0,
            f"--schedule {settings.schedule} runs microbatches in rounds of {p}: use "
            f"--microbatches {p * max(1, m // p)} (a multiple of {p}) or fewer than {p}")
    require(not settings.timeline or importlib.util.find_spec("matplotlib"),
            "--timeline draws with matplotlib, which is not installed: pip install matplotlib")
    if m < p and local_rank == 0:
        print(f"partlab: warning: --microbatches {m} < {p} stages: each stage idles for "
              f"{theory(p, m, v):.0%} of a step (the bubble, (p-1)/(v*m+p-1)); "
              f"use --microbatches {p} or more", file=sys.stderr, flush=True)


def validate(settings, launch):
    validate_schedule(settings, launch.world_size, launch.local_rank)


def build_pipeline(settings, group, rank, ranks, process_group=None, unit=1, shard=None):
    """This rank's stages, their schedule and an SGD step over them.

    rank, ranks: place in the pipeline (process_group: its processes, default all);
    shard(module) -> module, applied to each stage (the 2-D mode's tensor parallelism).
    Returns (step, {name: parameter}, timeline, layout): layout is the record's
    pipeline_ranks and every stage's layers.
    """
    total = ranks * settings.virtual_stages
    modules, stages = [], []
    for stage in stage_ids(rank, ranks, settings.virtual_stages):
        module = mlp.build_model(settings, group.device,
                                 keep=stage_layers(settings.layers, stage, total, unit))
        modules.append(shard(module) if shard else module)
        stages.append(PipelineStage(modules[-1], stage, total, group.device, group=process_group))
    schedule = SCHEDULES[settings.schedule](
        stages if settings.schedule in INTERLEAVED else stages[0],
        n_microbatches=settings.microbatches, loss_fn=mlp.loss_fn)
    params = {n: p for module in modules for n, p in module.named_parameters()}
    opt = torch.optim.SGD(params.values(), lr=settings.lr)
    first, last = stages[0].is_first, stages[-1].is_last

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        losses = []
        inputs = (x,) if first else ()
        targets = {"target": y, "losses": losses} if last else {}
        schedule.step(*inputs, **targets)
        opt.step()
        return torch.stack(losses).mean() if last else None

    layout = {"pipeline_ranks": ranks,
              "stage_layers": [list(stage_layers(settings.layers, s, total, unit))
                               for s in range(total)]}
    return step, params, Timeline(stages), layout


def build(settings, group):
    p = group.world_size
    step, params, timeline, layout = build_pipeline(settings, group, group.rank, p)
    return metrics.Strategy(
        f"pipeline_{settings.schedule}", step, params, lambda name, full: full,
        loss_rank=p - 1, timeline=timeline, extra=layout)  # the last stage is on the last rank


def parser():
    p = make_parser("partlab.pipeline",
                    "Pipeline parallelism (torch.distributed.pipelining), stages on ranks.")
    add_pipeline_flags(p)
    return p


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(metrics.train_and_report, build), argv)


if __name__ == "__main__":
    sys.exit(main())
