"""Every strategy, launched with torchrun on CPU + gloo, equals the single-device reference.

Each run is compared three ways: the driver's own in-process check (record["ok"]), its losses
against an independent plain-PyTorch loop computed here, and its communication counts against
the analytic ones. Tolerances are metrics.TOLERANCE (fp32 1e-5; reasons written there).
"""
import pytest

from launch import SMALL, run_driver, torchrun
from partlab.config import Settings
from partlab.metrics import TOLERANCE
from reference import plain_reference

pytestmark = pytest.mark.slow
SMALL_SETTINGS = Settings(batch_size=32, input_dim=64, hidden_dim=128, num_classes=10, steps=3,
                          layers=4)
PLAIN_LOSSES, _ = plain_reference(SMALL_SETTINGS)


def assert_matches_reference(record):
    tol = TOLERANCE["fp32"]
    assert record["ok"], record
    assert record["max_abs_dparam"] <= tol["param"]
    assert len(record["losses"]) == SMALL_SETTINGS.steps
    for step, (got, want) in enumerate(zip(record["losses"], PLAIN_LOSSES), 1):
        assert abs(got - want) <= tol["loss"], f"step {step}: {got} vs plain PyTorch {want}"


@pytest.mark.parametrize("module,flags", [
    ("partlab.tensor_parallel_native", []),
    ("partlab.tensor_parallel_manual", ["--fused"]),
    ("partlab.tensor_parallel_manual", ["--no-fused"]),
])
@pytest.mark.parametrize("nproc", [2, 4])
def test_tensor_parallel_matches_reference(module, flags, nproc, tmp_path):
    _, record = run_driver(module, nproc, tmp_path, *SMALL, *flags)
    assert_matches_reference(record)
    # 4 layers = 2 column/row pairs: one all_reduce forward per pair, and one backward for
    # the second pair only (the first pair's input is data, which needs no gradient).
    for total, backward in zip(record["comm_per_step"], record["comm_in_backward"]):
        assert total == {"all_reduce": 3}, total
        assert backward == {"all_reduce": 1}, backward


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_pipeline_matches_reference(schedule, nproc, tmp_path):
    m = 4
    _, record = run_driver("partlab.pipeline", nproc, tmp_path, *SMALL, "--schedule", schedule,
                           "--microbatches", str(m))
    assert_matches_reference(record)
    assert [len(layers) for layers in record["stage_layers"]] == {2: [2, 2], 3: [1, 1, 2],
                                                                  4: [1, 1, 1, 1]}[nproc]
    # Point to point only: per microbatch, an activation to the next stage and a gradient to
    # the previous one.
    for rank, total in enumerate(record["comm_per_step"]):
        neighbours = (rank > 0) + (rank < nproc - 1)
        assert total == {"send": m * neighbours, "recv": m * neighbours}, (rank, total)


@pytest.mark.parametrize("module,flags", [
    ("partlab.tensor_parallel_native", []),
    ("partlab.tensor_parallel_manual", ["--fused", "--activation", "gelu"]),
    ("partlab.pipeline", ["--schedule", "1f1b"]),
])
def test_bf16_matches_reference_within_bf16_tolerance(module, flags, tmp_path):
    _, record = run_driver(module, 2, tmp_path, *SMALL, "--dtype", "bf16", *flags)
    assert record["ok"] and record["dtype"] == "bf16"
    assert record["max_abs_dloss"] <= TOLERANCE["bf16"]["loss"]


HANDOUT = ["--batch-size", "64", "--input-dim", "1024", "--hidden-dim", "2048",
           "--num-classes", "10", "--steps", "5"]


@pytest.mark.parametrize("module,args", [
    ("partlab.tensor_parallel_native", HANDOUT),
    ("partlab.tensor_parallel_manual", HANDOUT),
    ("partlab.pipeline", []),
])
def test_handout_commands_as_written(module, args):
    proc, _ = torchrun(module, 2, *args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert ": OK" in proc.stdout and "step time" in proc.stdout


def test_check_fails_when_the_result_is_wrong(tmp_path):
    # A manual TP whose forward all_reduce does nothing trains a different model: --check
    # must turn that into a non-zero exit.
    proc, _ = torchrun("tests/helpers/fault.py", 2, "skip-reduce",
                       "partlab.tensor_parallel_manual", *SMALL, "--check")
    assert proc.returncode != 0
    assert "EXCEEDED" in proc.stdout and "deviates from the reference" in proc.stdout
