"""`partlab plan` and the step model under it (partlab/theory/step.py): memory and time
arithmetic on configurations with known answers, the long-pipeline shortcut against the whole
simulation, the search at cluster scale against Megatron-LM's published choices, and the
validation's plumbing (its figures are docs/benchmarks.md's)."""
import dataclasses
import json
import random

import pytest

from partlab import cli, plan
from partlab.config import Settings
from partlab.model import parameter_count
from partlab.theory import comm, compute, pipeline, step

pytestmark = pytest.mark.fast

GPT3 = Settings(**{**plan.MODEL_DEFAULTS, **plan.MODELS["gpt3-175b"], "batch_size": 1536})
ROUND = step.Machine("round", gpus_per_node=8, memory_gib=80, peak_tflops=100, efficiency=0.5,
                     intra_gbps=100, inter_gbps=10, intra_latency_us=0, inter_latency_us=0,
                     memory_gbps=float("inf"))


def test_gpt3_has_175_billion_parameters_and_its_state_splits_by_tp_and_pp():
    layout = step.Layout(tp=8, pp=8, dp=16, microbatches=96, schedule="1f1b")
    total = sum(parameter_count(GPT3, range(i * 12, i * 12 + 12)) for i in range(8))
    assert total == parameter_count(GPT3)
    assert total == pytest.approx(175e9, rel=0.01)
    # The first stage: 12 blocks of 12 h^2 + 13 h, and the embeddings, split 8 ways, at 16
    # bytes a parameter (mixed-precision Adam).
    h = 12288
    first = (12 * (12 * h * h + 13 * h) + 51200 * h + 2048 * h) / 8
    memory = step.memory_gib(GPT3, layout, ROUND)
    assert memory["params"] == pytest.approx(first)
    assert memory["state"] == pytest.approx(16 * first / 2**30)


def test_activations_follow_the_schedule_and_recomputation():
    layout = step.Layout(tp=8, pp=8, dp=16, microbatches=96, schedule="1f1b",
                         sequence_parallel=True)

    def first_rank(**change):
        r = step.replica_settings(GPT3, dataclasses.replace(layout, **change))
        return step.activation_bytes(r, 0, 8, 8, change.get("recompute", False))
    # The first rank: 1F1B holds p = 8 microbatches of its 12 blocks, GPipe all 96.
    assert first_rank(schedule="gpipe") == 12 * first_rank()
    r = step.replica_settings(GPT3, layout)
    one = step.memory.gpt_activation_bytes(r, 8, blocks=12, first=True, last=False, batch=1)
    assert first_rank() == 8 * one
    # Recomputing keeps each block's input (1/t under SP) per alive microbatch, plus one
    # block whole while it recomputes.
    assert first_rank(recompute=True) == pytest.approx(
        8 * 12 * 2048 * h_bytes(r) / 8
        + step.memory.gpt_activation_bytes(r, 8, blocks=1, first=False, last=False, batch=1))


def h_bytes(s):
    return s.hidden_dim * comm.DTYPE_BYTES[s.dtype]


@pytest.mark.parametrize("s", [Settings(layers=4, batch_size=32),
                               Settings(model="gpt", layers=3, hidden_dim=64, batch_size=4),
                               Settings(model="gpt", layers=3, hidden_dim=64, batch_size=4,
                                        sequence_parallel=True)])
@pytest.mark.parametrize("impl", ["manual", "native"])
@pytest.mark.parametrize("stages", [1, 3])
def test_tp_messages_by_stage_add_up_to_the_models_count(s, impl, stages):
    calls = [c for st in range(stages)
             for c in sum(step.tp_messages(s, step.stage_layers(s.layers, st, stages),
                                           s.batch_size, 2, impl), start=[])]
    whole = comm.tp_comm(dataclasses.asdict(s), 2, impl)
    assert {op: {"count": sum(o == op for o, _ in calls),
                 "bytes": sum(b for o, b in calls if o == op)} for op, _ in calls} == whole


def test_sp_norm_gradients_are_reduced_once_a_step():
    machine = dataclasses.replace(ROUND, intra_latency_us=10)
    layout = step.Layout(tp=8, pp=8, dp=16, microbatches=96, schedule="1f1b",
                         sequence_parallel=True)
    sp = [step.predict(GPT3, dataclasses.replace(layout, microbatches=m), machine)
          ["time_s"]["sp_gradients"] for m in (96, 48)]
    # The last rank: 12 blocks of 4 norm parameters and 2 row biases, and the final norm's 2.
    one = step.collective_seconds("all_reduce", h_bytes(GPT3), 8, 100, 10)
    assert sp == pytest.approx([74 * one] * 2)


