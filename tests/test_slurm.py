"""scripts/slurm/ against a real Slurm (tests/slurm_cluster.py): two emulated nodes on this machine.

Every job is submitted with sbatch and followed with `squeue -h -j JOB`; its result records are
read back from results/<jobid>/ and must match the single-device reference. CPU only (gloo), so
the same jobs run in CI. If Slurm cannot be brought up the tests fail with the reason: a quiet
skip would hide that the scripts went untested.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable

from partlab import strategies

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "scripts" / "slurm"
SCRIPTS = sorted(p for p in SLURM_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))
# Seconds: a handful of small steps, so a job is dominated by start-up (torchrun, import torch).
SMALL = ["--batch-size", "16", "--input-dim", "64", "--hidden-dim", "64", "--num-classes", "10",
         "--steps", "3"]
JOB_TIMEOUT = 300            # generous: 2 shared cores; a lab job takes ~40-60 s


@pytest.fixture(scope="session")
def slurm():
    """A running Slurm (munged, slurmctld, slurmd n1 + n2) for the session, stopped afterwards."""
    directory = tempfile.mkdtemp(prefix="partlab-slurm-")
    cluster = SlurmCluster(directory)
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        pytest.fail(f"could not bring up Slurm for the tests: {e}", pytrace=False)
    yield cluster
    cluster.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def results(tmp_path):
    """Jobs write results/<jobid>/ here instead of the repository (PARTLAB_RESULTS)."""
    d = tmp_path / "results"
    d.mkdir()
    return d


def job_env(results, **extra):
    env = {"PARTLAB_RESULTS": str(results)}
    if "PARTLAB_VENV" not in os.environ and sys.prefix != sys.base_prefix \
            and Path(sys.prefix) != ROOT / ".venv":
        env["PARTLAB_VENV"] = sys.prefix       # the tests' own venv, if not the repo's .venv
    return {**env, **extra}


def run_job(slurm, results, sbatch_args, script_args, timeout=JOB_TIMEOUT, env=None, cwd=ROOT):
    """Submit, wait for the job to leave the queue; returns (scontrol record, log text)."""
    job = slurm.sbatch([*sbatch_args, *script_args], env=job_env(results, **(env or {})),
                       cwd=cwd)
    log_path = results / job / f"slurm-{job}.out"
    try:
        info = slurm.wait(job, timeout)
    except TimeoutError as e:
        log = log_path.read_text() if log_path.exists() else "(no log)"
        pytest.fail(f"{e}\n--- job log {log_path}\n{log[-6000:]}")
    log = log_path.read_text() if log_path.exists() else f"(no log at {log_path})"
    return job, info, log


def seconds(runtime):
    """scontrol's RunTime [D-]HH:MM:SS in seconds."""
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def assert_completed(job, info, log):
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job}: {info.get('JobState')} exit {info.get('ExitCode')}\n--- log\n{log[-6000:]}")


def assert_matches_reference(record, log, world_size=2, steps=3):
    where = f"\nrecord: {json.dumps(record)[:1500]}\n--- log\n{log[-3000:]}"
    tol = record["tolerance"]
    assert record["ok"] is True, where
    assert record["max_abs_dloss"] <= tol["loss"], where
    assert record["max_abs_dparam"] <= tol["param"], where
    assert record["world_size"] == world_size, where
    assert len(record["losses"]) == steps, where


# --- the scripts themselves ------------------------------------------------------------------

def test_scripts_use_strict_mode():
    # shellcheck runs over every script in tests/test_lint.py. node.sh is only sourced (by
    # run.sbatch and launch.sh, which set the mode), so it has no #! line.
    programs = [s for s in SCRIPTS if s.read_text().startswith("#!")]
    assert len(programs) == len(SCRIPTS) - 1
    for script in programs:
        assert "set -euo pipefail" in script.read_text(), script


