"""Tensor parallelism by hand: the mechanics that torch.distributed.tensor.parallel hides.

Layers come in pairs (Megatron-LM, Shoeybi et al. 2019, section 3; partlab/tp_layers.py):
  column-parallel  Y = act(X A_i + a_i)   A split by columns: each rank owns hidden/t outputs
  row-parallel     Z = sum_i Y_i B_i + b  B split by rows: each rank owns a partial sum
Two conjugate operators move data between them:
  f  identity in forward, all_reduce of the gradient in backward   (enters the column layer)
  g  all_reduce in forward, identity in backward                   (leaves the row layer)
so each pair costs one all_reduce forward and one backward (only when its input needs a
gradient). The row layer's bias is added once, after the reduce. The column layer's
linear + bias + activation runs as one fused op from the extension (partlab/ops.py, csrc/)
unless --no-fused, which keeps the plain PyTorch path as the reference path. The training step
is the reference's own: only the model is sharded.

Run: torchrun --standalone --nproc_per_node 2 -m partlab.tensor_parallel_manual
"""
import argparse
import functools

import torch.distributed as dist

from partlab import distributed, ops, report
from partlab import model as models
from partlab.checkpoint import TrainState
from partlab.config import make_parser, require
from partlab.harness import Strategy
from partlab.partition import check_tensor_parallel, default_layers
from partlab.theory.memory import tp_activation_bytes
from partlab.tp_gpt import TensorParallelGPT
from partlab.tp_layers import ColumnRowParallelMLP


def validate(settings, launch):
    settings = settings.with_default_layers(default_layers(settings))
    check_tensor_parallel(settings, launch.world_size)
    require(not settings.fused or ops.extension_available(),
            f"the fused op (partlab._C) is not built: {ops.BUILD_HINT}, or pass --no-fused")
    return settings


def validate_device(settings, group):
    """The fused op needs kernels for the device the run landed on (known only after init)."""
    require(not settings.fused or group.device.type != "cuda" or ops.extension_info()["cuda"],
            "the fused op was built without CUDA kernels: rebuild on a CUDA machine with "
            f"PARTLAB_BUILD=cuda ({ops.BUILD_HINT}), or pass --no-fused")


def build(settings, group):
    validate_device(settings, group)
    full = models.build_model(settings, group.device)
    if settings.model == "gpt":
        model = TensorParallelGPT(full, settings.vocab_size, fused=settings.fused,
                                  sequence_parallel=settings.sequence_parallel)
    else:
        model = ColumnRowParallelMLP(full, fused=settings.fused)
    opt = models.make_optimizer(model.parameters(), settings)
    step = models.reference_step_fn(model, settings, opt, **(
        {"loss_of": model.loss} if settings.model == "gpt" else {}))
    name = "tensor_parallel_manual" + ("" if settings.fused else " (unfused)")
    params = dict(model.named_parameters())
    return Strategy(name, step, params, model.reference_slice,
                    activation_bytes=tp_activation_bytes(settings, group.world_size, params),
                    train_state=TrainState(opt, params, dist.group.WORLD))


def parser():
    p = make_parser("partlab.tensor_parallel_manual",
                    "Manual tensor parallelism: column/row-parallel layers, all_reduce.")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="column-parallel linear+bias+activation as one op from the "
                        "extension (--no-fused: plain PyTorch)")
    return p


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(report.train_and_report, build), argv)


if __name__ == "__main__":
    distributed.exit_process(main())
