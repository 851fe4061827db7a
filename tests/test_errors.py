"""User mistakes and failures end fast, non-zero, with one line that names the fix.

Mistakes that parsing and validation decide are checked in-process, on the drivers' own
validate; two of them, and every failure that needs running processes, launch the real driver.
torchrun adds its own ChildFailedError report after any non-zero exit; what is checked there is
partlab's own line, printed once, and that no Python traceback passes through partlab's code.
"""
import importlib
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from launch import ROOT, SMALL, TORCHRUN, run, torchrun

from partlab.config import Settings, UsageError, parse
from partlab.distributed import Launch, free_port
from partlab.theory.memory import bytes_needed


def assert_one_error_line(output, message):
    errors = [line for line in output.splitlines() if line.startswith("partlab: error:")]
    assert len(errors) == 1 and message in errors[0], output[-3000:]


def assert_one_line_error(proc, seconds, message, limit=30):
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert seconds < limit, f"took {seconds:.0f} s"
    assert_one_error_line(proc.stdout, message)
    assert not re.search(r'File ".*/partlab/', proc.stdout), "traceback through partlab code"


LAUNCH_2 = Launch(rank=0, world_size=2, local_rank=0, local_world_size=2)


@pytest.mark.parametrize("module,args,message", [
    ("tensor_parallel_manual", ["--hidden-dim", "129"], "not divisible by 2 processes"),
    ("tensor_parallel_native", ["--hidden-dim", "129"], "not divisible by 2 processes"),
    ("tensor_parallel_native", ["--layers", "3"], "use an even number of layers"),
    ("pipeline", ["--stages", "3"], "--stages 3 but 2 pipeline ranks"),
    ("pipeline", ["--layers", "1"], "cannot make 2 stages"),
    ("pipeline", ["--batch-size", "30", "--microbatches", "4"], "not divisible by --microbatches"),
    ("pipeline", ["--schedule", "1f1b", "--microbatches", "1"], "needs --microbatches >= stages"),
    ("pipeline", ["--steps", "0"], "--steps must be at least 1"),
    ("pipeline", ["--schedule", "interleaved-1f1b", "--layers", "2"],
     "cannot make 4 stages (2 ranks x 2 virtual"),
    ("pipeline", ["--schedule", "zero-bubble", "--layers", "4", "--batch-size", "40",
                  "--microbatches", "5"], "runs microbatches in rounds of 2"),
    ("pipeline", ["--virtual-stages", "2"], "needs an interleaved schedule"),
    ("pipeline_tensor_parallel", ["--tp", "3"], "do not split into groups of --tp 3"),
    ("pipeline_tensor_parallel", ["--hidden-dim", "129"], "not divisible by 2 processes"),
    ("pipeline_tensor_parallel", ["--layers", "2"], "cannot make 2 stages (2 ranks x 1"),
    ("tensor_parallel_manual", ["--lr", "-1"], "--lr must be positive"),
    ("tensor_parallel_native", ["--heads", "4"],
     "--heads is a --model gpt flag: drop it, or add --model gpt"),
    ("pipeline", ["--model", "gpt", "--input-dim", "8"],
     "--input-dim is a --model mlp flag: drop it, or add --model mlp"),
    ("pipeline", ["--model", "gpt", "--hidden-dim", "66"], "not divisible by --heads 4"),
    ("tensor_parallel_native", ["--model", "gpt", "--heads", "3", "--hidden-dim", "66"],
     "--heads 3 is not divisible by 2 processes: each rank holds whole heads"),
    ("tensor_parallel_manual", ["--model", "gpt", "--sequence-parallel", "--seq-len", "31"],
     "--seq-len 31 is not divisible by 2 processes: sequence parallelism splits the sequence"),
    ("pipeline", ["--model", "gpt", "--sequence-parallel"],
     "--sequence-parallel splits tensor parallelism's activations along the sequence"),
    ("tensor_parallel_manual", ["--sequence-parallel"], "--sequence-parallel is a --model gpt"),
])
@pytest.mark.fast
def test_bad_flags_are_refused_before_any_process_group(module, args, message):
    # What the driver's main does before joining a group, in-process: parse, then validate.
    driver = importlib.import_module(f"partlab.{module}")
    world = Launch(0, 4, 0, 4) if module == "pipeline_tensor_parallel" and "--tp" not in args \
        else LAUNCH_2
    with pytest.raises(UsageError) as error:
        driver.validate(parse(driver.parser(), args), world)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("module,args,message", [
    ("tensor_parallel_manual", ["--hidden-dim", "129"], "not divisible by 2 processes"),
    ("pipeline", ["--schedule", "1f1b", "--microbatches", "1"], "needs --microbatches >= stages"),
])
def test_bad_flags_fail_in_one_line_once_per_node(module, args, message):
    # End to end under torchrun: both ranks refuse, only the node's local rank 0 says so.
    proc, seconds = torchrun(f"partlab.{module}", 2, *args)
    assert_one_line_error(proc, seconds, message)