def test_step_time_by_hand():
    # One process (no TP, PP or DP): the step is the FLOPs at 50 TFLOP/s.
    s = Settings(layers=4, batch_size=64, hidden_dim=1024, input_dim=1024)
    one = step.predict(s, step.Layout(1, 1, 1, 1, "gpipe"), ROUND, state_bytes=8)
    assert one["time_s"]["step"] == pytest.approx(compute.flops_per_step(s) / 50e12)
    # GPipe on 2 stages of 2 layers, 4 microbatches of 16 rows: a layer's forward is l =
    # 2 x 16 x 1024^2 FLOPs, its backward 2 l, but the first layer's (no input gradient) l.
    # Rank 0: F 2l, B 3l; rank 1: F 2l, B 4l. Rank 1's forwards end at 10l + d (d: a message,
    # 16 x 1024 x 4 bytes at 100 GB/s), its backwards at 26l + d; rank 0's last backward
    # waits for rank 1's (26l + 2d) and ends 3l later: a span of 29l + 2d.
    s = dataclasses.replace(s, num_classes=1024)
    two = step.predict(s, step.Layout(1, 2, 1, 4, "gpipe"), ROUND, state_bytes=8)
    layer, message = 2 * 16 * 1024 * 1024 / 50e12, 16 * 1024 * 4 / 100e9
    assert two["time_s"]["compute_and_tp"] == pytest.approx(4 * 6 * layer)
    assert two["time_s"]["step"] == pytest.approx(29 * layer + 2 * message)
    # Data parallelism adds one ring all_reduce of the gradients: 2(d-1)/d of them, over IB.
    dp = step.predict(dataclasses.replace(s, batch_size=128), step.Layout(1, 2, 16, 4, "gpipe"),
                      ROUND, state_bytes=8)
    grads = step.memory_gib(s, step.Layout(1, 2, 16, 4, "gpipe"), ROUND)["params"] * 4
    assert dp["time_s"]["dp_all_reduce"] == pytest.approx(2 * 15 / 16 * grads / 10e9)


def spans(schedule, p, m, v, cost, message):
    """(the whole simulation's span, long_span's) for per-call costs {(kind, stage): s}."""
    def of(kind, stage):
        return cost[kind, stage]
    whole = pipeline.span(pipeline.simulate(pipeline.order(schedule, p, m, v), of, message))
    return whole, pipeline.long_span(schedule, p, m, v, of, message)


def test_long_pipelines_take_the_steady_state_shortcut():
    rng = random.Random(0)
    for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2),
                        ("zero-bubble", 2)):
        for p in (2, 4, 8):
            # The planner's stages: equal, but the last (the head) heavier: exact.
            f, extra, message = rng.uniform(0.5, 2), rng.choice((0, 0.5, 3)), \
                rng.choice((0, 0.1, 1))
            cost = {(k, st): (2 if k == "B" else 1) * (f + extra * (st == p * v - 1))
                    for k in pipeline.KINDS for st in range(p * v)}
            for m in (5 * p, 12 * p):
                whole, short = spans(schedule, p, m, v, cost, message)
                assert short == pytest.approx(whole, rel=1e-9), (schedule, p, m)
            # Any stage costs, messages dearer than the calls: within 1 %.
            cost = {(k, st): rng.uniform(0.5, 3) for k in pipeline.KINDS for st in range(p * v)}
            whole, short = spans(schedule, p, 8 * p, v, cost, 5.0)
            assert short == pytest.approx(whole, rel=0.01), (schedule, p)


def test_gpt3_on_1024_a100s_follows_megatrons_guidance(tmp_path, capsys):
    # Narayanan et al. 2021: tensor parallelism within a node (t = 8 of its 8 GPUs), pipeline
    # parallelism across nodes, microbatches of 1-2; Megatron-LM's 175B example: t 8, p 16,
    # microbatch 1, batch 1536.
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--model", "gpt3-175b", "--cluster", "dgx-a100", "--gpus", "1024",
                     "--global-batch", "1536", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    best = result["fit"][0]
    assert best["layout"]["tp"] == 8 and best["layout"]["pp"] >= 8, best
    assert best["microbatch_size"] <= 2 and best["fits"] and best["memory_gib"]["total"] < 72
    assert 0 < best["mfu"] < 0.75 and result["searched"] > 100 and result["rejected"]
    megatron = next(r for r in result["fit"] if r["layout"]["tp"] == 8
                    and r["layout"]["pp"] == 16 and r["microbatch_size"] == 1)
    assert megatron["time_s"]["step"] <= 1.1 * best["time_s"]["step"], megatron
    printed = capsys.readouterr().out
    assert "1. tp=8" in printed and "do not fit:" in printed


