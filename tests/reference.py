"""The lab's maths in the plainest PyTorch (nn.Sequential + SGD), written independently of
partlab.model, so the tests check partlab's reference as well as the strategies against it."""
import torch
import torch.nn.functional as F
from torch import nn

from partlab.model import make_batch


def plain_reference(settings):
    """Losses and final parameters (named like partlab's: layers.<i>.weight) of a plain run."""
    torch.manual_seed(settings.seed)
    dims = [settings.input_dim] + [settings.hidden_dim] * (settings.layers - 1) \
        + [settings.num_classes]
    linears = [nn.Linear(dims[i], dims[i + 1]) for i in range(settings.layers)]
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
