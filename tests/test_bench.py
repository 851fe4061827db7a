"""`partlab bench`: the analytic communication model by hand, and every sweep run with --quick
(one `partlab bench all --quick`, shared by the checks below) whose results must agree with it."""
import dataclasses
import json
import sys
from pathlib import Path

import pytest
from launch import run

from partlab import bench, cli
from partlab.config import Settings
from partlab.theory import comm

PARTLAB = [sys.executable, "-m", "partlab"]
PNG = b"\x89PNG\r\n\x1a\n"


def settings(**kw):
    return dataclasses.asdict(Settings(**kw))


def test_tp_comm_by_hand():
    # 2 layers (the handout's MLP): one forward all_reduce of the logits, 64 x 10 fp32; the
    # first pair's backward needs none (the input needs no gradient).
    assert comm.tp_comm(settings(layers=2), 2, "manual") == {
        "all_reduce": {"count": 1, "bytes": 64 * 10 * 4}}
    # 4 layers, batch 32, 64-128-10: forward 32x128 (pair 1's row layer) + 32x10 (pair 2's);
    # backward 32x128 (pair 2's column input): 8512 elements.
    s = settings(batch_size=32, input_dim=64, hidden_dim=128, layers=4)
    assert comm.tp_comm(s, 2, "manual") == {"all_reduce": {"count": 3, "bytes": 34048}}
    assert comm.tp_comm({**s, "dtype": "bf16"}, 2, "manual")["all_reduce"]["bytes"] == 17024


def test_gpt_tp_comm_by_hand():
    # The gpt's defaults: 2 blocks, 16 x 32 = 512 tokens of width 64, fp32. A [tokens, hidden]
    # tensor is 131,072 bytes; the loss reduces 3 numbers a token (6,144 bytes).
    s = settings(model="gpt", batch_size=16, hidden_dim=64, layers=2)
    # The embedding, 4 a block, the head's input gradient: 10 [tokens, hidden]; the loss's 3.
    assert comm.tp_comm(s, 2, "manual") == {
        "all_reduce": {"count": 13, "bytes": 10 * 131072 + 6144}}
    sp = {**s, "sequence_parallel": True}
    native, manual = comm.tp_comm(sp, 2, "native"), comm.tp_comm(sp, 2, "manual")
    # 10 all_gathers of half the tokens, 9 reduce_scatters of all of them, on either.
    assert native["all_gather"] == manual["all_gather"] == {"count": 10, "bytes": 10 * 65536}
    assert native["reduce_scatter"] == {"count": 9, "bytes": 9 * 131072}
    # all_reduce: the embedding's, the loss's 3, the 10 norm vectors (64 floats, 256 bytes);
    # manual TP also the 4 row biases.
    assert native["all_reduce"] == {"count": 14, "bytes": 131072 + 6144 + 10 * 256}
    assert manual["all_reduce"] == {"count": 18, "bytes": 131072 + 6144 + 14 * 256}


def test_ring_wire_bytes_by_hand():
    assert comm.ring_wire_bytes("all_reduce", 1000, 1) == 0         # one rank sends nothing
    assert comm.ring_wire_bytes("all_reduce", 1000, 2) == 1000
    assert comm.ring_wire_bytes("all_reduce", 1000, 4) == 1500
    # Sequence parallelism's pair puts an all_reduce's bytes on the wire: a reduce_scatter of
    # the whole tensor and an all_gather of its quarter.
    assert comm.ring_wire_bytes("reduce_scatter", 1000, 4) \
        + comm.ring_wire_bytes("all_gather", 250, 4) == 1500
    assert comm.ring_wire_bytes("send", 1000, 4) == 1000
    assert comm.ring_wire_bytes("broadcast", 1000, 4) is None       # not modelled


