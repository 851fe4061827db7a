"""partlab's single-device reference and synthetic data, checked in-process (no processes)."""
import dataclasses

import pytest
import torch
from reference import plain_reference

from partlab import metrics
from partlab import model as mlp
from partlab.config import Settings

SMALL = Settings(batch_size=16, input_dim=32, hidden_dim=48, num_classes=5, steps=4, layers=3)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_partlab_reference_equals_plain_pytorch(activation):
    s = dataclasses.replace(SMALL, activation=activation)
    model = mlp.build_model(s, torch.device("cpu"))
    losses = metrics.run_steps(s, torch.device("cpu"), mlp.reference_step_fn(model, s)).losses
    plain_losses, plain_params = plain_reference(s)
    # Same ops in the same order on the same device: bit-identical, no tolerance needed.
    assert losses == plain_losses
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), plain_params[name]), name


def test_batches_are_deterministic_and_differ_per_step():
    x0, y0 = mlp.make_batch(SMALL, 0, "cpu")
    x0b, y0b = mlp.make_batch(SMALL, 0, "cpu")
    x1, _ = mlp.make_batch(SMALL, 1, "cpu")
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(x0, x1)
    assert x0.shape == (16, 32) and y0.shape == (16,)
    assert int(y0.min()) >= 0 and int(y0.max()) < SMALL.num_classes


def test_bf16_model_and_batch_use_bf16():
    s = dataclasses.replace(SMALL, dtype="bf16")
    model = mlp.build_model(s, torch.device("cpu"))
    x, _ = mlp.make_batch(s, 0, "cpu")
    assert x.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())