@pytest.mark.parametrize("module,nproc,args,layers,microbatches", [
    ("pipeline", 4, [], 4, 4), ("pipeline", 2, ["--schedule", "interleaved-1f1b"], 4, 4),
    ("pipeline", 2, [], 2, 4), ("pipeline_tensor_parallel", 8, ["--tp", "2"], 8, 4),
    ("tensor_parallel_native", 4, [], 2, None), ("pipeline", 4, ["--layers", "6"], 6, 4),
    ("pipeline", 8, ["--schedule", "1f1b"], 8, 8), ("pipeline", 6, [], 6, 8),
    ("pipeline", 8, ["--schedule", "zero-bubble"], 16, 8),
    ("pipeline", 8, ["--microbatches", "2"], 8, 2), ("pipeline", 2, ["--batch-size", "2"], 2, 2),
    # No count >= the ranks divides the batch: GPipe and interleaved take fewer (and warn).
    ("pipeline", 8, ["--batch-size", "4"], 8, 4),
    ("pipeline", 3, ["--schedule", "interleaved-1f1b"], 6, 2),
])
@pytest.mark.fast
def test_default_sizes_follow_the_process_count(module, nproc, args, layers, microbatches):
    # The handout's pipeline command on 4 or 8 GPUs, or interleaved on 2, needs no --layers and
    # no --microbatches: every stage gets a layer and every rank a microbatch (rounds of p for
    # the interleaved schedules, a count that divides the batch).
    driver = importlib.import_module(f"partlab.{module}")
    settings = driver.validate(parse(driver.parser(), args), Launch(0, nproc, 0, nproc))
    assert (settings.layers, settings.microbatches) == (layers, microbatches)


@pytest.mark.fast
def test_1f1b_refuses_a_batch_smaller_than_its_stages():
    driver = importlib.import_module("partlab.pipeline")
    with pytest.raises(UsageError, match=r"--schedule 1f1b needs at least one microbatch per "
                                         r"stage \(8\), but --batch-size 4 has fewer samples"):
        driver.validate(parse(driver.parser(), ["--schedule", "1f1b", "--batch-size", "4"]),
                        Launch(0, 8, 0, 8))


def test_a_model_too_big_for_memory_is_refused_before_allocating(in_process):
    status, out = in_process("partlab.tensor_parallel_manual", "--hidden-dim", "100000000")
    need = bytes_needed(Settings(hidden_dim=100_000_000, layers=2)) / 2**30
    assert_one_error_line(out, f"the model needs at least {need:,.1f} GiB per process")
    assert "lower --hidden-dim" in out and status == 2


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the message on a machine without GPUs")
def test_cuda_requested_without_gpu(in_process):
    status, out = in_process("partlab.tensor_parallel_manual", *SMALL, "--device", "cuda")
    assert_one_error_line(out, "--device cuda but torch sees no GPU")
    assert status == 2


@pytest.mark.fast
def test_too_few_microbatches_warns_about_the_bubble(capsys):
    # A warning, not an error; printed by each node's local rank 0 only.
    driver = importlib.import_module("partlab.pipeline")
    for local_rank in (0, 1):
        driver.validate(parse(driver.parser(), [*SMALL, "--microbatches", "1"]),
                        Launch(local_rank, 2, local_rank, 2))
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("partlab: warning")
    assert "bubble" in warnings[0] and "50%" in warnings[0]


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


def test_busy_port_is_reported(in_process):
    # Without torchrun a driver runs as a world of one and creates the rendezvous store on
    # MASTER_PORT itself: occupy that port first.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        os.environ["MASTER_PORT"] = str(port)
        status, out = in_process("partlab.tensor_parallel_manual", *SMALL)
    assert_one_error_line(out, f"port {port} is already in use")
    assert status == 2


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
    assert_one_line_error(proc, seconds, "rank 0: all_reduce failed in tp_layers.py",
                          limit=60)
    assert "Timed out" in proc.stdout


@pytest.mark.parametrize("flag,path", [("--json", "/no/such/dir/run.json"),
                                       ("--timeline", "/no/such/dir/timeline")])
def test_an_output_that_cannot_be_written_stops_the_run_before_training(flag, path, in_process):
    # Rank 0 writes these after training: a wrong folder must not cost the whole run.
    status, out = in_process("partlab.pipeline", *SMALL, flag, path)
    assert_one_error_line(out, f"{flag} {path}: /no/such/dir is not a writable directory")
    assert status == 2 and "reference" not in out  # nothing was trained


def test_a_diverged_run_is_named_as_divergence_not_a_parallelism_bug(in_process):
    status, out = in_process("partlab.tensor_parallel_manual", *SMALL, "--lr", "1e6", "--check")
    assert_one_error_line(out, "the run diverged (the reference's own loss")
    assert status == 1 and "lower --lr (now 1e+06; default 0.002)" in out
