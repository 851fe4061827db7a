"""Tensor parallelism by hand: the mechanics that torch.distributed.tensor.parallel hides.

Layers come in pairs (Megatron-LM, Shoeybi et al. 2019, section 3):
  column-parallel  Y = act(X A_i + a_i)   A split by columns: each rank owns hidden/t outputs
  row-parallel     Z = sum_i Y_i B_i + b  B split by rows: each rank owns a partial sum
Two conjugate operators move data between them:
  f  identity in forward, all_reduce of the gradient in backward   (enters the column layer)
  g  all_reduce in forward, identity in backward                   (leaves the row layer)
so each pair costs one all_reduce forward and one backward (only when its input needs a
gradient). The row layer's bias is added once, after the reduce. The column layer's
linear + bias + activation runs as one fused op from the extension (partlab/ops.py, csrc/)
unless --no-fused, which keeps the plain PyTorch path as the reference path.

Run: torchrun --standalone --nproc_per_node 2 -m partlab.tensor_parallel_manual
"""
import argparse
import functools
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from partlab import distributed, metrics, ops
from partlab import model as mlp
from partlab.config import make_parser, require


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: the input enters every rank unchanged; gradients from all ranks are summed."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        dist.all_reduce(grad)
        return grad


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: partial sums from all ranks are added; the gradient passes through."""

    @staticmethod
    def forward(ctx, partial):
        dist.all_reduce(partial)
        ctx.mark_dirty(partial)
        return partial

    @staticmethod
    def backward(ctx, grad):
        return grad


def shard(tensor, dim, group):
    """This rank's contiguous 1/world slice of `tensor` along `dim`."""
    return tensor.chunk(group.world_size, dim=dim)[group.rank]


def column_or_row(name):
    """Layer 0, 2, ... are column-parallel; 1, 3, ... row-parallel."""
    return "column" if int(name.split(".")[1]) % 2 == 0 else "row"


def reference_slice(group):
    """Slice a reference parameter the way this rank's copy was sliced."""
    def slice_(name, full):
        if column_or_row(name) == "column":
            return shard(full, 0, group)          # weight rows and bias: this rank's outputs
        if name.endswith("weight"):
            return shard(full, 1, group)          # weight columns: this rank's inputs
        return full                               # row-parallel bias: replicated
    return slice_


def parallelize(model, group):
    """Replace every parameter by this rank's slice of it (the full weights came from the seed)."""
    slice_ = reference_slice(group)
    for name, param in list(model.named_parameters()):
        param.data = slice_(name, param.data).clone()
    return model


def column_parallel(model, layer, x, fused):
    """act(x A_i + a_i) on this rank's columns: one fused op, or PyTorch's three."""
    if fused:
        return ops.fused_linear(x, layer.weight, layer.bias, model.activation)
    return model.act(F.linear(x, layer.weight, layer.bias))


def forward(model, x, fused):
    """The MLP's forward on sharded weights, f and g marking where ranks communicate."""
    n = model.num_layers
    for i in range(0, n, 2):
        column, row = model.layers[str(i)], model.layers[str(i + 1)]
        h = column_parallel(model, column, CopyToTensorParallel.apply(x), fused)
        x = ReduceFromTensorParallel.apply(F.linear(h, row.weight)) + row.bias
        if i + 2 < n:
            x = model.act(x)
    return x


def validate_sharding(settings, launch, ways=None):
    """What any tensor-parallel MLP needs (native TP and the 2-D mode use this too); ways: the
    tensor-parallel processes (default: all of them)."""
    world_size = ways or launch.world_size
    require(settings.layers % 2 == 0,
            f"--layers {settings.layers}: tensor parallelism pairs a column- with a row-parallel "
            "layer, so use an even number of layers")
    require(settings.hidden_dim % world_size == 0,
            f"--hidden-dim {settings.hidden_dim} is not divisible by {world_size} processes: "
            f"use a multiple of {world_size} or change {'--tp' if ways else '--nproc_per_node'}")


def validate(settings, launch):
    validate_sharding(settings, launch)
    require(not settings.fused or ops.extension_available(),
            f"the fused op (partlab._C) is not built: {ops.BUILD_HINT}, or pass --no-fused")


def validate_device(settings, group):
    """The fused op needs kernels for the device the run landed on (known only after init)."""
    require(not settings.fused or group.device.type != "cuda" or ops.extension_info()["cuda"],
            "the fused op was built without CUDA kernels: rebuild on a CUDA machine with "
            f"PARTLAB_BUILD=cuda ({ops.BUILD_HINT}), or pass --no-fused")


def build(settings, group):
    validate_device(settings, group)
    model = parallelize(mlp.build_model(settings, group.device), group)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = mlp.loss_fn(forward(model, x, settings.fused), y)
        loss.backward()
        opt.step()
        return loss.detach()

    name = "tensor_parallel_manual" + ("" if settings.fused else " (unfused)")
    return metrics.Strategy(name, step, dict(model.named_parameters()), reference_slice(group))


def parser():
    p = make_parser("partlab.tensor_parallel_manual",
                    "Manual tensor parallelism: column/row-parallel layers, all_reduce.")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="column-parallel linear+bias+activation as one op from the "
                        "extension (--no-fused: plain PyTorch)")
    return p


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(metrics.train_and_report, build), argv)


if __name__ == "__main__":
    sys.exit(main())
