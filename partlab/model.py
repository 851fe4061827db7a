"""The models every strategy trains (the handout's MLP here, `--model gpt` in gpt.py), their
synthetic data, and the single-device reference.

Every rank builds the *full* model from the seed (on the CPU, in fp32, so CPU and GPU runs start
from the same numbers) and then keeps its own slice. Every strategy therefore starts from the
reference's exact weights, and any difference after training is float rounding or a bug.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from partlab import gpt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def activation_fn(name):
    """The activation as a function; GELU is the tanh approximation (what the fused op computes)."""
    if name == "gelu":
        return functools.partial(F.gelu, approximate="tanh")
    return F.relu


class MLP(nn.Module):
    """input -> hidden -> ... -> hidden -> classes, an activation after every layer but the last.

    Layers live in a ModuleDict keyed "0", "1", ... so a pipeline stage can delete the layers it
    does not own and keep the reference's parameter names ("layers.3.weight").

    The weights of the layers an activation follows are Kaiming-normal (std sqrt(2 / fan_in)),
    which keeps the signal's size through the ReLUs: with nn.Linear's default (a sixth of that
    variance) 8 layers shrink it about 1000-fold and nothing trains in the lab's 5 steps.
    """

    def __init__(self, input_dim, hidden_dim, num_classes, layers, activation):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (layers - 1) + [num_classes]
        self.num_layers = layers
        self.activation = activation
        self.act = activation_fn(activation)
        self.layers = nn.ModuleDict(
            {str(i): nn.Linear(dims[i], dims[i + 1]) for i in range(layers)}
        )
        for i in range(layers - 1):
            nn.init.normal_(self.layers[str(i)].weight, std=(2 / dims[i]) ** 0.5)

    def forward(self, x):
        for name, layer in self.layers.items():
            x = layer(x)
            if int(name) < self.num_layers - 1:
                x = self.act(x)
        return x


def build_model(settings, device, keep=None):
    """The full model with the seed's weights, on `device` in the run's dtype; with `keep`
    (layer or block indices) only those, as a pipeline stage holds them."""
    if settings.model == "gpt":
        return gpt.build(settings, keep).to(device=device, dtype=DTYPES[settings.dtype])
    torch.manual_seed(settings.seed)
    model = MLP(settings.input_dim, settings.hidden_dim, settings.num_classes, settings.layers,
                settings.activation)
    for name in list(model.layers):
        if keep is not None and int(name) not in keep:
            del model.layers[name]              # names unchanged: "layers.3.weight" stays
    return model.to(device=device, dtype=DTYPES[settings.dtype])


CLUSTER_SCALE = 2.0   # how far apart the class means lie, in units of the noise


@functools.lru_cache(maxsize=4)
def class_means(seed, input_dim, num_classes):
    g = torch.Generator().manual_seed(seed + 7919)
    return CLUSTER_SCALE * torch.randn(num_classes, input_dim, generator=g)


def make_batch(settings, step, device):
    """Batch `step`: a random class per sample and its input, the class's fixed random mean plus
    unit Gaussian noise (every feature says a little about the class, so the loss falls from
    about ln(classes) within the lab's steps).

    Every rank draws the same batch from (seed, step), so no data needs to be communicated.
    """
    if settings.model == "gpt":
        tokens, targets = gpt.make_batch(settings, step)
        return tokens.to(device), targets.to(device)
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    y = torch.randint(settings.num_classes, (settings.batch_size,), generator=g)
    x = class_means(settings.seed, settings.input_dim, settings.num_classes)[y] \
        + torch.randn(settings.batch_size, settings.input_dim, generator=g)
    return x.to(device=device, dtype=DTYPES[settings.dtype]), y.to(device)


def loss_fn(logits, target):
    """Mean cross-entropy over every sample (MLP) or token (gpt), in fp32 whatever the run's
    dtype."""
    return F.cross_entropy(logits.float().flatten(0, -2), target.flatten())


def mlp_dims(settings):
    """The MLP's widths, input to output: layer i maps dims[i] features to dims[i + 1]."""
    return [settings.input_dim] + [settings.hidden_dim] * (settings.layers - 1) \
        + [settings.num_classes]


def parameter_count(settings, layers=None):
    """Weights and biases of the full model, or of a pipeline stage holding `layers` (MLP
    layers or gpt blocks: the gpt's first stage holds the embeddings, its last the head)."""
    layers = range(settings.layers) if layers is None else layers
    if settings.model == "gpt":
        return gpt.parameter_count(settings, len(layers), first=layers[0] == 0,
                                   last=layers[-1] == settings.layers - 1)
    dims = mlp_dims(settings)
    return sum(dims[i] * dims[i + 1] + dims[i + 1] for i in layers)


def describe(settings):
    """The model in a few words, for a run's summary (settings: a record's settings dict)."""
    s = settings
    if s.get("model") == "gpt":
        return gpt.describe(s)
    return f"MLP {s['input_dim']}-{s['hidden_dim']}-{s['num_classes']} ({s['layers']} layers)"


def make_optimizer(params, settings):
    """--optimizer: SGD (with --momentum) or AdamW, at --lr."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr)
    return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)


def reference_step_fn(model, settings, opt, loss_of=loss_fn, loss_context=None):
    """One plain optimizer step: the behaviour every strategy must reproduce. The
    tensor-parallel drivers train with it too, on their sharded model: only the model differs
    (and, for logits sharded by vocabulary, the loss: by hand, or in loss_parallel's context,
    which its backward needs too)."""

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with (loss_context or contextlib.nullcontext)():
            loss = loss_of(model(x), y)
            loss.backward()
        opt.step()
        return whole(loss.detach())

    return step


def whole(tensor):
    """A DTensor's full value (a loss under loss_parallel is one), else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