def test_pipeline_comm_by_hand():
    s = settings(batch_size=32, input_dim=64, hidden_dim=128, layers=4, microbatches=4)
    msg = 32 // 4 * 128 * 4                      # one microbatch's activation: 4096 bytes
    # 2 ranks, one stage each: each has one neighbour, so 4 messages each way.
    for rank in (0, 1):
        assert comm.pipeline_comm(s, rank, 2) == {"send": {"count": 4, "bytes": 4 * msg},
                                                   "recv": {"count": 4, "bytes": 4 * msg}}
    # 4 ranks: the middle ones talk to two neighbours.
    assert [comm.pipeline_comm(s, r, 4)["send"]["count"] for r in range(4)] == [4, 8, 8, 4]
    # Interleaved, 2 virtual stages: rank 0 holds stages 0 and 2 (neighbours 1; 1 and 3),
    # rank 1 holds 1 and 3 (neighbours 0 and 2; 2): 3 neighbours, 12 messages each way.
    s = {**s, "schedule": "interleaved-1f1b", "virtual_stages": 2}
    for rank in (0, 1):
        assert comm.pipeline_comm(s, rank, 2)["recv"] == {"count": 12, "bytes": 12 * msg}


def test_missing_matplotlib_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["bench", "step", "--quick", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        ("partlab: error: partlab bench draws its plots with matplotlib, which is not "
         "installed: pip install matplotlib")]


