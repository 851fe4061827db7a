"""scripts/gpu_check.sh refuses a python it cannot use in one line, before building anything.

Its no-GPU mode itself (the real CUDA build, the CPU op tests under a CUDA torch) is what CI
runs through scripts/cuda_build_check.sh; on a GPU node it is the check (README, docs/gpu/).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from partlab import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("python,message", [
    ("/no/such/python", "/no/such/python not found: set PYTHON"),
    ("/bin/false", "cannot import torch and setuptools"),
])
def test_an_unusable_python_fails_in_one_line(python, message):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHON=python))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith("gpu_check: error: ") and message in proc.stderr


def test_a_python_without_pytest_is_named(tmp_path):
    # A python with torch and setuptools but no pytest: the missing module is named.
    shim = tmp_path / "python"
    shim.write_text("#!/bin/sh\ncase \"$2\" in *pytest*) exit 1;; esac\n"
                    f"exec {sys.executable} \"$@\"\n")
    shim.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHON=str(shim)))
    assert proc.returncode == 1 and "has no pytest: pip install pytest" in proc.stderr


def test_the_driver_step_runs_every_driver_and_reads_its_step_time(tmp_path):
    # The GPU node's "drivers" step, on CPU: the same command with --device cpu, for one of
    # the registry's strategies (the GPU node runs them all).
    step = gpu_check.drivers(ROOT, 1, tmp_path, device="cpu", keys=("pipeline-1f1b",))
    assert step["status"] == "ok", step
    assert list(step["runs"]) == ["pipeline-1f1b"]
    assert all(r["step_ms"] > 0 for r in step["runs"].values())
    record = {"provenance": gpu_check.provenance(ROOT), "steps": {"drivers": step}}
    table = gpu_check.markdown(record)
    assert "| driver pipeline-1f1b | ok | step " in table


def test_the_timeline_step_names_the_clock_that_timed_it(tmp_path):
    # On the GPU node the bubble must come from CUDA events; here, on CPU, from the host clock.
    step = gpu_check.timeline(ROOT, 2, tmp_path, device="cpu")
    assert step["status"] == "ok" and step["clock"] == "host", step
    assert step["processes"] == 2 and 0 < step["theory"] < 1 and 0 < step["measured"] < 1
    assert all(Path(f).stat().st_size > 0 for f in step["files"]), step
