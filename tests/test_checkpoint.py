"""Checkpoints (partlab/checkpoint.py): a resumed run continues bit for bit, a checkpoint loads
into any other layout and the run goes on equal to the reference, and a missing, damaged or
foreign checkpoint is one line before anything is loaded."""
import json

import pytest
import torch
from launch import torchrun
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

MLP = ["--batch-size", "16", "--input-dim", "32", "--hidden-dim", "64", "--layers", "4"]
# A vocabulary that 2 and 4 ranks split differently (manual TP pads it to 10 or 12 rows).
GPT = ["--model", "gpt", "--layers", "2", "--vocab-size", "9", "--lr", "0.3"]
MANUAL = "partlab.tensor_parallel_manual"


def launch(nproc, module, *args):
    proc, _ = torchrun(module, nproc, *args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def tensors(checkpoint, tmp_path):
    """A checkpoint's tensors by name, read without a process group."""
    path = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, path)
    return torch.load(path)


@pytest.mark.parametrize("nproc,module,flags", [
    (2, MANUAL, ["--optimizer", "adamw"]),
    (2, "partlab.tensor_parallel_native", ["--momentum", "0.9"]),
    (2, "partlab.pipeline", ["--schedule", "1f1b", "--optimizer", "adamw"]),
])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(nproc, module, flags, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    args = [*MLP, *flags]
    launch(nproc, module, *args, "--steps", "4", "--checkpoint-dir", whole,
           "--json", tmp_path / "whole.json")
    launch(nproc, module, *args, "--steps", "2", "--checkpoint-dir", parts)
    launch(nproc, module, *args, "--steps", "4", "--checkpoint-dir", parts, "--resume",
           "--json", tmp_path / "resumed.json")
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["first_step"] == 3
    assert resumed["losses"] == json.loads((tmp_path / "whole.json").read_text())["losses"][2:]
    a = tensors(whole / "step-000004", tmp_path)
    b = tensors(parts / "step-000004", tmp_path)
    # Parameters and optimizer state (AdamW's moments and step, SGD's momentum) alike.
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("model,saved_by,loaded_by", [
    (MLP, (2, "partlab.tensor_parallel_native"),
     [(1, MANUAL), (2, "partlab.pipeline"), (4, MANUAL),
      (4, "partlab.pipeline_tensor_parallel", "--tp", "2", "--tp-impl", "manual")]),
    (GPT, (2, MANUAL),
     [(4, MANUAL), (2, "partlab.pipeline", "--schedule", "1f1b"),
      (4, "partlab.pipeline_tensor_parallel", "--tp", "2")]),
], ids=["mlp", "gpt"])
def test_a_checkpoint_loads_into_every_other_layout(model, saved_by, loaded_by, tmp_path):
    # Saved after 2 of 4 steps by one layout, resumed by others with --check: their steps 3 and
    # 4 and final weights must equal the reference's, which trained all 4 in one process.
    # AdamW for the MLP, SGD with momentum for the gpt: their state is resharded too.
    optimizer = ["--optimizer", "adamw"] if model is MLP else ["--momentum", "0.9"]
    source = tmp_path / "source"
    launch(saved_by[0], saved_by[1], *model, *optimizer, "--steps", "2",
           "--checkpoint-dir", source)
    for i, (nproc, module, *flags) in enumerate(loaded_by):
        target = tmp_path / f"into-{i}"
        target.mkdir()
        (target / "step-000002").symlink_to(source / "step-000002")
        proc = launch(nproc, module, *model, *optimizer, *flags, "--steps", "4",
                      "--checkpoint-dir", target, "--resume", "--check")
        assert "   3  " in proc.stdout and "   1  " not in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps of manual TP with AdamW, checkpointed every 2: (its record, its last checkpoint)."""
    d = tmp_path_factory.mktemp("uninterrupted")
    launch(2, MANUAL, *MLP, "--optimizer", "adamw", "--steps", "6", "--checkpoint-every", "2",
           "--checkpoint-dir", d / "ck", "--json", d / "run.json")
    return json.loads((d / "run.json").read_text()), d / "ck" / "step-000006"


@pytest.mark.parametrize("fault,resumed_after", [("kill-mid-run", 2), ("kill-in-save", 2)])
def test_a_killed_rank_costs_only_the_steps_since_the_last_checkpoint(fault, resumed_after,
                                                                      uninterrupted, tmp_path):
    # tests/helpers/fault.py SIGKILLs a worker in torchrun's first attempt: rank 1 at step 4, or
    # rank 0 in the save of step 4 after DCP wrote its files but before it was published.
    # torchrun restarts the group, which resumes from step 2, the last complete checkpoint, and
    # ends where the uninterrupted run ended, bit for bit.
    proc, _ = torchrun("tests/helpers/fault.py", 2, fault, MANUAL, *MLP, "--optimizer",
                       "adamw", "--steps", "6", "--checkpoint-every", "2", "--checkpoint-dir",
                       tmp_path / "ck", "--json", tmp_path / "run.json", timeout=300,
                       torchrun_flags=["--max-restarts", "1"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    record = json.loads((tmp_path / "run.json").read_text())
    whole, last = uninterrupted
    assert record["first_step"] == resumed_after + 1
    assert record["losses"] == whole["losses"][resumed_after:]
    a, b = tensors(last, tmp_path), tensors(tmp_path / "ck" / "step-000006", tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def error_line(output):
    [line] = [line for line in output.splitlines() if line.startswith("partlab: error:")]
    return line


def test_saves_keep_the_newest_and_resume_skips_what_is_not_complete(tmp_path, in_process):
    d = tmp_path / "ck"
    (d / "step-000007.partial").mkdir(parents=True)    # a save that died: never a checkpoint
    status, _ = in_process(MANUAL, *MLP, "--steps", "3", "--checkpoint-dir", str(d),
                           "--checkpoint-every", "1", "--keep-checkpoints", "2")
    assert status == 0
    assert sorted(p.name for p in d.iterdir()) == ["step-000002", "step-000003"]
    (d / "step-000009").mkdir()                         # no partlab.json: not complete either
    status, out = in_process(MANUAL, *MLP, "--steps", "4", "--checkpoint-dir", str(d),
                             "--resume")
    assert status == 0 and "   4  " in out and "   3  " not in out, out


@pytest.fixture
def saved(tmp_path, in_process):
    """A checkpoint directory holding step 2 of the test MLP, on one process."""
    d = tmp_path / "ck"
    assert in_process(MANUAL, *MLP, "--steps", "2", "--checkpoint-dir", str(d))[0] == 0
    return d


@pytest.mark.parametrize("change,args,message", [
    (None, ["--hidden-dim", "32"],
     "step-000002 is of another model: --hidden-dim 64 there, 32 here"),
    (None, ["--optimizer", "adamw"], "--optimizer sgd there, adamw here"),
    (None, ["--seed", "1"], "--seed 0 there, 1 here"),
    (None, ["--steps", "2"], "is at step 2 and --steps is 2 (the whole run): nothing is left"),
    ("truncate", [], "step-000002 cannot be read (EOFError): it is damaged"),
    ("metadata", [], "step-000002 has no DCP .metadata: it is damaged"),
    ("marker", [], "step-000002 cannot be read"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line(saved, in_process, change, args, message):
    step = saved / "step-000002"
    if change == "truncate":
        data = next(step.glob("*.distcp"))
        data.write_bytes(data.read_bytes()[:100])
    elif change == "metadata":
        (step / ".metadata").unlink()
    elif change == "marker":
        (step / "partlab.json").write_text("{")
    argv = [*MLP, "--steps", "4", *args, "--checkpoint-dir", str(saved), "--resume"]
    status, out = in_process(MANUAL, *argv)
    assert status == 2 and message in error_line(out), out[-2000:]


def test_a_save_that_fails_is_an_error_not_a_skip(tmp_path, in_process):
    # A file where the save's directory must go: DCP cannot write it (as on a full disk).
    d = tmp_path / "ck"
    d.mkdir()
    (d / "step-000002.partial").write_text("in the way")
    status, out = in_process(MANUAL, *MLP, "--steps", "2", "--checkpoint-dir", str(d))
    assert status == 2 and "saving step 2 failed (FileExistsError" in error_line(out), out
    assert sorted(p.name for p in d.iterdir()) == ["step-000002.partial"]   # nothing published


def test_a_restart_resumes_only_its_own_run_and_ends_if_it_was_done(tmp_path, in_process,
                                                                    monkeypatch):
    d = str(tmp_path / "ck")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "first")
    assert in_process(MANUAL, *MLP, "--steps", "2", "--checkpoint-dir", d)[0] == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # Killed after its last save: the restart has nothing to do, and says so, exit 0.
    status, out = in_process(MANUAL, *MLP, "--steps", "2", "--checkpoint-dir", d)
    assert status == 0 and "nothing is left to train" in out, out
    # Another run restarted onto the directory does not take the first run's checkpoints.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "second")
    status, out = in_process(MANUAL, *MLP, "--steps", "4", "--checkpoint-dir", d)
    assert status == 2 and "already holds checkpoints" in error_line(out), out


def test_no_checkpoint_and_a_used_directory_are_refused(saved, tmp_path, in_process):
    status, out = in_process(MANUAL, *MLP, "--checkpoint-dir", str(tmp_path / "empty"),
                             "--resume")
    assert status == 2 and "holds no complete checkpoint" in error_line(out)
    # A fresh run would prune the checkpoints that are there: it must say --resume instead.
    status, out = in_process(MANUAL, *MLP, "--checkpoint-dir", str(saved))
    assert status == 2 and "already holds checkpoints (step 2): add --resume" in error_line(out)
    status, out = in_process(MANUAL, *MLP, "--checkpoint-every", "2")
    assert status == 2 and "--checkpoint-every needs --checkpoint-dir DIR" in error_line(out)
