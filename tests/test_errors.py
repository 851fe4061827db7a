"""User mistakes and failures end fast, non-zero, with one line that names the fix.

Each case launches the real driver under torchrun. torchrun adds its own ChildFailedError
report after any non-zero exit; what is checked here is partlab's own line, printed once, and
that no Python traceback passes through partlab's code.
"""
import re
import socket
import subprocess
import sys

import pytest
import torch
from launch import ROOT, SMALL, TORCHRUN, run, torchrun

from partlab.distributed import free_port

pytestmark = pytest.mark.slow


def assert_one_line_error(proc, seconds, message, limit=30):
    errors = [line for line in proc.stdout.splitlines() if line.startswith("partlab: error:")]
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert seconds < limit, f"took {seconds:.0f} s"
    assert len(errors) == 1 and message in errors[0], proc.stdout[-3000:]
    assert not re.search(r'File ".*/partlab/', proc.stdout), "traceback through partlab code"


@pytest.mark.parametrize("module,args,message", [
    ("tensor_parallel_manual", ["--hidden-dim", "129"], "not divisible by 2 processes"),
    ("tensor_parallel_native", ["--hidden-dim", "129"], "not divisible by 2 processes"),
    ("tensor_parallel_native", ["--layers", "3"], "use an even number of layers"),
    ("pipeline", ["--stages", "3"], "--stages 3 but 2 pipeline ranks"),
    ("pipeline", ["--layers", "1"], "cannot make 2 stages"),
    ("pipeline", ["--batch-size", "30", "--microbatches", "4"], "not divisible by --microbatches"),
    ("pipeline", ["--schedule", "1f1b", "--microbatches", "1"], "needs --microbatches >= stages"),
    ("pipeline", ["--steps", "0"], "--steps must be at least 1"),
    ("pipeline", ["--schedule", "interleaved-1f1b"], "cannot make 4 stages (2 ranks x 2 virtual"),
    ("pipeline", ["--schedule", "zero-bubble", "--layers", "4", "--batch-size", "40",
                  "--microbatches", "5"], "runs microbatches in rounds of 2"),
    ("pipeline", ["--virtual-stages", "2"], "needs an interleaved schedule"),
    ("pipeline_tensor_parallel", ["--tp", "3"], "do not split into groups of --tp 3"),
    ("pipeline_tensor_parallel", ["--hidden-dim", "129"], "not divisible by 2 processes"),
    ("tensor_parallel_manual", ["--lr", "-1"], "--lr must be positive"),
])
def test_bad_flags_fail_before_any_collective(module, args, message):
    proc, seconds = torchrun(f"partlab.{module}", 2, *args)
    assert_one_line_error(proc, seconds, message)


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the message on a machine without GPUs")
def test_cuda_requested_without_gpu():
    proc, seconds = torchrun("partlab.tensor_parallel_manual", 2, "--device", "cuda")
    assert_one_line_error(proc, seconds, "--device cuda but torch sees no GPU")


def test_too_few_microbatches_warns_about_the_bubble():
    proc, _ = torchrun("partlab.pipeline", 2, *SMALL, "--microbatches", "1")
    assert proc.returncode == 0, proc.stdout[-3000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("partlab: warning")]
    assert len(warnings) == 1 and "bubble" in warnings[0] and "50%" in warnings[0]


def test_ranks_launched_with_different_flags_are_named():
    # Two "nodes" (two torchrun launchers) meeting at one rendezvous, as on a cluster, where
    # the second was given a different --lr.
    port = free_port()
    common = [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mismatch",
              "-m", "partlab.tensor_parallel_manual", *SMALL]
    nodes = [subprocess.Popen(common + extra, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for extra in ([], ["--lr", "0.5"])]
    outputs = [n.communicate(timeout=120)[0] for n in nodes]
    assert all(n.returncode != 0 for n in nodes)
    for out in outputs:
        assert "rank 1 was launched with a different --lr than rank 0" in out, out[-3000:]


def test_busy_port_is_reported():
    # Without torchrun a driver runs as a world of one and creates the rendezvous store on
    # MASTER_PORT itself: occupy that port first.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc, seconds = run([sys.executable, "-m", "partlab.tensor_parallel_manual", *SMALL],
                            env={"MASTER_PORT": str(port)}, timeout=120)
    assert_one_line_error(proc, seconds, f"port {port} is already in use")


@pytest.mark.parametrize("blocked,module,message", [
    ("torch.distributed.pipelining", "partlab.pipeline",
     "cannot import torch.distributed.pipelining"),
    ("torch.distributed.tensor.parallel", "partlab.tensor_parallel_native",
     "cannot import torch.distributed.tensor.parallel"),
    ("partlab._C", "partlab.tensor_parallel_manual",
     "the fused op (partlab._C) is not built: build it with `pip install --no-build-isolation"),
])
def test_missing_module_is_reported(blocked, module, message):
    # A world of one without torchrun, with the module made unimportable.
    code = (f"import sys, runpy; sys.modules[{blocked!r}] = None; "
            f"runpy.run_module({module!r}, run_name='__main__')")
    proc, seconds = run([sys.executable, "-c", code, *SMALL])
    assert_one_line_error(proc, seconds, message)


def test_a_rank_that_raises_stops_every_rank():
    proc, seconds = torchrun("tests/helpers/fault.py", 2, "raise",
                             "partlab.tensor_parallel_manual", *SMALL)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stdout
    assert seconds < 30, f"took {seconds:.0f} s"


def test_a_hung_rank_becomes_a_timeout_error():
    # Rank 1 sleeps for 600 s; rank 0 waits in the forward all_reduce until --timeout 5.
    proc, seconds = torchrun("tests/helpers/fault.py", 2, "hang",
                             "partlab.tensor_parallel_manual", *SMALL, "--timeout", "5")
    assert_one_line_error(proc, seconds, "rank 0: all_reduce failed in tensor_parallel_manual.py",
                          limit=60)
    assert "Timed out" in proc.stdout


@pytest.mark.parametrize("flag,path", [("--json", "/no/such/dir/run.json"),
                                       ("--timeline", "/no/such/dir/timeline")])
def test_an_output_that_cannot_be_written_stops_the_run_before_training(flag, path):
    # Rank 0 writes these after training: a wrong folder must not cost the whole run.
    proc, seconds = run([sys.executable, "-m", "partlab.pipeline", *SMALL, flag, path],
                        timeout=120)
    assert_one_line_error(proc, seconds, f"{flag} {path}: /no/such/dir is not a writable "
                                         "directory")
    assert proc.returncode == 2 and "reference" not in proc.stdout  # nothing was trained


def test_a_diverged_run_is_named_as_divergence_not_a_parallelism_bug():
    proc, seconds = run([sys.executable, "-m", "partlab.tensor_parallel_manual", *SMALL,
                         "--lr", "1e6", "--check"], timeout=120)
    assert_one_line_error(proc, seconds, "the run diverged (the reference's own loss")
    assert proc.returncode == 1 and "lower --lr (now 1e+06; default 0.03)" in proc.stdout
