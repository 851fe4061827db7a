"""Checkpoints without a layout: --checkpoint-dir DIR, --checkpoint-every N, --resume.

Every rank hands torch.distributed.checkpoint (DCP) its own pieces under the reference's names,
each saying where it sits in the full tensor: native TP's DTensors as they are, manual TP's plain
shards as DTensors placed the way partition.tp_dim splits them (the padding of a vocabulary
that does not divide left out), a pipeline stage's whole tensors as they are. DCP writes each
piece once, gathering nothing, and a run of any other layout reads the pieces its own shards
need: the checkpoint holds the model and its optimizer state, not a layout.

A save is atomic: DCP writes DIR/step-N.partial, then rank 0 adds partlab.json (the step and what
must match to load it) and renames the directory DIR/step-N. Only a directory of that name with
that file is a checkpoint, so a run killed in the middle of a save leaves the one before as the
newest. The newest --keep-checkpoints stay. Data and weights follow from (seed, step), so the
step is all a resumed run needs besides the tensors.
"""
import dataclasses
import json
import os
import re
import shutil
import time

import torch
import torch.distributed as dist

from partlab.config import UsageError, require
from partlab.partition import GPT_VOCAB, tp_dim

MARKER = "partlab.json"
# Set above 0 when torchrun (--max-restarts) restarts a failed group, or Slurm requeues a job:
# such a run resumes from its directory's newest checkpoint (or starts afresh if there is none).
RESTART_COUNTS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
NAME = re.compile(r"step-(\d+)$")
# What a checkpoint must agree on with the run that loads it: the model's shape, what the data
# and weights follow from, and the optimizer, so that the run goes on as the reference does (the
# layout and --steps may differ).
MUST_MATCH = ("model", "layers", "hidden_dim", "input_dim", "num_classes", "activation", "heads",
              "seq_len", "vocab_size", "dtype", "seed", "batch_size", "optimizer", "lr",
              "momentum")


@dataclasses.dataclass
class TrainState:
    """What a rank checkpoints: its optimizer and the parameters it steps, by the reference's
    names (DTensors in native TP); tp_group: the group manual TP splits its plain shards over,
    None where every plain tensor is whole."""

    optimizer: torch.optim.Optimizer
    params: dict[str, torch.Tensor]
    tp_group: dist.ProcessGroup | None = None


def complete(directory):
    """{step: path} of the complete checkpoints in `directory`."""
    found = {}
    for entry in os.listdir(directory) if os.path.isdir(directory) else ():
        match = NAME.match(entry)
        path = os.path.join(directory, entry)
        if match and os.path.isfile(os.path.join(path, MARKER)):
            found[int(match.group(1))] = path
    return found


def restarted():
    """Whether this run is a restart of one that failed (torchrun's or Slurm's count)."""
    return any(int(os.environ.get(name) or 0) > 0 for name in RESTART_COUNTS)


def run_id():
    """What a restart keeps: the Slurm job and torchrun's run id (run.sbatch sets it to the job),
    so that a restart resumes only from checkpoints its own first attempt saved."""
    return f"{os.environ.get('SLURM_JOB_ID', '')}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"


def read_marker(path):
    """A checkpoint's partlab.json; a damaged one is a one-line error."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            meta = json.load(f)
        if not isinstance(meta.get("settings"), dict):
            raise ValueError("no settings")
        return meta
    except (OSError, ValueError, AttributeError) as e:
        raise_damaged(path, f"{type(e).__name__}: {e}")


def check(settings):
    """Before any collective: what --checkpoint-dir and --resume need of the directory.
    Returns the step to resume after (0 to start afresh)."""
    if not settings.checkpoint_dir:
        return 0
    directory, saved = settings.checkpoint_dir, complete(settings.checkpoint_dir)
    step, path = max(saved.items()) if saved else (0, None)
    meta = read_marker(path) if saved and (settings.resume or restarted()) else None
    own = restarted() and meta is not None and meta.get("run") == run_id()
    if not (settings.resume or own):   # a fresh start
        require(not saved, f"--checkpoint-dir {directory} already holds checkpoints (step "
                           f"{step}): add --resume to continue from them, or choose another "
                           "directory")
        parent = os.path.dirname(os.path.abspath(directory))
        require(os.path.isdir(directory) or os.access(parent, os.W_OK),
                f"--checkpoint-dir {directory}: {parent} is not a writable directory")
        return 0
    require(saved, f"--resume: {directory} holds no complete checkpoint (a step-N directory "
                   f"with {MARKER}): run without --resume to start from step 0")
    there = meta["settings"]
    require(os.path.isfile(os.path.join(path, ".metadata")),
            f"--resume: {path} has no DCP .metadata: it is damaged; delete it to resume from "
            "the checkpoint before")
    differ = [k for k in MUST_MATCH if there.get(k) != getattr(settings, k)]
    require(not differ, f"--resume: {path} is of another model: " + ", ".join(
        f"--{k.replace('_', '-')} {there.get(k)} there, {getattr(settings, k)} here"
        for k in differ))
    require(step < settings.steps or own, f"--resume: {path} is at step {step} and --steps is "
                                   f"{settings.steps} (the whole run): nothing is left to train; "
                                   "raise --steps")
    return step


def raise_damaged(path, reason):
    raise UsageError(f"--resume: {path} cannot be read ({reason}): it is damaged; delete it to "
                     "resume from the checkpoint before")


def layout_free(tensor, name, mesh, vocab_size):
    """`tensor` (a parameter or its optimizer state) as DCP should see it: where it sits in the
    reference's full tensor (mesh: manual TP's group, None where plain tensors are whole)."""
    from torch.distributed.tensor import DTensor, Shard

    dim = tp_dim(name)
    if mesh is None or isinstance(tensor, DTensor) or dim is None or tensor.dim() == 0:
        return tensor                       # whole on this rank (DCP keeps one copy), or placed
    ways, rank = mesh.size(), mesh.get_local_rank()
    shape = list(tensor.shape)
    if name in GPT_VOCAB:   # this rank's real rows, as torch.chunk splits the vocabulary
        rows = max(0, min(shape[0], vocab_size - rank * shape[0]))
        tensor, shape[0] = tensor[:rows], vocab_size
    else:
        shape[dim] *= ways
    return DTensor.from_local(tensor, mesh, [Shard(dim)], run_check=False,
                              shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def optimizer_state(optimizer, param, settings):
    """The optimizer's state of `param`, created empty if it has none yet (so that a load has
    tensors to read into)."""
    state = optimizer.state[param]
    if not state and settings.optimizer == "adamw":
        state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                     exp_avg_sq=torch.zeros_like(param))
    elif not state and settings.momentum:
        state["momentum_buffer"] = torch.zeros_like(param)
    return state


def state_dict(train, settings):
    """This rank's part of the checkpoint: views of its own tensors, so a load writes into them."""
    from torch.distributed.tensor import DeviceMesh

    device = next(iter(train.params.values())).device.type
    mesh = DeviceMesh.from_group(train.tp_group, device) if train.tp_group is not None else None
    result = {}
    for name, param in train.params.items():
        result[f"model.{name}"] = layout_free(param.detach(), name, mesh, settings.vocab_size)
        for key, value in optimizer_state(train.optimizer, param, settings).items():
            result[f"optim.{name}.{key}"] = layout_free(value, name, mesh, settings.vocab_size)
    return result


