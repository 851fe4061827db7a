"""partlab/theory, in-process: the schedules' orders against torch's own, the closed forms
against the simulation, activations alive, and the activation counts against what autograd
saves. (The drivers' runs check the same theory against measurements: tests/test_drivers.py.)
"""
import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as torch_schedules

from partlab import model as models
from partlab.config import Settings
from partlab.counters import ActivationMeter
from partlab.theory import memory, pipeline

pytestmark = pytest.mark.fast

P = 4   # pipeline ranks of the fake process group


@pytest.fixture(scope="module")
def fake_group():
    """A process group of P ranks that sends nothing (torch's "fake" backend): enough to build
    torch's schedules, whose orders are computed for every rank when they are made."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=P)
    yield
    dist.destroy_process_group()


def torch_order(schedule, m, v):
    """The compute actions torch's schedule lists for every rank, as (kind, stage, microbatch)."""
    stages = [torch_schedules.PipelineStage(torch.nn.Linear(2, 2), s, P * v, torch.device("cpu"))
              for s in range(0, P * v, P)]
    cls = {"gpipe": torch_schedules.ScheduleGPipe, "1f1b": torch_schedules.Schedule1F1B,
           "interleaved-1f1b": torch_schedules.ScheduleInterleaved1F1B,
           "zero-bubble": torch_schedules.ScheduleInterleavedZeroBubble}[schedule]
    made = cls(stages if v > 1 else stages[0], n_microbatches=m, loss_fn=lambda y, t: y.sum())
    return {r: tuple((a.computation_type.value, a.stage_index, a.microbatch_index)
                     for a in actions
                     if a is not None and a.computation_type.value in pipeline.KINDS)
            for r, actions in made.pipeline_order.items()}


def as_actions(orders):
    return {r: [torch_schedules._Action(s, torch_schedules._ComputationType(k), i)
                for k, s, i in ops] for r, ops in orders.items()}


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("interleaved-1f1b", 2),
                                        ("interleaved-1f1b", 3), ("zero-bubble", 2),
                                        ("zero-bubble", 3)])
@pytest.mark.parametrize("m", [2, 4, 8, 12])
def test_orders_are_torchs(schedule, v, m, fake_group):
    assert pipeline.order(schedule, P, m, v) == torch_order(schedule, m, v)


@pytest.mark.parametrize("m", [4, 8])
def test_1f1b_order_passes_torchs_validation_where_torchs_list_does_not(m, fake_group):
    # Schedule1F1B runs min(m, p - r) forwards first (its _step_microbatches; that this is what
    # runs, every rank's timeline in the drivers' tests confirms: record["bubble"]
    # ["order_as_theory"]). Its pipeline_order, in torch 2.13, gives the last rank forwards of
    # microbatches 1..m instead of 0..m-1, which torch's own validation refuses.
    ours = pipeline.order("1f1b", P, m)
    torch_schedules._validate_schedule(as_actions(ours), P, P, m)
    listed = torch_order("1f1b", m, 1)
    try:
        torch_schedules._validate_schedule(as_actions(listed), P, P, m)
    except AssertionError:
        assert listed[P - 1][0] == ("F", P - 1, 1)       # the known defect
    else:
        assert listed == ours                            # a torch that lists what it runs


@pytest.mark.parametrize("schedule,v", [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2),
                                        ("interleaved-1f1b", 4), ("zero-bubble", 2)])
@pytest.mark.parametrize("p,m", [(2, 2), (2, 8), (4, 4), (4, 16), (8, 16)])
def test_closed_forms_are_the_simulation_of_equal_stages(schedule, v, p, m):
    # Equal stages: forward 1, backward 2 (zero-bubble: input and weight gradient 1 each).
    simulated = pipeline.ideal_bubble(schedule, p, m, v, pipeline.unit_cost)
    assert simulated == pytest.approx(pipeline.closed_form(schedule, p, m, v), abs=1e-12)
    assert pipeline.equal_stages(schedule, p, m, v) == pytest.approx(simulated, abs=1e-12)


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zero-bubble"])
@pytest.mark.parametrize("p,m", [(2, 1), (4, 2), (4, 3), (8, 4)])
def test_fewer_microbatches_than_ranks_leave_more_than_the_formula(schedule, p, m):
    # The interleaved formulas hold for m a multiple of p; below p the chunks wait for each
    # other and the bubble is larger: equal_stages simulates it (e.g. p = 2, m = 1: 50 %
    # for interleaved 1F1B, not 33 %).
    simulated = pipeline.ideal_bubble(schedule, p, m, 2, pipeline.unit_cost)
    assert simulated > pipeline.closed_form(schedule, p, m, 2) + 0.01
    assert pipeline.equal_stages(schedule, p, m, 2) == simulated
    if (schedule, p, m) == ("interleaved-1f1b", 2, 1):
        assert simulated == pytest.approx(0.5)