@pytest.mark.parametrize("argv,message", [
    (["--model", "gpt4"], "--model gpt4: a preset (gpt3-6.7b"),
    (["--model", "gpt", "--layers", "4"], "--model gpt needs --heads, --hidden-dim"),
    (["--model", "gpt", "--layers", "4", "--hidden-dim", "100", "--heads", "3"],
     "--hidden-dim 100 must be a positive multiple of --heads 3"),
    (["--validate", "--repeats", "0"], "--repeats 0: at least 1"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"partlab: error: {message}") and "\n" not in err, err


def test_a_model_that_fits_nowhere_says_so(capsys):
    assert cli.main(["plan", "--model", "gpt-1t", "--gpus", "8", "--global-batch", "8"]) == 1
    out = capsys.readouterr()
    assert "0 fit" in out.out and "no layout fits" in out.err


def test_validate_runs_the_labs_configurations(tmp_path):
    out = tmp_path / "validate.json"
    assert cli.main(["plan", "--validate", "--quick", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    runs = {r["run"]: r for r in result["runs"]}
    assert set(runs) == set(plan_validate_quick())
    assert all(r["comm_exact"] and r["predicted_step_ms"] > 0 for r in runs.values()), runs
    assert runs["MLP, manual TP"]["predicted_activation_mib"] is None     # not counted
    assert runs["gpt, native TP + SP"]["activation_ratio"] == pytest.approx(1, abs=0.1)
    machine = runs["MLP, zero-bubble m=4"]["repeats"][0]["machine"]
    assert machine["peak_tflops"] > 0 and machine["intra_gbps"] > 0, machine


def plan_validate_quick():
    from partlab import plan_validate
    return plan_validate.QUICK_RUNS


@pytest.mark.parametrize("schedule, m, v", [("gpipe", 4, 1), ("1f1b", 8, 1),
                                             ("zero-bubble", 4, 2)])
def test_a_schedules_own_time_is_what_makes_the_simulation_its_step(schedule, m, v):
    from partlab.calibrate import PROCESSES, schedule_overhead
    stages = [(1e-3 * (1 + st), 2e-3) for st in range(PROCESSES * v)]
    orders = pipeline.order(schedule, PROCESSES, m, v)

    def step_s(c):
        def cost(kind, st):
            return c + {"F": stages[st][0], "B": 2e-3, "I": 1e-3, "W": 1e-3}[kind]
        return pipeline.span(pipeline.simulate(orders, cost, 1e-4))
    measured = {"stages": stages, "step_s": step_s(5e-4)}
    assert schedule_overhead(schedule, m, v, measured, 1e-4) == pytest.approx(5e-4, rel=1e-6)
    # A step no longer than its calls' work adds nothing.
    assert schedule_overhead(schedule, m, v, {**measured, "step_s": step_s(0) / 2}, 1e-4) == 0


def test_collective_figures_by_hand():
    from partlab.calibrate import STREAM, figures
    # 1 GB/s; a call 300 us, a message 200 us: an all_reduce on 2 ranks is the call and 2
    # messages, an all_gather the call and 1; point to point 100 us at 2 GB/s.
    small, large = 4096, 2**24
    measured = {"tflops": 0.05, "stream_s": 3 * 4 * STREAM / 20e9, "schedules": [],
                "seconds": {"all_reduce": {str(n): 700e-6 + n / 1e9 for n in (small, large)},
                            "all_gather": {str(small): 500e-6 + small / 1e9},
                            "send": {str(n): 100e-6 + n / 2e9 for n in (small, large)}}}
    machine, overhead = figures(measured, [])
    assert (machine.call_latency_us, machine.intra_latency_us, machine.p2p_latency_us) == \
        pytest.approx((300, 200, 100))
    assert (machine.intra_gbps, machine.memory_gbps) == pytest.approx((1, 20))
    assert overhead == {}
    # All_reduce's collectives on 2 ranks, as the step model times them.
    assert step.collective_seconds("all_reduce", small, 2, 1, 200, 300) == \
        pytest.approx(700e-6 + small / 1e9)
    assert step.collective_seconds("all_gather", small, 2, 1, 200, 300) == \
        pytest.approx(500e-6 + small / 1e9)
    # A large message no slower than a small one: the machine was too busy to measure.
    measured["seconds"]["all_reduce"][str(large)] = 600e-6
    with pytest.raises(SystemExit, match="too busy to measure"):
        figures(measured, [])
