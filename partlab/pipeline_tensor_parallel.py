"""Pipeline x tensor parallelism (2-D): pipeline stages whose layers are tensor-parallel.

The processes form a (pp, tp) grid (a 2-D DeviceMesh): rank = pipeline_rank * tp + tp_index.
  along tp  the --tp processes of one stage hold column/row shards of its layer pairs (one
            all_reduce per pair), with DTensor's plan as in tensor_parallel_native.py
            (--tp-impl native) or with Megatron's f and g on the stage's own process group as in
            tensor_parallel_manual.py (--tp-impl manual; plain PyTorch, not the fused op)
  along pp  the processes with the same tp_index form a pipeline, exactly as pipeline.py,
            sending each microbatch's activations (whole, replicated by the row layer's
            all_reduce) to the next stage
So a stage owns whole column/row pairs, and each step moves both kinds of traffic: all_reduce
inside a stage, send/recv between stages. This is how large models combine the two (TP inside
a node's fast links, PP across nodes; Narayanan et al. 2021).

Run: torchrun --standalone --nproc_per_node 4 -m partlab.pipeline_tensor_parallel --tp 2
"""
import dataclasses
import functools

from partlab import distributed, missing_torch_feature, report
from partlab.checkpoint import TrainState
from partlab.config import add_pipeline_flags, make_parser, require
from partlab.harness import Strategy
from partlab.partition import (
    check_pipeline,
    check_tensor_parallel,
    dtensor_plan,
    dtensor_shards,
    pipeline_defaults,
    tp_slice,
    warn_about_bubble,
)
from partlab.stages import build_pipeline
from partlab.timeline import Timeline
from partlab.tp_gpt import TensorParallelGPT, vocab_parallel_loss
from partlab.tp_layers import ColumnRowParallelMLP

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module
except ImportError as e:
    raise SystemExit(missing_torch_feature("torch.distributed.tensor.parallel", e)) from None

DEFAULT_TP = 2  # tensor-parallel processes per stage: 4 processes = 2 stages x 2-way TP


def validate(settings, launch):
    tp = settings.tp
    require(launch.world_size % tp == 0,
            f"{launch.world_size} processes do not split into groups of --tp {tp}: run a "
            f"multiple of {tp} processes (e.g. torchrun --nproc_per_node {2 * tp})")
    pp = launch.world_size // tp
    unit = stage_unit(settings)
    settings = pipeline_defaults(settings, pp, unit=unit)
    check_tensor_parallel(settings, tp, ways_flag="--tp", native=settings.tp_impl != "manual")
    check_pipeline(settings, pp, unit=unit, processes_per_rank=tp)
    warn_about_bubble(settings, pp, launch.local_rank)
    return settings


def stage_unit(settings):
    """What a stage holds whole: an MLP's column/row pairs, a gpt's blocks."""
    return 1 if settings.model == "gpt" else 2


def build(settings, group):
    tp, manual, gpt = settings.tp, settings.tp_impl == "manual", settings.model == "gpt"
    pp = group.world_size // tp
    mesh = init_device_mesh(group.device.type, (pp, tp), mesh_dim_names=("pp", "tp"))
    tp_mesh, tp_group = mesh["tp"], mesh["tp"].get_group()

    def shard(stage):
        if manual and gpt:
            return TensorParallelGPT(stage, settings.vocab_size, group=tp_group,
                                     sequence_parallel=settings.sequence_parallel)
        if manual:
            return ColumnRowParallelMLP(stage, group=tp_group)
        return parallelize_module(stage, tp_mesh, dtensor_plan(stage, settings.sequence_parallel))

    # The gpt's last stage has logits split by vocabulary: its loss is vocabulary-parallel.
    loss = {"loss_fn": vocab_parallel_loss(settings.vocab_size, tp_group)} if manual and gpt \
        else {"step_context": loss_parallel} if gpt else {}
    step, params, stages, layout, opt = build_pipeline(
        settings, group, group.rank // tp, pp, process_group=mesh["pp"].get_group(),
        unit=stage_unit(settings), shard=shard, **loss)
    train_state = TrainState(opt, params, tp_group if manual else None)
    if manual:   # this rank's place in its stage: rank = pipeline_rank * tp + tp_index
        def reference_slice(name, full):
            return tp_slice(name, full, group.rank % tp, tp)
    else:
        params, reference_slice = dtensor_shards(params, tp_mesh)
    name = f"pipeline_tensor_parallel_{settings.schedule}" + ("_manual" if manual else "")
    return Strategy(name, step, params, reference_slice,
                    loss_rank=(pp - 1) * tp,            # the last stage's first tp rank
                    timeline=Timeline(stages, group.device),
                    layout=dataclasses.replace(layout, tp=tp), train_state=train_state)


def parser():
    p = make_parser("partlab.pipeline_tensor_parallel",
                    "Pipeline stages of tensor-parallel layers on a (pp, tp) process grid.")
    add_pipeline_flags(p)
    p.add_argument("--tp", type=int, default=DEFAULT_TP,
                   help="tensor-parallel processes per stage (the rest form the pipeline)")
    p.add_argument("--tp-impl", choices=("native", "manual"), default="native",
                   help="tensor parallelism inside each stage: DTensor's plan (native) or "
                        "Megatron's f and g by hand (manual)")
    return p


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(report.train_and_report, build), argv)


if __name__ == "__main__":
    distributed.exit_process(main())