@pytest.mark.parametrize("args, message", [
    ([], "no strategy given"),
    (["bogus"], "unknown strategy 'bogus'"),
    (["pipeline"], "not inside a Slurm job"),
])
def test_run_sbatch_usage_errors_are_one_line(args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SLURM_DIR / "run.sbatch"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("partlab-slurm: error: ") \
        and message in lines[0], proc.stderr


def test_launch_reports_a_missing_venv_in_one_line(tmp_path):
    env = {**os.environ, "PARTLAB_ROOT": str(ROOT), "PARTLAB_RESULTS_DIR": str(tmp_path),
           "PARTLAB_VENV": str(tmp_path / "no-such-venv")}
    env.pop("PARTLAB_SIF", None)
    proc = subprocess.run(["bash", str(SLURM_DIR / "launch.sh"), "--check"], capture_output=True,
                          text=True, env=env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "is not a virtual environment" in proc.stderr


def test_interactive_helper_builds_the_handouts_srun_line():
    helper = str(SLURM_DIR / "interactive.sh")
    proc = subprocess.run([helper, "-n", "-A", "eecs", "-p", "gpu,dgx2", "-g", "2", "-t",
                           "0-01:00:00", "-m", "64G"], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["srun", "-A", "eecs", "--time=0-01:00:00", "-p", "gpu,dgx2",
                                   "--gres=gpu:2", "--mem=64G", "--pty", "bash"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARTLAB_")}
    proc = subprocess.run([helper, "--dry-run", "--gpus", "0"], capture_output=True, text=True,
                          env=env, check=True)
    assert proc.stdout.split() == ["srun", "--time=01:00:00", "--pty", "bash"]
    proc = subprocess.run([helper, "--gpus"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("partlab-slurm: error: --gpus needs")


# --- jobs on the real Slurm -------------------------------------------------------------------

def test_interactive_helper_gets_an_allocation(slurm):
    proc = subprocess.run([str(SLURM_DIR / "interactive.sh"), "-g", "0", "-t", "5", "-m", "100M",
                           "-c", "1", "--", "bash", "-c", "echo node=$SLURMD_NODENAME"],
                          capture_output=True, text=True, env=slurm.env, timeout=120,
                          stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"node=n[12]\b", proc.stdout), proc.stdout + proc.stderr


def test_lab_on_one_node(slurm, results):
    """The whole lab (`partlab lab`) as a CPU job on one node, submitted from the repo root."""
    # One strategy proves the job script; tests/test_cli.py runs the whole lab.
    job, info, log = run_job(slurm, results, ["--cpus-per-task=2"],
                             [str(SLURM_DIR / "lab.sbatch"), *SMALL, "--only", "tp-manual"])
    assert_completed(job, info, log)
    assert not (ROOT / f"slurm-{job}.out").exists(), "the log was not moved to results/<jobid>/"
    records = list((results / job).glob("lab-*.json"))
    assert len(records) == 1, f"no lab-*.json in {results / job}\n{log[-3000:]}"
    lab = json.loads(records[0].read_text())
    assert lab["failed"] == [], log[-6000:]
    assert lab["provenance"]["slurm_job_id"] == job
    assert [r["name"] for r in lab["runs"]] == ["tp-manual"], lab["runs"]
    for run in lab["runs"]:
        assert_matches_reference(run, log)


@pytest.mark.parametrize("strategy", ["tp-manual", "pipeline"])
def test_two_nodes(slurm, results, tmp_path, strategy):
    """One process on each of n1 and n2, meeting through torchrun's c10d rendezvous."""
    job, info, log = run_job(slurm, results, ["--nodes=2", "--cpus-per-task=1"],
                             [str(SLURM_DIR / "run.sbatch"), strategy, *SMALL],
                             env={"PARTLAB_ROOT": str(ROOT)}, cwd=tmp_path)
    assert_completed(job, info, log)
    assert info["NodeList"] == "n[1-2]", info
    for node, name in ((0, "n1"), (1, "n2")):
        assert f"partlab-slurm: node {node} ({name}): 1 process(es), address 127.0.0.1" in log
    record = json.loads((results / job / f"{strategy}.json").read_text())
    assert_matches_reference(record, log)
    # The workers' store is on the address the nodes printed, not this host's name.
    assert record["store"].split(":")[0] == "127.0.0.1", record["store"]


def test_pipeline_of_tensor_parallel_stages_across_two_nodes(slurm, results, tmp_path):
    """Two processes per node: each node holds one pipeline stage, split 2-way tensor-parallel,
    so all_reduces stay inside a node and only activations cross between nodes."""
    job, info, log = run_job(slurm, results, ["--nodes=2", "--cpus-per-task=2"],
                             [str(SLURM_DIR / "run.sbatch"), "pipeline-tp", *SMALL, "--tp", "2",
                             "--layers", "4"],
                             env={"PARTLAB_ROOT": str(ROOT)}, cwd=tmp_path)
    assert_completed(job, info, log)
    assert "partlab-slurm: node 1 (n2): 2 process(es)" in log
    record = json.loads((results / job / "pipeline-tp.json").read_text())
    assert_matches_reference(record, log, world_size=4)
    assert record["pipeline_ranks"] == 2 and record["tp"] == 2


EXAMPLE = re.compile(r"sbatch (?:-A \S+ -p \S+ )?--nodes=2 --gres=gpu:4 scripts/slurm/run\.sbatch "
                     r"([^#\n]+)")


def multi_node_examples():
    """The 2-node x 4-GPU commands of the README, docs/slurm.md and run.sbatch's header: their
    strategy and flags as written, each once."""
    found = set()
    for path in (ROOT / "README.md", ROOT / "docs" / "slurm.md", SLURM_DIR / "run.sbatch"):
        found.update(m.group(1).strip() for m in EXAMPLE.finditer(path.read_text()))
    return sorted(found)


def test_the_docs_show_multi_node_examples():
    assert len(multi_node_examples()) >= 4, multi_node_examples()


@pytest.mark.parametrize("example", multi_node_examples())
def test_multi_node_examples_run_as_written_on_two_nodes_of_four(slurm, results, tmp_path,
                                                                 example):
    """Each example with its own sizes on 2 nodes x 4 processes (CPU processes stand in for
    --gres=gpu:4): the defaults (--layers, --microbatches) follow the 8 processes."""
    job, info, log = run_job(slurm, results, ["--nodes=2", "--cpus-per-task=1"],
                             [str(SLURM_DIR / "run.sbatch"), *example.split()],
                             env={"PARTLAB_ROOT": str(ROOT), "PARTLAB_NPROC_PER_NODE": "4"},
                             cwd=tmp_path)
    assert_completed(job, info, log)
    record = json.loads((results / job / f"{example.split()[0]}.json").read_text())
    assert record["ok"] and record["world_size"] == 8, (record, log[-3000:])


def test_a_job_with_a_named_export_list_still_reaches_its_step(slurm, results, tmp_path):
    # --export=VARS (or NONE) leaves SLURM_EXPORT_ENV set, which the step's srun would inherit
    # and so start launch.sh without the variables run.sbatch set (PARTLAB_RESULTS_DIR, ...).
    env = job_env(results, PARTLAB_ROOT=str(ROOT))
    job, info, log = run_job(slurm, results, [f"--export=PATH,{','.join(env)}"],
                             [str(SLURM_DIR / "run.sbatch"), "tp-manual", *SMALL],
                             env=env, cwd=tmp_path)
    assert_completed(job, info, log)
    assert_matches_reference(json.loads((results / job / "tp-manual.json").read_text()), log)


def test_a_failing_rank_ends_the_job(slurm, results, tmp_path):
    """Rank 1 (on n2) dies right after joining the group, while rank 0 waits in a collective
    with a 300 s timeout: the job must fail within seconds, not hang until the timeout."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if 'LOCAL_RANK' in os.environ and os.environ.get('RANK') == '1':\n"
        "    import torch.distributed as dist\n"
        "    _init = dist.init_process_group\n"
        "    def _init_then_die(*args, **kwargs):\n"
        "        _init(*args, **kwargs)\n"
        "        print('test: rank 1 exits (injected failure)', flush=True)\n"
        "        os._exit(17)\n"
        "    dist.init_process_group = _init_then_die\n")
    _, info, log = run_job(slurm, results, ["--nodes=2", "--cpus-per-task=1"],
                             [str(SLURM_DIR / "run.sbatch"), "pipeline", *SMALL,
                              "--timeout", "300"], timeout=120,
                             env={"PARTLAB_ROOT": str(ROOT), "PYTHONPATH": str(inject)},
                             cwd=tmp_path)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, log[-4000:])
    assert "rank 1 exits (injected failure)" in log, log[-4000:]
    assert seconds(info["RunTime"]) < 60, (info["RunTime"], log[-4000:])


def test_a_requeued_job_resumes_from_its_checkpoint(slurm, results, tmp_path):
    """The job's first run sleeps 0.5 s a step (sitecustomize, only while SLURM_RESTART_COUNT is
    unset); once it has saved a checkpoint it is requeued, as a preempted job is. Slurm runs the
    script again with SLURM_RESTART_COUNT=1, and the run resumes from the newest checkpoint."""
    inject, ck = tmp_path / "inject", tmp_path / "ck"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if 'LOCAL_RANK' in os.environ and not os.environ.get('SLURM_RESTART_COUNT'):\n"
        "    import time\n"
        "    import partlab.model\n"
        "    _batch = partlab.model.make_batch\n"
        "    def slow_batch(*args, **kwargs):\n"
        "        time.sleep(0.5)\n"
        "        return _batch(*args, **kwargs)\n"
        "    partlab.model.make_batch = slow_batch\n")
    job = slurm.sbatch(["--requeue", "--cpus-per-task=2", str(SLURM_DIR / "run.sbatch"),
                        "tp-manual", *SMALL, "--steps", "40", "--checkpoint-every", "2",
                        "--checkpoint-dir", str(ck)],
                       env=job_env(results, PARTLAB_ROOT=str(ROOT), PYTHONPATH=str(inject)),
                       cwd=tmp_path)
    deadline = time.monotonic() + JOB_TIMEOUT
    while not list(ck.glob("step-*/partlab.json")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert list(ck.glob("step-*/partlab.json")), slurm.job_info(job)
    slurm.requeue(job)
    info = slurm.wait(job, JOB_TIMEOUT)
    log = (results / job / f"slurm-{job}.out").read_text()
    assert_completed(job, info, log)
    assert info["Restarts"] == "1", info
    record = json.loads((results / job / "tp-manual.json").read_text())
    assert 1 < record["first_step"] < 40, record["first_step"]
    assert_matches_reference(record, log, steps=41 - record["first_step"])
    print(f"requeue test: submitted {info['SubmitTime']}, eligible {info['EligibleTime']}, "
          f"started {info['StartTime']}, ended {info['EndTime']}")


def test_a_missing_venv_fails_the_job_in_one_line(slurm, results, tmp_path):
    _, info, log = run_job(slurm, results, [],
                             [str(SLURM_DIR / "run.sbatch"), "pipeline", *SMALL], timeout=120,
                             env={"PARTLAB_ROOT": str(ROOT),
                                  "PARTLAB_VENV": str(tmp_path / "no-such-venv")}, cwd=tmp_path)
    assert info["JobState"] == "FAILED", (info, log)
    errors = [line for line in log.splitlines() if "error" in line]
    assert errors and errors[0].startswith("partlab-slurm: error: PARTLAB_VENV="), log
    assert "is not a virtual environment" in errors[0]


def test_lab_refuses_several_nodes(slurm, results, tmp_path):
    _, info, log = run_job(slurm, results, ["--nodes=2"], [str(SLURM_DIR / "lab.sbatch")],
                             timeout=120, env={"PARTLAB_ROOT": str(ROOT)}, cwd=tmp_path)
    assert info["JobState"] == "FAILED", (info, log)
    assert "partlab-slurm: error: lab runs on one node" in log, log


# --- container mode with a stand-in apptainer -------------------------------------------------

APPTAINER_STUB = r'''#!{python}
"""Stand-in for `apptainer exec`: records its argv and the env file, then runs the command the
way --cleanenv would (an empty environment plus the env file and the image's PATH)."""
import json, os, subprocess, sys
argv = sys.argv[1:]
assert argv[0] == "exec", argv
opts, i = {{"flags": [], "bind": [], "env_file": None, "pwd": None}}, 1
while argv[i].startswith("-"):
    if argv[i] in ("--bind", "-B"):
        opts["bind"] += argv[i + 1].split(","); i += 2
    elif argv[i] == "--env-file":
        opts["env_file"] = argv[i + 1]; i += 2
    elif argv[i] == "--pwd":
        opts["pwd"] = argv[i + 1]; i += 2
    else:
        opts["flags"].append(argv[i]); i += 1
image, command = argv[i], argv[i + 1:]
assert os.path.isfile(image), image
for bind in opts["bind"]:
    assert os.path.isdir(bind.split(":")[0]), bind
env = {{}} if "--cleanenv" in opts["flags"] else dict(os.environ)
if opts["env_file"]:
    out = subprocess.run(["env", "-i", "bash", "-c", 'set -a; . "$1"; env -0', "_",
                          opts["env_file"]], capture_output=True, check=True).stdout
    for item in out.decode().split("\0"):
        key, sep, value = item.partition("=")
        if sep and key not in ("PWD", "SHLVL", "_", "OLDPWD"):
            env[key] = value
env["PATH"] = {image_path!r}
env.setdefault("HOME", "/root")
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": argv, "opts": opts, "image": image, "command": command,
                         "env": env}}) + "\n")
if opts["pwd"]:
    os.chdir(opts["pwd"])
os.execvpe(command[0], command, env)
'''


def test_container_mode_passes_slurm_variables_and_binds(slurm, results, tmp_path):
    """PARTLAB_SIF set: each node's command runs under `apptainer exec --cleanenv`, with the
    Slurm and rendezvous variables passed in an env file and the results directory bound."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    calls = tmp_path / "apptainer-calls.jsonl"
    image_path = f"{Path(sys.executable).parent}:/usr/bin:/bin"   # the "image" has partlab
    stub = stub_dir / "apptainer"
    stub.write_text(APPTAINER_STUB.format(python=sys.executable, image_path=image_path,
                                          log=str(calls)))
    stub.chmod(0o755)
    sif = tmp_path / "partlab.sif"
    sif.write_bytes(b"not really an image")
    job, info, log = run_job(
        slurm, results, ["--nodes=2", "--cpus-per-task=1"],
        [str(SLURM_DIR / "run.sbatch"), "tp-native", *SMALL],
        env={"PARTLAB_ROOT": str(ROOT), "PARTLAB_SIF": str(sif),
             "PATH": f"{stub_dir}:{os.environ['PATH']}"}, cwd=tmp_path)
    assert_completed(job, info, log)
    assert calls.exists(), f"apptainer was never called\n{log[-4000:]}"
    records = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(records) == 2, records                       # one per node
    job_results = str(results / job)
    for call in records:
        assert "--cleanenv" in call["opts"]["flags"] and "--nv" not in call["opts"]["flags"]
        assert job_results in [b.split(":")[0] for b in call["opts"]["bind"]], call["opts"]
        assert call["image"] == str(sif)
        assert call["command"][0] == "torchrun" and "partlab.tensor_parallel_native" in \
            call["command"]
        env = call["env"]
        assert env["SLURM_JOB_ID"] == job and env["SLURM_NNODES"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"].isdigit()
        assert env["PARTLAB_RESULTS_DIR"] == job_results
        assert "SLURM_CONF" in env and "NCCL_DEBUG" in env
    assert sorted(call["env"]["SLURM_NODEID"] for call in records) == ["0", "1"]
    record = json.loads((results / job / "tp-native.json").read_text())
    assert_matches_reference(record, log)


# --- the GPU branch, without GPUs: run.sbatch with stand-in scontrol and srun ------------------

def stub_env(tmp_path, **overrides):
    """What a 2-node, 4-GPU-per-node job's batch script would see: Slurm's variables faked,
    scontrol answering (node gpu0N at 10.1.2.N), srun recording its argv and environment, then
    running the step's command as node 0 would (SLURM_NODEID 0, the step's own STEP_* variables
    without the prefix), torchrun recording its argv. overrides: other environment variables
    (None removes one)."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    (stub_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        'case "$1 $2" in\n'
        '  "show hostnames") printf "gpu07\\ngpu08\\n" ;;\n'
        '  "show node") echo "NodeName=$3 NodeAddr=10.1.2.${3#gpu0} NodeHostName=$3" ;;\n'
        "esac\n")
    (stub_dir / "srun").write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > {tmp_path}/srun-argv\n'
        f"env > {tmp_path}/srun-env\n"
        'while [[ "$1" == -* ]]; do shift; done\n'
        'for v in $(compgen -e STEP_); do export "${v#STEP_}=${!v}"; done\n'
        'SLURM_NODEID=0 SLURMD_NODENAME=gpu07 exec "$@"\n')
    (stub_dir / "torchrun").write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" > {tmp_path}/torchrun-argv\n')
    for stub in stub_dir.iterdir():
        stub.chmod(0o755)
    venv = tmp_path / "venv"          # activating it puts the stubs before partlab's python
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(
        f'export PATH="{stub_dir}:{Path(sys.executable).parent}:$PATH"\n')
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PARTLAB_", "NCCL_", "TORCH_NCCL_", "MASTER_",
                                "GLOO_"))}
    env.update(PATH=f"{stub_dir}:{env['PATH']}", SLURM_JOB_ID="123456", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="gpu[07-08]", SLURM_GPUS_ON_NODE="4",
               SLURM_JOB_CPUS_PER_NODE="32(x2)", SLURM_SUBMIT_DIR=str(ROOT),
               SLURMD_NODENAME="gpu07", PARTLAB_RESULTS=str(tmp_path / "results"),
               PARTLAB_VENV=str(venv))
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def run_sbatch_with_stubs(tmp_path, *args, log=None, **overrides):
    """run.sbatch under stub_env: returns (srun's argv, the step's environment, the argv that
    node 0's launch.sh gave torchrun). log: a file for run.sbatch's stdout."""
    with open(log or os.devnull, "w") as out:
        proc = subprocess.run(["bash", str(SLURM_DIR / "run.sbatch"), *args], stdout=out,
                              stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=120,
                              env=stub_env(tmp_path, **overrides), check=False)
    assert proc.returncode == 0, proc.stderr
    step_env = dict(line.partition("=")[::2]
                    for line in (tmp_path / "srun-env").read_text().splitlines())
    return ((tmp_path / "srun-argv").read_text().splitlines(), step_env,
            (tmp_path / "torchrun-argv").read_text().splitlines())


def test_gpu_allocation_runs_one_process_per_gpu_with_nccl_settings(tmp_path):
    srun, env, torchrun = run_sbatch_with_stubs(tmp_path, "pipeline", "--schedule", "1f1b")
    results = str(tmp_path / "results" / "123456")
    port = str(15000 + 123456 % 15000)
    assert srun[:7] == ["--export=ALL", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--cpus-per-task=32", "--kill-on-bad-exit=1", "--label"], srun
    # Node 0's own options first (launch.sh), then run.sbatch's command.
    assert torchrun[:6] == ["--nproc-per-node", "4", "--local-addr", "10.1.2.7",
                            "--rdzv-conf", "is_host=true"], torchrun
    assert torchrun[6:17] == ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                              f"10.1.2.7:{port}", "--rdzv-id", "123456", "--max-restarts", "0",
                              "-m"], torchrun
    assert torchrun[17:] == ["partlab.pipeline", "--schedule", "1f1b", "--device", "cuda",
                             "--json", f"{results}/pipeline.json", "--check"], torchrun
    assert env["NCCL_DEBUG"] == "WARN" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


@pytest.mark.parametrize("key", list(strategies.BY_KEY))
def test_run_sbatch_runs_every_registry_strategy(key, tmp_path):
    # The registry is the one list: run.sbatch must launch each entry's own module and flags.
    _, _, torchrun = run_sbatch_with_stubs(tmp_path, key, "--steps", "2")
    command = torchrun[torchrun.index("-m"):]
    entry = strategies.get(key)
    assert command[:len(entry.command()) + 2] == [*entry.command(), "--steps", "2"], command
    assert f"{tmp_path}/results/123456/{key}.json" in command


@pytest.mark.parametrize("visible,device,nproc", [
    ("NoDevFiles", "cpu", "3"), ("-1", "cpu", "3"), ("0,1", "cuda", "2"),
    ("GPU-8f2ec1a4-1b2c-4d5e-9f00-aabbccddeeff", "cuda", "1"), ("0,NoDevFiles,1", "cuda", "1"),
])
def test_only_devices_cuda_can_use_count_as_gpus(visible, device, nproc, tmp_path):
    # Without SLURM_GPUS_ON_NODE the GPUs are CUDA_VISIBLE_DEVICES' entries, as CUDA reads
    # them: up to the first that is neither an index nor a UUID.
    _, _, torchrun = run_sbatch_with_stubs(tmp_path, "tp-native", SLURM_GPUS_ON_NODE=None,
                                           CUDA_VISIBLE_DEVICES=visible, SLURM_CPUS_PER_TASK="3")
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == nproc, torchrun
    assert torchrun[torchrun.index("--device") + 1] == device, torchrun


def test_each_node_counts_its_own_gpus_and_the_step_inherits_no_per_task_shape(tmp_path):
    # --gpus=6 on two nodes can be 4 + 2: the node's step sees 2, and starts 2 processes. The
    # job's per-GPU and per-task requests are not passed on to the step's srun.
    inherited = {"SLURM_CPUS_PER_GPU": "8", "SLURM_TRES_PER_TASK": "cpu:8",
                 "SLURM_GPUS_PER_TASK": "1", "SLURM_MEM_PER_GPU": "1000"}
    _, env, torchrun = run_sbatch_with_stubs(tmp_path, "tp-native", STEP_SLURM_GPUS_ON_NODE="2",
                                             **inherited)
    assert torchrun[:2] == ["--nproc-per-node", "2"], torchrun
    assert not set(inherited) & set(env), {k: env[k] for k in set(inherited) & set(env)}


def test_a_named_interface_gives_every_address(tmp_path):
    _, env, torchrun = run_sbatch_with_stubs(tmp_path, "tp-native", PARTLAB_IFNAME="lo")
    assert torchrun[torchrun.index("--local-addr") + 1] == "127.0.0.1", torchrun
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "lo"
    other = tmp_path / "unknown-interface"
    other.mkdir()
    proc = subprocess.run(["bash", str(SLURM_DIR / "run.sbatch"), "tp-native"],
                          capture_output=True, text=True, cwd=other, timeout=60, check=False,
                          env=stub_env(other, PARTLAB_IFNAME="no-such-if0"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "partlab-slurm: error: PARTLAB_IFNAME=no-such-if0: no IPv4 address on gpu07 "
        "(ip -4 addr lists the interfaces)"], proc.stderr


def test_the_log_stays_where_slurm_writes_it_when_results_are_on_another_file_system(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("the test needs /dev/shm on a file system of its own")
    results = Path(tempfile.mkdtemp(dir=shm))
    try:
        log = tmp_path / "slurm-123456.out"
        run_sbatch_with_stubs(tmp_path, "tp-native", log=log, PARTLAB_RESULTS=str(results))
        assert f"partlab-slurm: the log stays at {log}" in log.read_text()
        assert not (results / "123456" / log.name).exists()
    finally:
        shutil.rmtree(results)
