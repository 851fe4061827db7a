"""`--model gpt`: a small decoder-only transformer, its token data, and what the lab needs to know
about its size.

Pre-LayerNorm blocks (GPT-2's layout): x + attention(ln1(x)), then x + mlp(ln2(x)); causal
multi-head attention (q, k, v from one linear, head by head, and an output projection); a GELU
MLP of 4x the width; token and learned position embeddings; a final LayerNorm and an LM head
without bias. The attention reshapes to heads with -1, so a tensor-parallel rank holding heads/t
of the qkv features runs the same code on its own heads.

Data: a seeded Markov chain over the vocabulary. Each token's successor is a fixed random
permutation of it with probability 0.8, else uniform, so the ideal loss is about 1.3 nats against
ln(vocab) at the start: a pattern that a small model learns within the lab's steps (through the
embedding -> head path first, attention not needed), generated from (seed, step) on every rank.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

FOLLOW = 0.8          # probability that a token is followed by its successor


class Attention(nn.Module):
    """q, k and v in one linear whose output features are ordered head by head (head 0's q, k, v,
    then head 1's, ...: Megatron-LM's layout), so splitting its rows evenly gives each rank
    whole heads, and their input's gradient is summed across ranks once, not three times."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.head_dim = hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.proj(attend(self.qkv(x), self.head_dim))


def attend(qkv, head_dim):
    """Causal attention of every head in qkv [batch, seq, heads x (q, k, v) x head_dim] ->
    [batch, seq, heads x head_dim]: all the model's heads, or a tensor-parallel rank's own."""
    b, t, _ = qkv.shape
    q, k, v = qkv.view(b, t, -1, 3, head_dim).transpose(1, 2).unbind(dim=3)  # [b, heads, t, d]
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2).reshape(b, t, -1)


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads)
        self.fc, self.proj = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Blocks live in a ModuleDict keyed "0", "1", ... so a pipeline stage can delete what it
    does not own and keep the reference's names ("blocks.1.attn.qkv.weight"). A stage without the
    embeddings takes hidden states; one without the head returns them."""

    def __init__(self, vocab_size, seq_len, hidden, heads, layers):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, hidden), nn.Embedding(seq_len, hidden)
        self.blocks = nn.ModuleDict({str(i): Block(hidden, heads) for i in range(layers)})
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab_size, bias=False)

    def forward(self, x):
        if self.tok is not None:
            x = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks.values():
            x = block(x)
        return x if self.head is None else self.head(self.ln_f(x))


def build(settings, keep=None):
    """The full model from the seed; with `keep` (block indices) a pipeline stage: the first
    block's stage keeps the embeddings, the last block's the final norm and the head."""
    torch.manual_seed(settings.seed)
    model = GPT(settings.vocab_size, settings.seq_len, settings.hidden_dim, settings.heads,
                settings.layers)
    if keep is not None:
        for name in list(model.blocks):
            if int(name) not in keep:
                del model.blocks[name]
        if 0 not in keep:
            model.tok = model.pos = None
        if settings.layers - 1 not in keep:
            model.ln_f = model.head = None
    return model


@functools.lru_cache(maxsize=4)
def _successor(seed, vocab_size):
    return torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed + 7919))


def make_batch(settings, step):
    """Batch `step`: (tokens, the next tokens), [batch, seq_len] each, from (seed, step)."""
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    b, t, v = settings.batch_size, settings.seq_len, settings.vocab_size
    tokens = torch.empty(b, t + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(v, (b,), generator=g)
    successor = _successor(settings.seed, v)
    for i in range(t):
        follows = torch.rand(b, generator=g) < FOLLOW
        tokens[:, i + 1] = torch.where(follows, successor[tokens[:, i]],
                                       torch.randint(v, (b,), generator=g))
    return tokens[:, :-1], tokens[:, 1:]


def parameter_count(settings):
    h, v = settings.hidden_dim, settings.vocab_size
    block = 4 * (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 2 * 2 * h
    return v * h + settings.seq_len * h + settings.layers * block + 2 * h + h * v


def attention_flops(settings):
    """One step's FLOPs of the attention's own matmuls (q k^T and the weights times v): 2 x 2 b
    s^2 h a block forward (causal masking computes them whole), twice that backward."""
    b, s, h = settings.batch_size, settings.seq_len, settings.hidden_dim
    return 3 * settings.layers * 4 * b * s * s * h


def flops(settings):
    """One training step's model FLOPs: every matmul's 2 x m x n x k forward, and twice that
    backward (the input's and the weight's gradient; every input needs one here, since the
    embeddings train): per token 24 h^2 a block and 2 h vocab for the head, plus attention."""
    tokens, h = settings.batch_size * settings.seq_len, settings.hidden_dim
    per_token = settings.layers * 24 * h * h + 2 * h * settings.vocab_size
    return 3 * tokens * per_token + attention_flops(settings)


def activation_bytes(settings, tp=1, vocab_rows=None):
    """Bytes one rank saves for backward in a step: what autograd keeps, counted per token as
    the CPU kernels save it (partlab/counters.py's ActivationMeter measures the same; on CUDA,
    LayerNorm's statistics are fp32 and fused attention may pad its logsumexp: not counted).

    Per block, with t tensor-parallel ranks and h the width, a the heads, in the run's dtype:
      norms         ln1's and ln2's inputs and their mean and 1/std: 2h + 4   (/t under SP)
      column inputs qkv's and fc's (the norms' outputs, whole on every rank): 2h
      TP-sharded    q, k and v (3h), attention's output (h, also proj's input), fc's output
                    before GELU and after (4h + 4h): 12h / t
    and the attention's logsumexp, a / t in fp32; then the final norm (h + 2, /t under SP), the
    head's input (h) and the log-softmax of this rank's vocab_rows logits (fp32), the int64
    tokens, targets and positions, and cross-entropy's fp32 total weight. Korthikanti et al.
    2022 count 34 s b h + 5 a s^2 b bytes a layer (fp16, with dropout and its masks, the s x s
    attention scores stored); here fused attention keeps the logsumexp instead of the scores,
    and there is no dropout. Their sequence parallelism also divides the column inputs by t (the
    all_gather is redone in backward); partlab keeps them whole, so SP saves (2h + 4)(1 - 1/t)
    a block's token. Manual TP saves two bool ownership masks (the embedding's and the loss's),
    a byte a token each, and its own loss no total weight.
    """
    b, s, h = settings.batch_size, settings.seq_len, settings.hidden_dim
    tokens, size = b * s, 2 if settings.dtype == "bf16" else 4
    split = tp if settings.sequence_parallel else 1
    rows = settings.vocab_size if vocab_rows is None else vocab_rows
    block = size * ((2 * h + 4) / split + 2 * h + 12 * h / tp) + 4 * settings.heads / tp
    per_token = settings.layers * block + size * ((h + 2) / split + h) + 4 * rows + 2 * 8
    return round(tokens * per_token) + 8 * s + 4


def describe(s):
    return (f"GPT {s['layers']} blocks, hidden {s['hidden_dim']}, {s['heads']} heads, "
            f"vocabulary {s['vocab_size']}, sequence {s['seq_len']}")
