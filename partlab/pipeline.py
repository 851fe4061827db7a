"""Pipeline parallelism with torch.distributed.pipelining: one stage per process.

The MLP's layers are cut into `stages` consecutive groups, one per rank. Each step splits the
batch into microbatches that flow through the stages; between neighbours only activations
(forward) and their gradients (backward) travel, point to point:
  gpipe  all forwards, then all backwards (Huang et al. 2019): simple, keeps every
         microbatch's activations alive until its backward
  1f1b   after a warm-up, each stage alternates one forward and one backward
         (Narayanan et al. 2019, PipeDream-Flush): same bubble, fewer live activations
Idle time (the bubble) is (p - 1) / (m + p - 1) of a step for p stages and m microbatches, so
more microbatches shrink it. The schedule divides gradients by m (scale_grads=True) and the
loss per microbatch is a plain mean, so the result equals the full-batch step.

Run: torchrun --standalone --nproc_per_node 2 -m partlab.pipeline --schedule gpipe
"""
import sys

import torch

from partlab import distributed, metrics, missing_torch_feature
from partlab import model as mlp
from partlab.config import add_pipeline_flags, make_parser, require

try:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
except ImportError as e:
    raise SystemExit(missing_torch_feature("torch.distributed.pipelining", e)) from None

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(num_layers, stage, num_stages):
    """The layers stage `stage` owns: an even, contiguous share."""
    return range(stage * num_layers // num_stages, (stage + 1) * num_layers // num_stages)


def validate(settings, launch):
    p, m = launch.world_size, settings.microbatches
    require(settings.stages in (None, p),
            f"--stages {settings.stages} but {p} processes: one stage per process, so run "
            f"torchrun --nproc_per_node {settings.stages}")
    require(settings.layers >= p,
            f"--layers {settings.layers} cannot make {p} stages: use --layers {p} or more")
    require(settings.batch_size % m == 0,
            f"--batch-size {settings.batch_size} is not divisible by --microbatches {m}: "
            f"use a multiple of {m}")
    require(settings.schedule != "1f1b" or m >= p,
            f"--schedule 1f1b needs --microbatches >= stages ({m} < {p}): raise --microbatches")
    if m < p and launch.local_rank == 0:
        print(f"partlab: warning: --microbatches {m} < {p} stages: each stage idles for "
              f"{(p - 1) / (m + p - 1):.0%} of a step (the bubble, (p-1)/(m+p-1)); "
              f"use --microbatches {p} or more", file=sys.stderr, flush=True)


def train(settings, group):
    rank, p = group.rank, group.world_size
    model = mlp.build_model(settings, group.device)
    mine = stage_layers(settings.layers, rank, p)
    for name in list(model.layers):
        if int(name) not in mine:
            del model.layers[name]              # keep only this stage's layers (names unchanged)
    stage = PipelineStage(model, rank, p, group.device)
    schedule = SCHEDULES[settings.schedule](stage, n_microbatches=settings.microbatches,
                                            loss_fn=mlp.loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    first, last = rank == 0, rank == p - 1

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        losses = []
        inputs = (x,) if first else ()
        targets = {"target": y, "losses": losses} if last else {}
        schedule.step(*inputs, **targets)
        opt.step()
        return torch.stack(losses).mean() if last else None

    trace = metrics.run_steps(settings, group.device, step)
    local = dict(model.named_parameters())
    return metrics.finish(f"pipeline_{settings.schedule}", settings, group, trace, local,
                          lambda name, full: full, loss_rank=p - 1,
                          extra={"stage_layers": [list(stage_layers(settings.layers, s, p))
                                                  for s in range(p)]})


def main(argv=None):
    parser = make_parser("partlab.pipeline",
                         "Pipeline parallelism (torch.distributed.pipelining), one stage per rank.")
    add_pipeline_flags(parser)
    return distributed.run(parser, validate, train, argv)


if __name__ == "__main__":
    sys.exit(main())
