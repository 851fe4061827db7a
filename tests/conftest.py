"""Fixtures shared by the test files. The launch helpers themselves are in tests/launch.py."""
import importlib
import json
import os
import sys

import pytest
from launch import SMALL, run


@pytest.fixture(scope="session")
def lab_run(tmp_path_factory):
    """`partlab lab` once per session, with the tests' small MLP on 2 CPU processes:
    (the finished process, its lab-*.json, the output directory). test_cli checks the lab itself;
    test_drivers reads each strategy's 2-process record from it instead of launching it again."""
    out = tmp_path_factory.mktemp("lab")
    proc, _ = run([sys.executable, "-m", "partlab", "lab", "--out", str(out), *SMALL],
                  timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    [path] = out.glob("lab-*.json")
    return proc, json.loads(path.read_text()), out


@pytest.fixture(scope="session")
def lab_records(lab_run):
    """{registry key: its record} from the session's lab run."""
    return {r["name"]: r for r in lab_run[1]["runs"]}


@pytest.fixture
def in_process(capsys):
    """A driver's main in this process, as `python -m` without torchrun runs it (a world of one):
    run(module, *argv) -> (exit status, its output). The environment that launch_env fills in
    (RANK, MASTER_PORT, ...) is put back afterwards."""
    saved = dict(os.environ)

    def run_main(module, *argv):
        status = importlib.import_module(module).main(list(argv))
        out = capsys.readouterr()
        return status, out.out + out.err

    yield run_main
    os.environ.clear()
    os.environ.update(saved)
