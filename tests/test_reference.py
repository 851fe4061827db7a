"""partlab's single-device reference and synthetic data, checked in-process (no processes)."""
import dataclasses

import pytest
import torch
from reference import plain_gpt_reference, plain_reference
from torch.utils.flop_counter import FlopCounterMode

from partlab import gpt, harness, partition
from partlab import model as mlp
from partlab.config import GPT_DEFAULTS, Settings
from partlab.theory import compute

pytestmark = pytest.mark.fast
SMALL = Settings(batch_size=16, input_dim=32, hidden_dim=48, num_classes=5, steps=4, layers=3)


def trained(s):
    """partlab's reference model after s.steps steps, and its losses."""
    model = mlp.build_model(s, torch.device("cpu"))
    step = mlp.reference_step_fn(model, s, mlp.make_optimizer(model.parameters(), s))
    return model, harness.run_steps(s, torch.device("cpu"), step).losses


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_partlab_reference_equals_plain_pytorch(activation):
    s = dataclasses.replace(SMALL, activation=activation)
    model, losses = trained(s)
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



def test_tensor_parallel_slices_put_back_together_are_the_reference():
    # Column-parallel layers split weight rows and bias, row-parallel ones weight columns; the
    # row-parallel bias is whole on every rank.
    s = dataclasses.replace(SMALL, layers=4)
    model = mlp.build_model(s, torch.device("cpu"))
    for name, full in model.named_parameters():
        parts = [partition.tp_slice(name, full, rank, 4) for rank in range(4)]
        if name == "layers.1.bias" or name == "layers.3.bias":
            assert all(p is full for p in parts)
        else:
            dim = 0 if partition.is_column_parallel(name) else 1
            assert all(p.shape[dim] == full.shape[dim] // 4 for p in parts), name
            assert torch.equal(torch.cat(parts, dim=dim), full), name


@pytest.mark.parametrize("layers,stages,unit", [(4, 2, 1), (5, 3, 1), (8, 4, 2), (12, 3, 2)])
def test_stages_own_every_layer_once_in_order(layers, stages, unit):
    owned = [list(partition.stage_layers(layers, s, stages, unit)) for s in range(stages)]
    assert [i for stage in owned for i in stage] == list(range(layers - layers % unit))
    assert all(owned) and all(len(stage) % unit == 0 for stage in owned)
    # Interleaved placement: rank r of p holds stages r, r + p, ...
    assert partition.stage_ids(1, 2, 3) == [1, 3, 5]


GPT_LAB = Settings(model="gpt", layers=4, **GPT_DEFAULTS)   # what `partlab lab --model gpt` runs


def test_gpt_reference_learns_within_the_labs_default_steps():
    # The lab's gpt (4 blocks on 2 processes, the default 5 steps): the Markov data's pattern
    # is learnt fast enough that the last loss is at most 70% of the first (ln 64 = 4.16).
    _, losses = trained(GPT_LAB)
    assert len(losses) == 5 and 4.0 < losses[0] < 4.6 and losses[-1] <= 0.7 * losses[0], losses


@pytest.mark.parametrize("layers", [4, 8])
def test_mlp_reference_learns_within_the_labs_default_steps(layers):
    # The lab's MLP (the handout's sizes, 2 layers a process: 4 on 2 processes, 8 on 4) in the
    # default 5 steps: the classes' means stand out of the noise, and the Kaiming init keeps
    # 8 layers' signal, so the last loss is at most 70 % of the first.
    s = Settings(layers=layers)
    model, losses = trained(s)
    assert len(losses) == 5 and losses[-1] <= 0.7 * losses[0], losses


def test_gpt_reference_equals_the_maths_written_out():
    # Different kernels for the same maths (fused attention against the softmax of masked
    # scores, LayerNorm's against its formula): a few ulps a step; after the lab's 5 steps at
    # --lr 1.0 the losses differ by 4.8e-7 and the weights by 2.4e-7 (fp32 eps is 1.2e-7).
    s = dataclasses.replace(GPT_LAB, layers=2)
    model, losses = trained(s)
    plain_losses, plain_params = plain_gpt_reference(s)
    assert losses == pytest.approx(plain_losses, abs=2e-6, rel=0)
    for name, p in model.named_parameters():
        assert (p.detach() - plain_params[name]).abs().max() <= 1e-6, name


def test_gpt_batches_follow_the_markov_chain():
    tokens, targets = mlp.make_batch(GPT_LAB, 3, "cpu")
    again, _ = mlp.make_batch(GPT_LAB, 3, "cpu")
    assert torch.equal(tokens, again) and tokens.shape == targets.shape == (16, 32)
    assert torch.equal(tokens[:, 1:], targets[:, :-1])          # targets: the next tokens
    successor = gpt._successor(GPT_LAB.seed, GPT_LAB.vocab_size)
    follows = (successor[tokens] == targets).float().mean().item()
    assert abs(follows - gpt.FOLLOW) < 0.05, follows           # plus chance hits of 1/64


def test_gpt_parameter_count_is_the_models():
    s = dataclasses.replace(GPT_LAB, vocab_size=65, heads=2)
    model = mlp.build_model(s, torch.device("cpu"))
    assert mlp.parameter_count(s) == sum(p.numel() for p in model.parameters())


def test_gpt_pipeline_stages_own_their_blocks_and_ends():
    first, middle, last = (mlp.build_model(GPT_LAB, torch.device("cpu"), keep=k)
                           for k in ([0], [1, 2], [3]))
    assert first.head is None and first.tok is not None and list(first.blocks) == ["0"]
    assert middle.tok is None and middle.head is None and list(middle.blocks) == ["1", "2"]
    assert last.tok is None and last.head is not None and "blocks.3.attn.qkv.weight" in \
        dict(last.named_parameters())


@pytest.mark.parametrize("settings", [SMALL, GPT_LAB, dataclasses.replace(GPT_LAB, vocab_size=65,
                                                                           seq_len=16)])
def test_model_flops_are_the_matmuls_torch_counts(settings):
    # FlopCounterMode counts every matmul of a step, forward and backward. The attention's own
    # (q k^T and the weights times v) run inside CPU's fused attention kernel, which it may not
    # count: then the count is the formula's less exactly compute.attention_flops.
    model = mlp.build_model(settings, torch.device("cpu"))
    x, y = mlp.make_batch(settings, 0, "cpu")
    with FlopCounterMode(display=False) as counter:
        mlp.loss_fn(model(x), y).backward()
    attention = compute.attention_flops(settings) if settings.model == "gpt" else 0
    assert counter.get_total_flops() in (compute.flops_per_step(settings),
                                         compute.flops_per_step(settings) - attention)
