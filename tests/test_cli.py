"""The `partlab` command: the lab table with its provenance record, and the environment report."""
import sys
import types

import pytest
from launch import SMALL, run

from partlab import cli, lab, ops, strategies

PARTLAB = [sys.executable, "-m", "partlab"]


@pytest.mark.fast
def test_lab_runs_every_strategy_and_records_provenance(lab_run):
    proc, result, out = lab_run
    names = [r["name"] for r in result["runs"]]
    # Every registry entry that runs on 2 processes, in the registry's order.
    assert names == [s.key for s in strategies.STRATEGIES if s.min_processes <= 2]
    assert "pp-tp-native, pp-tp-manual: need more processes" in proc.stdout
    assert all(r["ok"] and r["world_size"] == 2 for r in result["runs"]) and not result["failed"]
    prov = result["provenance"]
    for key in ("torch", "cuda", "nccl", "devices", "runs_on", "world_size", "git_revision",
                "host", "slurm_job_id", "command", "python"):
        assert key in prov, key
    assert prov["command"] == ["python", "-m", "partlab", "lab", "--out", str(out), *SMALL]
    assert all("--check" in cmd for cmd in result["commands"])
    # The table: a header, a rule, one row per strategy, in the order run.
    table = proc.stdout.split("\n\n")[1].splitlines()
    assert table[0].startswith("strategy") and len(table) == 2 + len(names)
    assert [row.split("  ")[0] for row in table[2:]] == names


@pytest.fixture
def partlab_cli(capsys):
    """The `partlab` command in this process: run(*argv) -> (exit status, stdout + stderr)."""
    def run_cli(*argv):
        try:
            status = cli.main(list(argv))
        except SystemExit as e:           # argparse's --help and usage errors
            status = e.code
        out = capsys.readouterr()
        return status, out.out + out.err
    return run_cli


def test_lab_checks_every_layout_before_launching(tmp_path, partlab_cli):
    # 3 processes: TP cannot split 2048 columns; with --schedule 1f1b and --batch-size 2 the
    # pipelines cannot give each stage a microbatch either. One line per reason, nothing
    # launched.
    status, out = partlab_cli("lab", "--nproc", "3", "--out", str(tmp_path), "--batch-size", "2")
    errors = [line for line in out.splitlines() if line.startswith("partlab: error:")]
    assert status == 2 and not list(tmp_path.iterdir())
    assert errors[0].startswith("partlab: error: tp-native, tp-manual, tp-manual-unfused on "
                                "--nproc 3: --hidden-dim 2048 is not divisible by 3"), errors
    assert len(errors) == 2 and errors[1].startswith("partlab: error: pipeline-1f1b on --nproc "
                                                     "3: --schedule 1f1b needs"), errors


@pytest.mark.fast
@pytest.mark.parametrize("gpus,sizes,used", [
    (8, [], 8), (6, [], 4), (3, [], 2), (6, ["--hidden-dim", "1536"], 6),
    (5, ["--hidden-dim", "1280"], 4),
])
def test_lab_uses_the_most_gpus_that_its_sizes_split(gpus, sizes, used):
    # On 6 GPUs the handout's hidden 2048 does not split 6 ways (TP): the lab runs on 4 unless
    # the sizes divide; on 5 the pipeline x TP rows cannot pair processes.
    assert lab.most_processes_that_fit(strategies.STRATEGIES, gpus, sizes, "cpu") == used


@pytest.mark.fast
def test_lab_runs_manual_tp_unfused_on_gpus_without_cuda_kernels(monkeypatch, capsys):
    monkeypatch.setattr(ops, "extension_info", lambda: {"built": True, "cuda": False})
    assert lab.unfused_without_cuda_kernels(strategies.STRATEGIES, False) \
        == strategies.STRATEGIES                              # CPU processes: the CPU kernels
    entries = lab.unfused_without_cuda_kernels(strategies.STRATEGIES, True)
    changed = [(e.key, e.flags) for e in entries if e not in strategies.STRATEGIES]
    assert changed == [("tp-manual (unfused)", ("--no-fused",))]
    assert "partlab lab: note: tp-manual run(s) unfused: the extension has no CUDA kernels" \
        in capsys.readouterr().out


@pytest.mark.fast
def test_lab_names_an_nccl_watchdog_abort():
    watchdog = ("[rank1]:[E1201 10:00:00.000 ProcessGroupNCCL.cpp:685] [Rank 1] Watchdog caught "
                "collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE, NumelIn=640, "
                "Timeout(ms)=180000) ran for 180001 milliseconds before timing out.")
    proc = types.SimpleNamespace(stdout="step 1\n", stderr=f"{watchdog}\nterminate called\n")
    lines = lab.failure_lines(proc)
    assert lines[0].startswith("partlab: error: an NCCL collective ran past --timeout and "
                               "NCCL's watchdog aborted the process") and lines[1] == watchdog
    proc.stderr = "Traceback (most recent call last):\n" + "  frame\n" * 20
    assert lab.failure_lines(proc) == (proc.stderr + proc.stdout).splitlines()[-12:]


def test_lab_rejects_an_unknown_strategy_filter(tmp_path, partlab_cli):
    status, out = partlab_cli("lab", "--out", str(tmp_path), "--only", "nonsense")
    assert status == 2 and "partlab: error: --only ['nonsense'] matches none of" in out


def test_env_reports_what_the_lab_needs(partlab_cli):
    status, out = partlab_cli("env")
    assert "import torch.distributed.pipelining: ok" in out
    assert "import torch.distributed.tensor.parallel: ok" in out
    assert "partlab lab would run each strategy on" in out
    # scripts/test.sh builds the extension, so here it must be found and the exit status 0.
    assert "extension partlab._C: built" in out
    assert status == 0, out


def test_python_dash_m_partlab_shows_help(partlab_cli):
    proc, _ = run([*PARTLAB, "--help"])
    assert proc.returncode == 0 and "lab" in proc.stdout and "env" in proc.stdout
    # The benchmark's own flags, not the `bench` dispatcher's.
    status, out = partlab_cli("bench", "op", "--help")
    assert status == 0 and "--shapes" in out


def test_bench_alone_lists_the_sweeps(partlab_cli):
    status, out = partlab_cli("bench")
    assert status == 0, out
    for sweep in ("step", "bubble", "comm", "memory", "overhead", "all", "op"):
        assert f"\n  {sweep} " in out, sweep
    status, out = partlab_cli("bench", "--out", "somewhere")
    assert status == 2
    assert "partlab: error: name a sweep before --out: e.g. partlab bench all --out somewhere" \
        in out
