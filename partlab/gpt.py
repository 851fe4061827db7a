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


def parameter_count(settings, blocks=None, first=True, last=True):
    """Weights and biases of `blocks` blocks (default all), with the embeddings when `first`
    and the final norm and head when `last` (a pipeline stage's share)."""
    h, v = settings.hidden_dim, settings.vocab_size
    block = 4 * (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + 2 * 2 * h
    return (settings.layers if blocks is None else blocks) * block \
        + first * (v * h + settings.seq_len * h) + last * (2 * h + h * v)


def describe(s):
    return (f"GPT {s['layers']} blocks, hidden {s['hidden_dim']}, {s['heads']} heads, "
            f"vocabulary {s['vocab_size']}, sequence {s['seq_len']}")
