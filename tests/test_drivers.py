"""Every strategy, launched with torchrun on CPU + gloo, equals the single-device reference.

Each run is compared three ways: the driver's own in-process check (record["ok"]), its losses
against an independent plain-PyTorch loop computed here, and its communication counts against
the analytic ones. Tolerances are report.TOLERANCE (fp32: loss 1e-5, parameters 1e-4; reasons
written there). The 2-process runs come from the session's one `partlab lab` (conftest.py),
which launches every registry entry exactly as these tests would.
"""
import collections
import dataclasses
import json
import math
from pathlib import Path

import pytest
from launch import SMALL, torchrun
from reference import plain_reference

from partlab import strategies
from partlab.config import GPT_DEFAULTS, Settings
from partlab.report import TOLERANCE
from partlab.theory.compute import flops_per_step

FAST = pytest.mark.fast   # the fast lane: one run per strategy (the 2-process ones from the lab)
SMALL_SETTINGS = Settings(batch_size=32, input_dim=64, hidden_dim=128, num_classes=10, steps=3,
                          layers=4)
PLAIN = {}  # layers -> losses of the plain PyTorch loop


def assert_flops(record):
    """The record's model FLOPs are the formula's for its settings, and its rate and MFU
    follow from them, the step time and the matmul peak measured in the run."""
    flops = flops_per_step(Settings(**record["settings"]))
    assert record["model_flops_per_step"] == flops
    assert record["tflops"] == pytest.approx(flops / record["step_time_s"] / 1e12)
    assert record["matmul_peak_tflops"] > 0 and 0 < record["mfu"] < 1, record
    assert record["device"] == "cuda" or record["datasheet_peak_tflops"] is None, record
    peak = record["datasheet_peak_tflops"] or record["matmul_peak_tflops"]
    assert record["mfu"] == pytest.approx(record["tflops"] / (record["world_size"] * peak))


def assert_matches_reference(record, layers=SMALL_SETTINGS.layers):
    tol = TOLERANCE["fp32"]
    assert record["ok"], record
    assert_flops(record)
    assert record["max_abs_dparam"] <= tol["param"]
    assert len(record["losses"]) == SMALL_SETTINGS.steps
    if layers not in PLAIN:
        PLAIN[layers] = plain_reference(dataclasses.replace(SMALL_SETTINGS, layers=layers))[0]
    for step, (got, want) in enumerate(zip(record["losses"], PLAIN[layers], strict=True), 1):
        assert abs(got - want) <= tol["loss"], f"step {step}: {got} vs plain PyTorch {want}"


def entry_run(key, *flags, sizes=SMALL):
    """(driver module, flags) of a registry entry with the tests' small MLP (or `sizes`)."""
    entry = strategies.get(key)
    return entry.module, [*entry.flags, *sizes, *flags]


def sized(layers):
    return ["--microbatches", "4", "--layers", str(layers)]


GPT = ["--model", "gpt", "--steps", "3"]       # the gpt's own defaults: 2 blocks, 4 heads, ...


def gpt_run(key, *flags):
    return entry_run(key, *flags, sizes=GPT)


GPT_RUNS = {f"gpt {key}": gpt_run(key)
            for key in ("tp-native", "tp-manual", "tp-manual-unfused", "pipeline-gpipe",
                        "pipeline-1f1b", "pipeline-interleaved-1f1b", "pipeline-zero-bubble")}
# A vocabulary that 2 ranks cannot split evenly: manual TP pads it, DTensor shards it unevenly.
GPT_RUNS.update({f"gpt {key} vocab 65": gpt_run(key, "--vocab-size", "65")
                 for key in ("tp-manual", "tp-native")})
GPT_SP = {f"gpt {key} sp": gpt_run(key, "--sequence-parallel")
          for key in ("tp-native", "tp-manual", "pp-tp-native", "pp-tp-manual")}