def test_simulation_of_unequal_stages_by_hand():
    # GPipe on 2 ranks, 2 microbatches; stage 0: F 1, B 2; stage 1: F 3, B 6.
    # Rank 0: F0 [0,1] F1 [1,2]; rank 1: F0 [1,4] F1 [4,7] B0 [7,13] B1 [13,19];
    # rank 0: B0 [13,15] B1 [19,21]. Span 21; busy 6 and 18.
    cost = {("F", 0): 1, ("B", 0): 2, ("F", 1): 3, ("B", 1): 6}
    calls = pipeline.simulate(pipeline.order("gpipe", 2, 2), lambda k, s: cost[k, s])
    assert [c[3:] for c in calls[0]] == [(0, 1), (1, 2), (13, 15), (19, 21)]
    assert [c[3:] for c in calls[1]] == [(1, 4), (4, 7), (7, 13), (13, 19)]
    assert pipeline.bubble(calls) == pytest.approx(((21 - 6) / 21 + (21 - 18) / 21) / 2)
    # A message of 0.5 between ranks delays each crossing.
    late = pipeline.simulate(pipeline.order("gpipe", 2, 2), lambda k, s: cost[k, s], message=0.5)
    assert late[1][0][3:] == (1.5, 4.5) and late[0][2][3:] == (14, 16)


def test_an_order_that_waits_for_itself_is_refused():
    orders = {0: [("F", 0, 0), ("B", 0, 0)], 1: [("B", 1, 0), ("F", 1, 0)]}
    with pytest.raises(ValueError, match="deadlocks"):
        pipeline.simulate(orders, pipeline.unit_cost)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_activations_alive_per_rank(p, m):
    # In chunks (1/v of a rank's layers), with m a multiple of p (torch's rounds of p
    # microbatches): GPipe every microbatch; 1F1B its warm-up, p - r; interleaved 1F1B
    # (v - 1) p + 2 (p - 1 - r) + 1 (its warm-up, and one in steady state); zero-bubble
    # (v - 1) p + p, every rank (its weight gradients lag r calls behind).
    v, rounds = 2, m // p
    alive = {s: [pipeline.alive(ops) for ops in pipeline.order(s, p, m, v).values()]
             for s in pipeline.SCHEDULES}
    assert alive["gpipe"] == [m] * p
    assert alive["1f1b"] == [p - r for r in range(p)]
    assert m // rounds == p
    assert alive["interleaved-1f1b"] == [(v - 1) * p + 2 * (p - 1 - r) + 1 for r in range(p)]
    assert alive["zero-bubble"] == [(v - 1) * p + p] * p


SMALL = Settings(batch_size=6, input_dim=8, hidden_dim=16, num_classes=5, layers=4)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_mlp_activation_count_is_what_autograd_saves(activation, dtype):
    s = dataclasses.replace(SMALL, activation=activation, dtype=dtype)
    model = models.build_model(s, torch.device("cpu"))
    x, y = models.make_batch(s, 0, "cpu")
    meter = ActivationMeter(model.parameters())
    with meter:
        models.loss_fn(model(x), y)
    assert meter.peak == memory.mlp_activation_bytes(s, range(s.layers), s.batch_size)
    # By hand, fp32 ReLU: linear inputs 6 x (8 + 16 + 16 + 16), the last ReLU's output is the
    # last linear's input (shared, counted once), the loss 6 x 5 fp32 + 6 int64 + 4.
    if (activation, dtype) == ("relu", "fp32"):
        assert meter.peak == 4 * 6 * (8 + 3 * 16) + 4 * 30 + 8 * 6 + 4


def test_a_pipeline_ranks_activations_are_its_stages_alive():
    s = dataclasses.replace(SMALL, batch_size=8, microbatches=4, schedule="1f1b",
                            virtual_stages=1)
    per_stage = [memory.stage_activation_bytes(s, stage, 2) for stage in range(2)]
    assert per_stage == [memory.mlp_activation_bytes(s, range(0, 2), 2),
                         memory.mlp_activation_bytes(s, range(2, 4), 2)]
    assert [memory.pipeline_activation_bytes(s, r, 2) for r in range(2)] == \
        [2 * per_stage[0], per_stage[1]]
    gpipe = dataclasses.replace(s, schedule="gpipe")
    assert memory.pipeline_activation_bytes(gpipe, 0, 2) == 4 * per_stage[0]