def load(train, settings, step):
    """Read the checkpoint at `step` (check found it) into this rank's tensors; returns the
    seconds it took."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = complete(settings.checkpoint_dir)[step]
    start = time.perf_counter()
    try:
        dcp.load(state_dict(train, settings), checkpoint_id=path)
    except CheckpointException as e:   # every rank's failures, gathered (a BaseException)
        raise_damaged(path, first_failure(e))
    return time.perf_counter() - start


def first_failure(error):
    """The first rank's exception in DCP's CheckpointException, as 'Type: message'."""
    failure = next(iter(error.failures.values()), error)
    failure = failure[0] if isinstance(failure, tuple) else failure   # (exception, traceback)
    reason = (str(failure).strip().splitlines() or [""])[0]
    return f"{type(failure).__name__}: {reason}" if reason else type(failure).__name__


def prune(directory, keep):
    """Delete all but the newest `keep` checkpoints, and what saves that died left behind."""
    saved = complete(directory)
    newest = sorted(saved)[-keep:]
    for step, path in saved.items():
        if step not in newest:
            shutil.rmtree(path)
    for entry in os.listdir(directory):
        if entry.endswith(".partial") and NAME.match(entry.removesuffix(".partial")):
            shutil.rmtree(os.path.join(directory, entry))


class Saver:
    """after_step(step) for the step loop: saves after every --checkpoint-every steps and after
    the last (`step` 0-based, done). Keeps each save's wall time and the last one's bytes."""

    def __init__(self, train, settings, rank):
        self.train, self.settings, self.rank = train, settings, rank
        self.seconds, self.bytes = [], None

    def __call__(self, step):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        done, every, s = step + 1, self.settings.checkpoint_every, self.settings
        if done != s.steps and (every is None or done % every):
            return
        start = time.perf_counter()
        final = os.path.join(s.checkpoint_dir, f"step-{done:06d}")
        partial = final + ".partial"
        if self.rank == 0:
            os.makedirs(s.checkpoint_dir, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)   # a save that died before
        dist.barrier()
        try:
            dcp.save(state_dict(self.train, s), checkpoint_id=partial)
        except CheckpointException as e:       # a full disk, a path that cannot be written
            raise UsageError(f"--checkpoint-dir {s.checkpoint_dir}: saving step {done} failed "
                             f"({first_failure(e)}); nothing was published, the checkpoints "
                             "before are intact") from None
        failure = [None]
        if self.rank == 0:
            try:
                self.publish(partial, final, done)
            except OSError as e:
                failure = [f"{type(e).__name__}: {e}"]
        dist.broadcast_object_list(failure, src=0)       # every rank stops, not only rank 0
        require(failure[0] is None, f"--checkpoint-dir {s.checkpoint_dir}: publishing step "
                                    f"{done} failed ({failure[0]})")
        self.seconds.append(time.perf_counter() - start)

    def publish(self, partial, final, done):
        """Rank 0: the marker, the rename that makes the checkpoint, then the pruning."""
        s = self.settings
        with open(os.path.join(partial, MARKER), "w") as f:   # unpublished until renamed
            json.dump({"step": done, "run": run_id(), "settings": dataclasses.asdict(s)}, f,
                      indent=1)
        shutil.rmtree(final, ignore_errors=True)              # a step-N without its marker
        os.replace(partial, final)
        prune(s.checkpoint_dir, s.keep_checkpoints)
        self.bytes = sum(os.path.getsize(os.path.join(final, f)) for f in os.listdir(final))
