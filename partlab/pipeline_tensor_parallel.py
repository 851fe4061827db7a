"""Pipeline x tensor parallelism (2-D): pipeline stages whose layers are tensor-parallel.

The processes form a (pp, tp) grid (a 2-D DeviceMesh): rank = pipeline_rank * tp + tp_index.
  along tp  the --tp processes of one stage hold column/row shards of its layer pairs, exactly
            as tensor_parallel_native.py does for the whole model (one all_reduce per pair)
  along pp  the processes with the same tp_index form a pipeline, exactly as pipeline.py,
            sending each microbatch's activations (whole, replicated by the row layer's
            all_reduce) to the next stage
So a stage owns whole column/row pairs, and each step moves both kinds of traffic: all_reduce
inside a stage, send/recv between stages. This is how large models combine the two (TP inside
a node's fast links, PP across nodes; Narayanan et al. 2021).

Run: torchrun --standalone --nproc_per_node 4 -m partlab.pipeline_tensor_parallel --tp 2
"""
import functools
import sys

from partlab import distributed, metrics, missing_torch_feature
from partlab.config import add_pipeline_flags, make_parser, require
from partlab.pipeline import build_pipeline, validate_schedule
from partlab.tensor_parallel_manual import validate_sharding
from partlab.tensor_parallel_native import local_shards, plan

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
except ImportError as e:
    raise SystemExit(missing_torch_feature("torch.distributed.tensor.parallel", e)) from None

DEFAULT_TP = 2  # tensor-parallel processes per stage: 4 processes = 2 stages x 2-way TP


def validate(settings, launch):
    tp = settings.tp
    require(launch.world_size % tp == 0,
            f"{launch.world_size} processes do not split into groups of --tp {tp}: run a "
            f"multiple of {tp} processes (e.g. torchrun --nproc_per_node {2 * tp})")
    validate_sharding(settings, launch, ways=tp)
    validate_schedule(settings, launch.world_size // tp, launch.local_rank, unit=2,
                      processes_per_rank=tp)


def build(settings, group):
    tp = settings.tp
    pp = group.world_size // tp
    mesh = init_device_mesh(group.device.type, (pp, tp), mesh_dim_names=("pp", "tp"))
    tp_mesh = mesh["tp"]
    step, params, timeline, layout = build_pipeline(
        settings, group, group.rank // tp, pp, process_group=mesh["pp"].get_group(), unit=2,
        shard=lambda stage: parallelize_module(stage, tp_mesh, plan(stage)))

    return metrics.Strategy(
        f"pipeline_tensor_parallel_{settings.schedule}", step, *local_shards(params, tp_mesh),
        loss_rank=(pp - 1) * tp, timeline=timeline,   # the last stage's first tp rank
        extra={**layout, "tp": tp})


def parser():
    p = make_parser("partlab.pipeline_tensor_parallel",
                    "Pipeline stages of tensor-parallel layers on a (pp, tp) process grid.")
    add_pipeline_flags(p)
    p.add_argument("--tp", type=int, default=DEFAULT_TP,
                   help="tensor-parallel processes per stage (the rest form the pipeline)")
    return p


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(metrics.train_and_report, build), argv)


if __name__ == "__main__":
    sys.exit(main())
