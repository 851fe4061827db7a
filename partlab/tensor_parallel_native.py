"""Tensor parallelism with PyTorch's own API (torch.distributed.tensor.parallel).

A plan names each layer's style and DTensor does the rest:
  ColwiseParallel  weight Shard(0), bias Shard(0): each rank computes hidden/t output features
  RowwiseParallel  weight Shard(1), bias Replicate: each rank computes a partial sum, and the
                   output is made Replicate by one all_reduce
The backward all_reduce of the column layer's input gradient happens only when that input
needs a gradient (every pair but the first). Compare tensor_parallel_manual.py, which writes
the same communication by hand.

Run: torchrun --standalone --nproc_per_node 2 -m partlab.tensor_parallel_native
"""
import functools
import sys

import torch

from partlab import distributed, metrics, missing_torch_feature
from partlab import model as mlp
from partlab.config import make_parser
from partlab.tensor_parallel_manual import validate_sharding as validate

try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
except ImportError as e:
    raise SystemExit(missing_torch_feature("torch.distributed.tensor.parallel", e)) from None


def plan(model):
    """Even layers column-parallel, odd layers row-parallel: one all_reduce per pair."""
    return {f"layers.{name}": ColwiseParallel() if int(name) % 2 == 0 else RowwiseParallel()
            for name in model.layers}


def build(settings, group):
    mesh = init_device_mesh(group.device.type, (group.world_size,))
    model = mlp.build_model(settings, group.device)
    model = parallelize_module(model, mesh, plan(model))
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = mlp.loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return metrics.Strategy("tensor_parallel_native", step,
                            *local_shards(dict(model.named_parameters()), mesh))


def local_shards(params, mesh):
    """DTensor parameters -> ({name: this rank's shard}, reference_slice(name, full)): the
    reference sharded with each parameter's own placements. src_data_rank=None slices locally
    instead of scattering from rank 0, so this is no collective."""
    def reference_slice(name, full):
        return distribute_tensor(full, mesh, params[name].placements, src_data_rank=None).to_local()

    return {n: p.to_local() for n, p in params.items()}, reference_slice


def parser():
    return make_parser("partlab.tensor_parallel_native",
                       "Tensor parallelism with torch.distributed.tensor.parallel (DTensor).")


def main(argv=None):
    return distributed.run(parser(), validate,
                           functools.partial(metrics.train_and_report, build), argv)


if __name__ == "__main__":
    sys.exit(main())
