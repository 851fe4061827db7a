"""Pipeline mechanics shared by the pipeline drivers: this rank's stages of the model, their
schedule from torch.distributed.pipelining, and an optimizer step over them.

A schedule divides gradients by the microbatch count (scale_grads=True) and the loss per
microbatch is a plain mean, so one step equals the reference's full-batch step.
"""
import contextlib

import torch

from partlab import missing_torch_feature
from partlab import model as mlp
from partlab.config import INTERLEAVED
from partlab.harness import PipelineLayout
from partlab.partition import stage_ids, stage_layers

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


def build_pipeline(settings, group, rank, ranks, process_group=None, unit=1, shard=None,
                   loss_fn=mlp.loss_fn, step_context=None):
    """This rank's stages, their schedule and an optimizer step over them.

    rank, ranks: place in the pipeline (process_group: its processes, default all);
    shard(module) -> module, applied to each stage (the 2-D mode's tensor parallelism), whose
    logits loss_fn takes (in step_context, e.g. loss_parallel, when it needs one).
    Returns (step, {name: parameter} of this rank's stages, the stages, layout, the optimizer).
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
        n_microbatches=settings.microbatches, loss_fn=loss_fn)
    params = {n: p for module in modules for n, p in module.named_parameters()}
    opt = mlp.make_optimizer(params.values(), settings)
    first, last = stages[0].is_first, stages[-1].is_last

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        losses = []
        inputs = (x,) if first else ()
        targets = {"target": y, "losses": losses} if last else {}
        with (step_context or contextlib.nullcontext)():
            schedule.step(*inputs, **targets)
        opt.step()
        if not last:
            return None
        return torch.stack([mlp.whole(loss) for loss in losses]).mean()

    layout = PipelineLayout(
        ranks=ranks, stage_layers=[list(stage_layers(settings.layers, s, total, unit))
                                   for s in range(total)])
    return step, params, stages, layout, opt
