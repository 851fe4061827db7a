"""The `partlab` command: the lab table with its provenance record, and the environment report."""
import json
import sys

import pytest
from launch import SMALL, run

PARTLAB = [sys.executable, "-m", "partlab"]


@pytest.mark.slow
def test_lab_runs_every_strategy_and_records_provenance(tmp_path):
    proc, _ = run([*PARTLAB, "lab", "--out", str(tmp_path), *SMALL], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    [path] = tmp_path.glob("lab-*.json")
    result = json.loads(path.read_text())
    names = [r["name"] for r in result["runs"]]
    assert names == ["tensor_parallel_native", "tensor_parallel_manual",
                     "tensor_parallel_manual unfused", "pipeline gpipe", "pipeline 1f1b",
                     "pipeline interleaved-1f1b", "pipeline zero-bubble"]
    assert all(r["ok"] and r["world_size"] == 2 for r in result["runs"]) and not result["failed"]
    prov = result["provenance"]
    for key in ("torch", "cuda", "nccl", "devices", "runs_on", "world_size", "git_revision",
                "host", "slurm_job_id", "command", "python"):
        assert key in prov, key
    assert prov["command"] == ["python", "-m", "partlab", "lab", "--out", str(tmp_path), *SMALL]
    assert all("--check" in cmd for cmd in result["commands"])
    # The table: a header, a rule, one row per strategy, in the order run.
    table = proc.stdout.split("\n\n")[1].splitlines()
    assert table[0].startswith("strategy") and len(table) == 2 + len(names)
    assert [row.split("  ")[0] for row in table[2:]] == names


def test_lab_rejects_an_unknown_strategy_filter(tmp_path):
    proc, seconds = run([*PARTLAB, "lab", "--out", str(tmp_path), "--only", "nonsense"])
    assert proc.returncode == 2 and seconds < 30
    assert "partlab: error: --only ['nonsense'] matches none of" in proc.stdout


def test_env_reports_what_the_lab_needs():
    proc, _ = run([*PARTLAB, "env"])
    out = proc.stdout
    assert "import torch.distributed.pipelining: ok" in out
    assert "import torch.distributed.tensor.parallel: ok" in out
    assert "partlab lab would run each strategy on" in out
    # scripts/test.sh builds the extension, so here it must be found and the exit status 0.
    assert "extension partlab._C: built" in out
    assert proc.returncode == 0, out


def test_python_dash_m_partlab_shows_help():
    proc, _ = run([*PARTLAB, "--help"])
    assert proc.returncode == 0 and "lab" in proc.stdout and "env" in proc.stdout
    # The benchmark's own flags, not the `bench` dispatcher's.
    proc, _ = run([*PARTLAB, "bench", "op", "--help"])
    assert proc.returncode == 0 and "--shapes" in proc.stdout
