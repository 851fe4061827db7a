"""The lab's maths in the plainest PyTorch (nn.Sequential + SGD for the MLP, the gpt's formulas
written out), independently of partlab.model and partlab.gpt, so the tests check partlab's
reference as well as the strategies against it."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from partlab import gpt
from partlab.model import make_batch


def plain_reference(settings):
    """Losses and final parameters (named like partlab's: layers.<i>.weight) of a plain run."""
    torch.manual_seed(settings.seed)
    dims = [settings.input_dim] + [settings.hidden_dim] * (settings.layers - 1) \
        + [settings.num_classes]
    linears = [nn.Linear(dims[i], dims[i + 1]) for i in range(settings.layers)]
    for lin in linears[:-1]:
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")    # std sqrt(2 / fan_in)
    act = nn.ReLU() if settings.activation == "relu" else nn.GELU(approximate="tanh")
    net = nn.Sequential(*[m for lin in linears for m in (lin, act)][:-1])
    opt = torch.optim.SGD(net.parameters(), lr=settings.lr)
    losses = []
    for step in range(settings.steps):
        x, y = make_batch(settings, step, "cpu")
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    params = {f"layers.{i}.{k}": v.detach() for i, lin in enumerate(linears)
              for k, v in lin.named_parameters()}
    return losses, params


def plain_gpt_reference(settings):
    """Losses and final parameters of the gpt's maths written out: LayerNorm from its mean and
    variance, attention as the softmax of causally masked scores, GELU's tanh formula, and SGD
    by hand. Only the initial weights (random numbers) come from partlab.gpt."""
    w = {n: p.detach().clone().requires_grad_()
         for n, p in gpt.build(settings).named_parameters()}
    b, s, h, heads = settings.batch_size, settings.seq_len, settings.hidden_dim, settings.heads
    d = h // heads
    causal = torch.ones(s, s, dtype=torch.bool).tril()

    def linear(x, name, bias=True):
        return x @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if bias else 0)

    def norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def forward(tokens):
        x = w["tok.weight"][tokens] + w["pos.weight"][:s]
        for i in range(settings.layers):
            block = f"blocks.{i}"
            # Features head by head: head j's q, k, v are columns [j, 0..2] of [heads, 3, d].
            qkv = linear(norm(x, f"{block}.ln1"), f"{block}.attn.qkv").view(b, s, heads, 3, d)
            q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))   # [b, heads, s, d]
            scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~causal, -math.inf)
            y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, s, h)
            x = x + linear(y, f"{block}.attn.proj")
            u = linear(norm(x, f"{block}.ln2"), f"{block}.fc")
            gelu = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
            x = x + linear(gelu, f"{block}.proj")
        return linear(norm(x, "ln_f"), "head", bias=False)

    losses = []
    for step in range(settings.steps):
        tokens, targets = gpt.make_batch(settings, step)
        loss = F.cross_entropy(forward(tokens).reshape(-1, settings.vocab_size),
                               targets.reshape(-1))
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for p, g in zip(w.values(), grads, strict=True):
                p -= settings.lr * g
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in w.items()}
