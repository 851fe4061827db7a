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
microbatches or chunks shrink it. partlab/timeline.py measures it. The stages, their schedule and
the step are built in partlab/stages.py; the layer split in partlab/partition.py. Without
--layers every stage gets a layer (at least the handout's 2 layers), and without --microbatches
the schedule gets enough for every rank (at least the handout's 4).

Run: torchrun --standalone --nproc_per_node 2 -m partlab.pipeline --schedule gpipe
"""
import functools

from partlab import distributed, report
from partlab.checkpoint import TrainState
from partlab.config import add_pipeline_flags, make_parser, require
from partlab.harness import Strategy
from partlab.partition import check_pipeline, pipeline_defaults, warn_about_bubble
from partlab.stages import build_pipeline
from partlab.theory.memory import pipeline_activation_bytes
from partlab.timeline import Timeline


def validate(settings, launch):
    p = launch.world_size
    settings = pipeline_defaults(settings, p)
    require(not settings.sequence_parallel,
            "--sequence-parallel splits tensor parallelism's activations along the sequence: "
            "use it with tensor_parallel_native, tensor_parallel_manual or "
            "pipeline_tensor_parallel")
    check_pipeline(settings, p)
    warn_about_bubble(settings, p, launch.local_rank)
    return settings


def build(settings, group):
    p = group.world_size
    step, params, stages, layout, opt = build_pipeline(settings, group, group.rank, p)
    return Strategy(f"pipeline_{settings.schedule}", step, params, lambda name, full: full,
                    loss_rank=p - 1,                    # the last stage
                    timeline=Timeline(stages, group.device), layout=layout,
                    train_state=TrainState(opt, params),
                    activation_bytes=pipeline_activation_bytes(settings, group.rank, p))


def parser():
    p = make_parser("partlab.pipeline",
                    "Pipeline parallelism (torch.distributed.pipelining), stages on ranks.")
    add_pipeline_flags(p)
    return p


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(report.train_and_report, build), argv)


if __name__ == "__main__":
    distributed.exit_process(main())