# The runs that the session's lab (2 processes) does not cover, by world size: each world size
# is one torchrun launch of tests/helpers/runs.py (a process group, the runs one after another).
RUNS = {
    2: {"timeline": ("partlab.pipeline", [*SMALL, "--schedule", "zero-bubble", "--microbatches",
                                          "4", "--timeline", "{tmp}/timeline"]),
        "bf16 tp-native": entry_run("tp-native", "--dtype", "bf16"),
        "bf16 tp-manual gelu": entry_run("tp-manual", "--dtype", "bf16", "--activation", "gelu"),
        "bf16 pipeline-1f1b": entry_run("pipeline-1f1b", "--dtype", "bf16"), **GPT_RUNS,
        **{name: GPT_SP[name] for name in ("gpt tp-native sp", "gpt tp-manual sp")}},
    3: {f"pipeline-{s}": entry_run(f"pipeline-{s}", *sized(4)) for s in ("gpipe", "1f1b")},
    4: {**{key: entry_run(key) for key in ("tp-native", "tp-manual", "tp-manual-unfused")},
        **{f"pipeline-{s}": entry_run(f"pipeline-{s}", *sized(4)) for s in ("gpipe", "1f1b")},
        "pipeline-interleaved-1f1b": entry_run("pipeline-interleaved-1f1b", *sized(8)),
        **{f"{key} {s}": entry_run(key, "--schedule", s, *sized(8))
           for key, s in (("pp-tp-native", "gpipe"), ("pp-tp-native", "interleaved-1f1b"),
                          ("pp-tp-manual", "gpipe"))},
        **{name: GPT_RUNS[name] for name in ("gpt tp-native", "gpt tp-manual",
                                             "gpt pipeline-1f1b")},
        **{f"gpt {key}": gpt_run(key) for key in ("pp-tp-native", "pp-tp-manual")}, **GPT_SP,
        # 9 on 4 ranks is 3 + 3 + 3 + 0: the last rank holds only padding.
        "gpt tp-manual vocab 9": gpt_run("tp-manual", "--vocab-size", "9")},
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launched(nproc, name) -> the record of RUNS[nproc][name]; each world size's runs are
    launched together, the first time one of them is asked for."""
    done = {}

    def record(nproc, name):
        if nproc not in done:
            tmp = tmp_path_factory.mktemp(f"runs{nproc}")
            specs = [[module, [a.format(tmp=tmp) for a in flags] + ["--json", f"{tmp}/{i}.json"]]
                     for i, (module, flags) in enumerate(RUNS[nproc].values())]
            (tmp / "spec.json").write_text(json.dumps(specs))
            proc, _ = torchrun("tests/helpers/runs.py", nproc, str(tmp / "spec.json"),
                               timeout=600)
            assert proc.returncode == 0, proc.stdout[-6000:]
            done[nproc] = {name: json.loads((tmp / f"{i}.json").read_text())
                           for i, name in enumerate(RUNS[nproc])}
        return done[nproc][name]
    return record


def registry_run(key, nproc, lab_records, launched):
    """A registry entry's record on nproc processes: the session lab's for 2, else RUNS'."""
    return lab_records[key] if nproc == 2 else launched(nproc, key)


@pytest.mark.parametrize("key", [s.key for s in strategies.of_kind("tp")])
@pytest.mark.parametrize("nproc", [pytest.param(2, marks=FAST), 4])
def test_tensor_parallel_matches_reference(key, nproc, lab_records, launched):
    record = registry_run(key, nproc, lab_records, launched)
    assert_matches_reference(record)
    assert record["world_size"] == nproc
    # 4 layers = 2 column/row pairs: one all_reduce forward per pair, and one backward for
    # the second pair only (the first pair's input is data, which needs no gradient).
    s = SMALL_SETTINGS
    payload = 4 * s.batch_size * (s.hidden_dim + s.num_classes + s.hidden_dim)  # fp32 bytes
    for total, backward, size in zip(record["comm_per_step"], record["comm_in_backward"],
                                     record["comm_bytes_per_step"], strict=True):
        assert total == {"all_reduce": 3}, total
        assert backward == {"all_reduce": 1}, backward
        # forward: the pairs' outputs (batch x hidden, batch x classes); backward: the second
        # pair's input gradient (batch x hidden)
        assert size == {"all_reduce": payload}, size


def expected_p2p(ranks, virtual_stages, m):
    """Sends (= recvs) per pipeline rank: per microbatch an activation to the next stage and a
    gradient to the previous one, for every stage the rank holds (r, r+p, ...)."""
    stages = ranks * virtual_stages
    return [m * sum((s > 0) + (s < stages - 1) for s in range(r, stages, ranks))
            for r in range(ranks)]


@pytest.mark.parametrize("schedule,nproc,layers", [
    pytest.param("gpipe", 2, 4, marks=FAST), ("gpipe", 3, 4), ("gpipe", 4, 4),
    pytest.param("1f1b", 2, 4, marks=FAST), ("1f1b", 3, 4), ("1f1b", 4, 4),
    pytest.param("interleaved-1f1b", 2, 4, marks=FAST), ("interleaved-1f1b", 4, 8),
    pytest.param("zero-bubble", 2, 4, marks=FAST),
])
def test_pipeline_matches_reference(schedule, nproc, layers, lab_records, launched):
    m = 4   # the drivers' default, which the session's lab uses too (with 4 layers on 2 ranks)
    record = registry_run(f"pipeline-{schedule}", nproc, lab_records, launched)
    assert record["settings"]["microbatches"] == m and record["settings"]["layers"] == layers
    assert_matches_reference(record, layers)
    v = 2 if schedule in ("interleaved-1f1b", "zero-bubble") else 1
    # Every layer in exactly one stage, in order, each stage at least one layer.
    assert [i for stage in record["stage_layers"] for i in stage] == list(range(layers))
    assert len(record["stage_layers"]) == nproc * v and all(record["stage_layers"])
    # Point to point only.
    for total, sends in zip(record["comm_per_step"], expected_p2p(nproc, v, m), strict=True):
        assert total == {"send": sends, "recv": sends}, (total, sends)
    assert_bubble_and_activations(record)


def assert_bubble_and_activations(record):
    """A pipeline run's theory (partlab/theory/pipeline.py): its ranks ran the theory's order
    of calls; the measured bubble is at least this model's ideal and its span at least the
    ideal's (the same order and call times, with messages free: time between calls only adds
    to them; 0.9 and 1.2 for call times that vary from the medians the ideal takes); the
    activations each rank kept are the analytic count of its stages' microbatches alive at
    once, to the byte."""
    bubble, s = record["bubble"], record["settings"]
    assert bubble["order_as_theory"], bubble
    p, m, v = record["pipeline_ranks"], s["microbatches"], s["virtual_stages"]
    assert bubble["theory"] == pytest.approx(
        (p - 1) / ((3 if s["schedule"] == "zero-bubble" else 1) * v * m + p - 1))
    assert len(bubble["per_rank"]) == record["world_size"], bubble
    assert 0.9 * bubble["ideal"] <= bubble["measured"] < 1, bubble
    assert bubble["ideal_span_s"] <= 1.2 * bubble["span_s"], bubble
    counted = s["schedule"] != "zero-bubble" or (s["model"], s["activation"]) == ("mlp", "relu")
    if record["tp"] is None and counted:
        assert [round(a * 2**20) for a in record["analytic_activation_mib"]] == \
            [round(a * 2**20) for a in record["peak_activation_mib"]], record


def test_pipeline_timeline_files(launched):
    m, steps = 4, 3
    png, trace = map(Path, launched(2, "timeline")["bubble"]["files"])
    assert (png.name, trace.name) == ("timeline.png", "timeline.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    # Each of the 4 stages runs a forward per microbatch per step; its backward is either
    # whole (B) or split into input (I) and weight (W) parts.
    kinds = collections.Counter(e["name"][0] for e in events)
    assert kinds["F"] == steps * m * 4 and kinds["B"] + kinds["W"] == steps * m * 4
    assert kinds["I"] == kinds["W"] > 0
    assert {e["tid"] for e in events} == {0, 1} and all(e["dur"] > 0 for e in events)


@pytest.mark.parametrize("key,schedule", [pytest.param("pp-tp-native", "gpipe", marks=FAST),
                                          ("pp-tp-native", "interleaved-1f1b"),
                                          pytest.param("pp-tp-manual", "gpipe", marks=FAST)])
def test_pipeline_of_tensor_parallel_stages_matches_reference(key, schedule, launched):
    m, tp, pp, layers = 4, 2, 2, 8
    record = launched(pp * tp, f"{key} {schedule}")
    assert record["settings"]["schedule"] == schedule and record["settings"]["layers"] == layers
    assert_matches_reference(record, layers)
    assert record["tp"] == tp and record["settings"]["tp_impl"] == key.removeprefix("pp-tp-")
    v = 2 if schedule == "interleaved-1f1b" else 1
    assert [len(stage) for stage in record["stage_layers"]] == [layers // (pp * v)] * (pp * v)
    sends = expected_p2p(pp, v, m)
    for rank, total in enumerate(record["comm_per_step"]):
        pipeline_rank = rank // tp
        pairs = [i // 2 for s in range(pipeline_rank, pp * v, pp)
                 for i in record["stage_layers"][s] if i % 2 == 0]
        # Per microbatch, per pair: one all_reduce forward, one backward unless it is the
        # model's first pair (its input is data).
        reduces = m * sum(1 + (pair > 0) for pair in pairs)
        assert total == {"all_reduce": reduces, "send": sends[pipeline_rank],
                         "recv": sends[pipeline_rank]}, (rank, total)
    assert_bubble_and_activations(record)


@pytest.mark.parametrize("name", [n for n in RUNS[2] if n.startswith("bf16")])
def test_bf16_matches_reference_within_bf16_tolerance(name, launched):
    record = launched(2, name)
    assert record["ok"] and record["dtype"] == "bf16"
    assert record["max_abs_dloss"] <= TOLERANCE["bf16"]["loss"]
    if record["bubble"]:
        assert_bubble_and_activations(record)


HANDOUT = ["--batch-size", "64", "--input-dim", "1024", "--hidden-dim", "2048",
           "--num-classes", "10", "--steps", "5"]


@pytest.mark.parametrize("module,nproc,args", [
    ("partlab.tensor_parallel_native", 2, HANDOUT),
    ("partlab.tensor_parallel_manual", 2, HANDOUT),
    ("partlab.pipeline", 2, []),
    ("partlab.pipeline", 4, []),    # stages follow the process count: 4 layers by default
])
def test_handout_commands_as_written(module, nproc, args):
    proc, _ = torchrun(module, nproc, *args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert ": OK" in proc.stdout and "step time" in proc.stdout


def test_check_fails_when_the_result_is_wrong(tmp_path):
    # A manual TP whose forward all_reduce does nothing trains a different model: --check
    # must turn that into a non-zero exit.
    proc, _ = torchrun("tests/helpers/fault.py", 2, "skip-reduce",
                       "partlab.tensor_parallel_manual", *SMALL, "--check")
    assert proc.returncode != 0
    assert "EXCEEDED" in proc.stdout and "deviates from the reference" in proc.stdout


@pytest.mark.parametrize("name,nproc", [(name, 2) for name in GPT_RUNS]
                         + [(name, 2) for name in ("gpt tp-native sp", "gpt tp-manual sp")]
                         + [(name, 4) for name in ("gpt tp-native", "gpt tp-manual",
                                                   "gpt pipeline-1f1b", "gpt pp-tp-native",
                                                   "gpt pp-tp-manual", "gpt tp-manual vocab 9",
                                                   *GPT_SP)])
def test_gpt_matches_reference_and_learns(name, nproc, launched):
    record = launched(nproc, name)
    tol = TOLERANCE["fp32"]
    assert record["ok"] and record["max_abs_dloss"] <= tol["loss"], record
    assert_flops(record)
    assert record["max_abs_dparam"] <= tol["param"] and record["world_size"] == nproc
    losses = record["losses"]
    chance = math.log(record["settings"]["vocab_size"])   # the loss of a uniform guess
    assert 0.9 * chance < losses[0] < 1.2 * chance and losses[-1] < 0.9 * losses[0], losses
    if record["bubble"]:
        assert_bubble_and_activations(record)
    if name.startswith(("gpt tp-native", "gpt tp-manual")):
        # What each rank saves for backward, measured, against theory.memory's count: to the
        # byte, but that manual TP saves two bool ownership masks (a byte a token each) and no
        # cross-entropy total weight (4 bytes).
        tokens = record["settings"]["batch_size"] * record["settings"]["seq_len"]
        extra = 2 * tokens - 4 if name.startswith("gpt tp-manual") else 0
        for measured, analytic in zip(record["peak_activation_mib"],
                                      record["analytic_activation_mib"], strict=True):
            assert round((measured - analytic) * 2**20) == extra, (measured, analytic)
    if name.startswith(("gpt tp-native", "gpt tp-manual")) and name.endswith(" sp"):
        # Sequence parallelism: each all_reduce of a block becomes a reduce_scatter + all_gather
        # (Korthikanti et al. 2022). all_gather: forward the 2 per block and the head's input,
        # backward the 2 row outputs' per block and the embeddings' split; reduce_scatter: the
        # reverse, without the split. An all_gather hands over [batch, seq/t, hidden], a
        # reduce_scatter [batch, seq, hidden]: together an all_reduce's bytes.
        s, blocks = Settings(**GPT_DEFAULTS), 2
        full = 4 * s.batch_size * s.seq_len * s.hidden_dim
        # all_reduce: the embedding's, the loss's 3, and the gradients of each block's 2 norms
        # (weight and bias) and of the final norm, summed over the sequence: manual TP as they
        # arrive in backward, with the 2 row biases' too; DTensor leaves the norms' gradients
        # Partial for SGD's update to reduce, and adds each row bias before its reduce_scatter,
        # where the gradient is already whole.
        manual = name.startswith("gpt tp-manual")
        for total, backward, payload in zip(record["comm_per_step"], record["comm_in_backward"],
                                            record["comm_bytes_per_step"], strict=True):
            assert total["all_gather"] == 4 * blocks + 2, total
            assert total["reduce_scatter"] == 4 * blocks + 1, total
            norms = 4 * blocks + 2
            assert total["all_reduce"] == 1 + 3 + norms + manual * 2 * blocks, total
            assert backward.get("all_reduce", 0) == manual * (norms + 2 * blocks), backward
            assert payload["all_gather"] == (4 * blocks + 2) * full // nproc, payload
            assert payload["reduce_scatter"] == (4 * blocks + 1) * full, payload
    elif name.startswith(("gpt tp-native", "gpt tp-manual")):
        # Megatron-LM's count: the embedding's all_reduce, then per block 2 forward (attention
        # and MLP outputs) and 2 backward (their inputs' gradients), and the LM head's input
        # gradient; every one a [batch, seq, hidden] fp32 tensor. The loss adds its 3 (max,
        # sum of exponentials, target logit) of [tokens]: manual TP's by hand, loss_parallel's
        # inside DTensor's op handlers.
        s, blocks = Settings(**GPT_DEFAULTS), 2
        tokens = s.batch_size * s.seq_len
        count = 2 + 4 * blocks + 3
        size = 4 * tokens * (s.hidden_dim * (2 + 4 * blocks) + 3)
        for total, backward, payload in zip(record["comm_per_step"], record["comm_in_backward"],
                                            record["comm_bytes_per_step"], strict=True):
            assert total == {"all_reduce": count}, total
            assert backward == {"all_reduce": 1 + 2 * blocks}, backward
            assert payload == {"all_reduce": size}, payload
    if name.startswith("gpt pp-tp") and name.endswith(" sp"):
        # Between stages each tp rank sends its 1/t of the sequence, not the whole.
        whole = launched(nproc, name.removesuffix(" sp"))["comm_bytes_per_step"][0]["send"]
        assert record["comm_bytes_per_step"][0]["send"] * 2 == whole, record