def test_bad_sizes_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "comm", "--hidden-dims", "512,x"])
    assert exit_.value.code == 2 and "expected integers like 512,1024" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Every sweep once with --quick: (the output directory, stdout, {sweep: its JSON})."""
    out = tmp_path_factory.mktemp("bench")
    proc, _ = run([*PARTLAB, "bench", "all", "--quick", "--out", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, proc.stdout, {s: json.loads((out / f"{s}.json").read_text())
                              for s in bench.SWEEPS}


def test_every_sweep_writes_json_and_png(quick):
    out, stdout, results = quick
    for sweep, result in results.items():
        assert (out / f"{sweep}.png").read_bytes().startswith(PNG)
        assert f"wrote {out / sweep}.json" in stdout and f"wrote {out / sweep}.png" in stdout
        assert result["provenance"]["command"][:4] == ["python", "-m", "partlab", "bench"]
        assert not result["failed"] and len(result["points"]) == len(result["commands"])
        assert all(cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
                   and "--check" in cmd for cmd in result["commands"])
    timelines = results["bubble"]["timelines"]
    assert len(timelines) == 2 * 4                # a PNG and a trace per schedule, largest m
    assert all(Path(t).read_bytes().startswith(PNG) for t in timelines if t.endswith(".png"))


def test_comm_measured_equals_analytic(quick):
    rows = quick[2]["comm"]["results"]
    assert {r["strategy"] for r in rows} == {"native TP", "manual TP fused", "pipeline gpipe"}
    for r in rows:
        assert (r["count"], r["bytes"]) == (r["count_analytic"], r["bytes_analytic"]), r
        assert r["ratio"] == 1.0 and r["count"] > 0, r


def test_gpt_comm_measured_equals_analytic(tmp_path):
    # The transformer's every collective, sequence parallelism's included, as partlab/theory/comm.py
    # counts them: native TP's loss_parallel and norm-gradient reductions run inside DTensor's
    # own op handlers and optimizer step, and the counter must see them too.
    proc, _ = run([*PARTLAB, "bench", "comm", "--model", "gpt", "--quick", "--out",
                   str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = json.loads((tmp_path / "comm.json").read_text())["results"]
    assert {r["strategy"] for r in rows} == {"native TP", "manual TP fused", "native TP + SP",
                                             "manual TP fused + SP", "pipeline gpipe"}
    assert {r["op"] for r in rows if r["strategy"].endswith("+ SP")} == {
        "all_gather", "reduce_scatter", "all_reduce"}
    for r in rows:
        assert (r["count"], r["bytes"]) == (r["count_analytic"], r["bytes_analytic"]), r


def test_checkpoint_bench_measures_saves_loads_and_size(tmp_path):
    proc, _ = run([*PARTLAB, "bench", "checkpoint", "--hidden-dims", "64", "--out",
                   str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    [row] = json.loads((tmp_path / "checkpoint.json").read_text())["results"]
    # AdamW's checkpoint: each parameter and its two moments in fp32 (12 bytes), plus DCP's
    # index and partlab.json.
    size = row["checkpoint_mib"] * 2**20
    assert 12 * row["parameters"] <= size <= 12 * row["parameters"] + 2**17, row
    assert row["save_ms"] > 0 and row["load_ms"] > 0 and row["cost_every_1"] > 0, row


def test_the_other_models_size_is_refused(capsys):
    assert cli.main(["bench", "comm", "--model", "gpt", "--input-dim", "64"]) == 2
    assert capsys.readouterr().err.strip() == (
        "partlab: error: --input-dim is the MLP's size; with --model gpt leave it out")


def test_bubble_sweep_puts_the_ideal_beside_the_measured(quick):
    rows = quick[2]["bubble"]["results"]
    assert {r["schedule"] for r in rows} == {"gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"}
    for r in rows:
        p, m, v = r["nproc"], r["microbatches"], r["virtual_stages"]
        assert v == (1 if r["schedule"] in ("gpipe", "1f1b") else 2), r
        assert r["theory"] == pytest.approx(
            (p - 1) / ((3 if r["schedule"] == "zero-bubble" else 1) * v * m + p - 1)), r
        # Messages and Python between compute calls only add idle time to the ideal (which
        # takes the run's median call times: 0.9 for their spread).
        assert 0.9 * r["ideal"] <= r["measured"] < 1, r
        # The ideal's span is the same calls without the time between them (1.2: the median
        # call times it takes against one step's).
        assert 0 < r["ideal_span_ms"] < 1.2 * r["span_ms"], r


def test_memory_1f1b_keeps_fewer_activations(quick):
    # GPipe holds every microbatch's activations until the backwards start; 1F1B at most p on
    # rank 0: m/p times fewer (2x at m = 4, p = 2), up to what both keep besides.
    rows = quick[2]["memory"]["results"]
    largest = max(rows, key=lambda r: r["microbatches"])
    assert largest["microbatches"] > largest["nproc"]
    assert largest["ratio"][0] > 0.75 * largest["expected_ratio_rank0"], largest
    # The analytic count (the schedule's microbatches alive x a stage's saved bytes): exact.
    for row in rows:
        for schedule in ("gpipe", "1f1b"):
            assert [round(x * 2**20) for x in row[f"{schedule}_analytic_mib"]] == \
                [round(x * 2**20) for x in row[f"{schedule}_activation_mib"]], row


def test_step_has_a_point_per_strategy_and_width(quick):
    result = quick[2]["step"]
    points = [(r["strategy"], r["hidden_dim"]) for r in result["results"]]
    names = ["reference"] + [entry.label for entry in bench.TP]
    assert sorted(points) == sorted((n, h) for n in names for h in result["sizes"]["hidden_dims"])


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path):
    # 32 samples do not split into 3 microbatches: both runs fail, each with the driver's line.
    proc, _ = run([*PARTLAB, "bench", "memory", "--quick", "--microbatches", "3",
                   "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 1
    result = json.loads((tmp_path / "memory.json").read_text())
    assert [f["schedule"] for f in result["failed"]] == ["gpipe", "1f1b"]
    assert all("not divisible by --microbatches 3" in " ".join(f["errors"])
               for f in result["failed"])
    assert proc.stdout.count("FAILED") == 2


def test_overhead_runs_each_strategy_against_a_bare_loop(quick):
    result = quick[2]["overhead"]
    assert [r["strategy"] for r in result["results"]] == [
        "native TP", "manual TP fused", "pipeline gpipe", "pipeline 1f1b"]
    for point in result["points"]:
        record = point["record"]
        assert len(record["reported_step_s"]) == len(record["bare_step_s"]) == record["rounds"]
        assert min(record["reported_step_s"] + record["bare_step_s"]) > 0
        assert record["step_overhead"] == pytest.approx(
            sorted(record["reported_step_s"])[record["rounds"] // 2]
            / sorted(record["bare_step_s"])[record["rounds"] // 2] - 1)
