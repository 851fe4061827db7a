"""The gpt's tensor parallelism by hand, as Megatron-LM writes it (Shoeybi et al. 2019, 3), with
tp_layers.py's f and g on any process group.

  embedding    vocabulary-parallel: each rank holds vocab/t rows; a token outside them looks up
               zeros, and one all_reduce (g) gives every rank the full embedding
  attention    f, then qkv column-parallel (whole heads per rank: gpt.Attention's layout), each
               rank attends with its own heads, the output projection row-parallel, g
  MLP          f, fc column-parallel with its GELU (the fused op with --fused), proj
               row-parallel, g; a row layer's bias is added once, after g
  LM head      f, then column-parallel by vocabulary: each rank's logits for its own vocab/t
  loss         vocabulary-parallel cross-entropy: the max and the sum of exponentials over the
               vocabulary, and the target's logit, each one all_reduce of [tokens] numbers,
               never the [tokens, vocab] logits gathered
A vocabulary that does not divide is padded to a multiple of t; the padded rows are zeros, and
their logits are left out of the loss, so it equals the unpadded reference.

With sequence parallelism (Korthikanti et al. 2022) the residual stream, the norms and the
dropout-free rest between the TP regions hold seq/t of the tokens: f and g become
tp_layers.py's all_gather / reduce_scatter pair (the same bytes), the embeddings are split along
the sequence after their all_reduce (Megatron's order when positions are learned), and the norms'
and row biases' gradients, now partial sums over the sequence, are all_reduced as they arrive.
The pipeline sends 1/t of the activations between stages.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from partlab import ops
from partlab.gpt import attend
from partlab.partition import tp_slice, vocab_shard
from partlab.tp_layers import (
    CopyToTensorParallel,
    GatherFromSequenceParallel,
    ReduceFromTensorParallel,
    ReduceScatterToSequenceParallel,
    ScatterToSequenceParallel,
)

# Parameters that act on each rank's own part of the sequence under sequence parallelism.
SEQUENCE_SHARDED = (".ln1.", ".ln2.", "ln_f.", ".proj.bias")


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits [tokens, vocab shard] (this rank's columns `start`,
    `start + 1`, ...; those at `vocab_size` and beyond are padding) against targets [tokens]."""

    @staticmethod
    def forward(ctx, logits, target, start, vocab_size, group):
        logits = logits.float()
        columns = start + torch.arange(logits.shape[1], device=logits.device)
        logits = logits.masked_fill(columns >= vocab_size, -torch.inf)
        high = logits.max(dim=1).values
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - high[:, None]
        exp = shifted.exp()
        total = exp.sum(dim=1)
        dist.all_reduce(total, group=group)
        mine, local = owned(target, start, logits.shape[1])
        # where, not a product: a rank holding only padding has -inf there, and -inf * 0 is nan
        picked = torch.where(mine, shifted.gather(1, local[:, None]).squeeze(1), 0.0)
        dist.all_reduce(picked, group=group)
        ctx.save_for_backward(exp / total[:, None], mine, local)
        return (total.log() - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        softmax, mine, local = ctx.saved_tensors
        grad_logits = softmax.clone()
        rows = torch.arange(len(local), device=local.device)
        grad_logits[rows, local] -= mine.to(softmax.dtype)
        return grad_logits * (grad / len(local)), None, None, None, None


def owned(ids, start, rows):
    """(which ids fall in this rank's vocabulary rows start, ..., start + rows - 1, their row
    there: 0 for the others, which the caller masks)."""
    mine = (ids >= start) & (ids < start + rows)
    return mine, torch.where(mine, ids - start, 0)


def vocab_start(vocab_size, group):
    """The first vocabulary row of this rank of `group`."""
    return dist.get_rank(group) * vocab_shard(vocab_size, dist.get_world_size(group))


def vocab_parallel_loss(vocab_size, group=None):
    """loss(logits, target) for logits split by vocabulary over `group`, as the head splits
    them."""
    start = vocab_start(vocab_size, group)

    def loss(logits, target):
        return VocabParallelCrossEntropy.apply(logits.flatten(0, -2), target.flatten(), start,
                                               vocab_size, group)
    return loss


class TensorParallelGPT(nn.Module):
    """A gpt.GPT (or a pipeline stage of one: without the embeddings, or the head) whose
    parameters are replaced by this rank's slices (partition.tp_slice), run with f and g over
    `group` (None: every process). Parameter names stay the reference's."""

    def __init__(self, model, vocab_size, group=None, fused=False, sequence_parallel=False):
        super().__init__()
        self.tok, self.pos, self.blocks = model.tok, model.pos, model.blocks
        self.ln_f, self.head = model.ln_f, model.head
        self.group, self.fused, self.sequence_parallel = group, fused, sequence_parallel
        self.enter = GatherFromSequenceParallel if sequence_parallel else CopyToTensorParallel
        self.leave = ReduceScatterToSequenceParallel if sequence_parallel \
            else ReduceFromTensorParallel
        rank, ways = dist.get_rank(group), dist.get_world_size(group)
        self.start = vocab_start(vocab_size, group)
        self.loss = vocab_parallel_loss(vocab_size, group)
        for name, param in self.named_parameters():
            param.data = tp_slice(name, param.data, rank, ways).clone()
            if sequence_parallel and any(part in name for part in SEQUENCE_SHARDED):
                param.register_hook(self.sum_over_sequence)

    def sum_over_sequence(self, grad):
        """Each gradient that reaches the parameter (one per pipeline microbatch), summed over
        the sequence's ranks before it is accumulated. Megatron sums the accumulated gradient
        once per step instead: fewer calls, the same sum."""
        grad = grad.clone()
        dist.all_reduce(grad, group=self.group)
        return grad

    def reference_slice(self, name, full):
        """This rank's part of a reference parameter, sliced as its own copy was."""
        return tp_slice(name, full, dist.get_rank(self.group), dist.get_world_size(self.group))

    def embed(self, tokens):
        mine, local = owned(tokens, self.start, self.tok.weight.shape[0])
        x = F.embedding(local, self.tok.weight)
        x = ReduceFromTensorParallel.apply(x * mine[..., None], self.group)
        x = x + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return ScatterToSequenceParallel.apply(x, self.group) if self.sequence_parallel else x

    def row_parallel(self, layer, x):
        """x B_i summed over ranks (g, or its reduce_scatter), then the bias, once."""
        return self.leave.apply(F.linear(x, layer.weight), self.group) + layer.bias

    def mlp_hidden(self, block, x):
        if self.fused:
            return ops.fused_linear(x, block.fc.weight, block.fc.bias, "gelu")
        return F.gelu(block.fc(x), approximate="tanh")

    def forward(self, x):
        if self.tok is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            h = self.enter.apply(block.ln1(x), self.group)
            x = x + self.row_parallel(block.attn.proj, attend(block.attn.qkv(h),
                                                              block.attn.head_dim))
            h = self.enter.apply(block.ln2(x), self.group)
            x = x + self.row_parallel(block.proj, self.mlp_hidden(block, h))
        if self.head is None:
            return x
        return self.head(self.enter.apply(self.ln_f(x), self.group))
