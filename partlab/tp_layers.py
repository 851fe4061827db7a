"""Tensor parallelism by hand, on any process group: Megatron-LM's f and g operators and the MLP
built from column/row-parallel pairs (Shoeybi et al. 2019, section 3).

  column-parallel  Y = act(X A_i + a_i)   A split by columns: each rank owns hidden/t outputs
  row-parallel     Z = sum_i Y_i B_i + b  B split by rows: each rank owns a partial sum
  f  identity in forward, all_reduce of the gradient in backward   (enters the column layer)
  g  all_reduce in forward, identity in backward                   (leaves the row layer)

So each pair costs one all_reduce forward and one backward (only when its input needs a
gradient). The row layer's bias is added once, after the reduce. The column layer's linear +
bias + activation can run as one fused op from the extension (partlab/ops.py, csrc/).
`torch.distributed.nn.functional.all_reduce` would be wrong for g: its backward reduces again.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from partlab import ops
from partlab.partition import tp_slice


class CopyToTensorParallel(torch.autograd.Function):
    """Megatron's f: the input enters every rank unchanged; gradients from all ranks are summed."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """Megatron's g: partial sums from all ranks are added; the gradient passes through."""

    @staticmethod
    def forward(ctx, partial, group):
        dist.all_reduce(partial, group=group)
        ctx.mark_dirty(partial)
        return partial

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# Sequence parallelism's conjugate pair (Korthikanti et al. 2022): where f and g meet a region
# whose activations are split along the sequence (dim 1) instead of replicated, the all_reduce
# becomes a reduce_scatter and the identity an all_gather; same bytes, and the norms and
# residuals between them hold 1/t of the activations.

def _all_gather(x, group):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _reduce_scatter(x, group):
    parts = [part.contiguous() for part in x.chunk(dist.get_world_size(group), dim=1)]
    out = torch.empty_like(parts[dist.get_rank(group)])
    dist.reduce_scatter(out, parts, group=group)
    return out


class GatherFromSequenceParallel(torch.autograd.Function):
    """Enters a tensor-parallel region (f's place): all_gather of the sequence forward,
    reduce_scatter of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


class ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Leaves a tensor-parallel region (g's place): partial sums reduce_scattered along the
    sequence forward, the gradient all_gathered backward."""

    @staticmethod
    def forward(ctx, partial, group):
        ctx.group = group
        return _reduce_scatter(partial, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class ScatterToSequenceParallel(torch.autograd.Function):
    """A replicated tensor split along the sequence (no communication), its gradient
    all_gathered backward: where the embeddings enter the sequence-parallel region."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.chunk(dist.get_world_size(group), dim=1)[dist.get_rank(group)].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class ColumnRowParallelMLP(nn.Module):
    """An MLP (or a pipeline stage's whole column/row pairs of one) whose parameters are replaced
    by this rank's slices, running forward with f and g over `group` (None: every process).

    It keeps the MLP's ModuleDict, so parameter names stay the reference's ("layers.3.weight").
    """

    def __init__(self, mlp, group=None, fused=False):
        super().__init__()
        self.layers, self.num_layers, self.act = mlp.layers, mlp.num_layers, mlp.act
        self.activation, self.group, self.fused = mlp.activation, group, fused
        rank, ways = dist.get_rank(group), dist.get_world_size(group)
        for name, param in self.named_parameters():
            param.data = tp_slice(name, param.data, rank, ways).clone()

    def reference_slice(self, name, full):
        """This rank's part of a reference parameter, sliced as its own copy was."""
        return tp_slice(name, full, dist.get_rank(self.group), dist.get_world_size(self.group))

    def column_parallel(self, layer, x):
        """act(x A_i + a_i) on this rank's columns: one fused op, or PyTorch's three."""
        if self.fused:
            return ops.fused_linear(x, layer.weight, layer.bias, self.activation)
        return self.act(F.linear(x, layer.weight, layer.bias))

    def forward(self, x):
        names = list(self.layers)
        for column_name, row_name in zip(names[::2], names[1::2], strict=True):
            column, row = self.layers[column_name], self.layers[row_name]
            h = self.column_parallel(column, CopyToTensorParallel.apply(x, self.group))
            x = ReduceFromTensorParallel.apply(F.linear(h, row.weight), self.group) + row.bias
            if int(row_name) < self.num_layers - 1:
                x = self.act(x)
        return x
