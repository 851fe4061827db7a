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

import torch
import torch.distributed as dist

from partlab.config import require
from partlab.partition import GPT_VOCAB, tp_dim

MARKER = "partlab.json"
NAME = re.compile(r"step-(\d+)$")
# What a checkpoint must agree on with the run that loads it: the model's shape and its
# optimizer's kind (the layout, the learning rate and --steps may differ).
MUST_MATCH = ("model", "layers", "hidden_dim", "input_dim", "num_classes", "activation", "heads",
              "seq_len", "vocab_size", "dtype", "optimizer", "momentum")


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


def check(settings):
    """Before any collective: what --checkpoint-dir and --resume need of the directory.
    Returns the step to resume after (0 to start afresh)."""
    if not settings.checkpoint_dir:
        return 0
    directory, saved = settings.checkpoint_dir, complete(settings.checkpoint_dir)
    if not settings.resume:
        require(not saved, f"--checkpoint-dir {directory} already holds checkpoints (step "
                           f"{max(saved, default=0)}): add --resume to continue from them, or "
                           "choose another directory")
        parent = os.path.dirname(os.path.abspath(directory))
        require(os.path.isdir(directory) or os.access(parent, os.W_OK),
                f"--checkpoint-dir {directory}: {parent} is not a writable directory")
        return 0
    require(saved, f"--resume: {directory} holds no complete checkpoint (a step-N directory "
                   f"with {MARKER}): run without --resume to start from step 0")
    step, path = max(saved.items())
    try:
        with open(os.path.join(path, MARKER)) as f:
            meta = json.load(f)
        there = meta["settings"]
    except (OSError, ValueError, KeyError) as e:
        raise_damaged(path, e)
    require(os.path.isfile(os.path.join(path, ".metadata")),
            f"--resume: {path} has no DCP .metadata: it is damaged; delete it to resume from "
            "the checkpoint before")
    differ = [k for k in MUST_MATCH if there.get(k) != getattr(settings, k)]
    require(not differ, f"--resume: {path} is of another model: " + ", ".join(
        f"--{k.replace('_', '-')} {there.get(k)} there, {getattr(settings, k)} here"
        for k in differ))
    require(step < settings.steps, f"--resume: {path} is at step {step} and --steps is "
                                   f"{settings.steps} (the whole run): nothing is left to train; "
                                   "raise --steps")
    return step


def raise_damaged(path, error):
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    require(False, f"--resume: {path} cannot be read ({reason}): it is damaged; delete it to "
                   "resume from the checkpoint before")


def layout_free(tensor, name, tp_group, vocab_size):
    """`tensor` (a parameter or its optimizer state) as DCP should see it: where it sits in the
    reference's full tensor."""
    from torch.distributed.tensor import DeviceMesh, DTensor, Shard

    dim = tp_dim(name)
    if tp_group is None or isinstance(tensor, DTensor) or dim is None or tensor.dim() == 0:
        return tensor                       # whole on this rank (DCP keeps one copy), or placed
    ways, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    shape = list(tensor.shape)
    if name in GPT_VOCAB:   # this rank's real rows, as torch.chunk splits the vocabulary
        rows = max(0, min(shape[0], vocab_size - rank * shape[0]))
        tensor, shape[0] = tensor[:rows], vocab_size
    else:
        shape[dim] *= ways
    mesh = DeviceMesh.from_group(tp_group, tensor.device.type)
    return DTensor.from_local(tensor, mesh, [Shard(dim)], run_check=False,
                              shape=torch.Size(shape), stride=torch.empty(shape).stride())


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
    result = {}
    for name, param in train.params.items():
        result[f"model.{name}"] = layout_free(param.detach(), name, train.tp_group,
                                              settings.vocab_size)
        for key, value in optimizer_state(train.optimizer, param, settings).items():
            result[f"optim.{name}.{key}"] = layout_free(value, name, train.tp_group,
                                                        settings.vocab_size)
    return result


def load(train, settings, step):
    """Read the checkpoint at `step` (check found it) into this rank's tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = complete(settings.checkpoint_dir)[step]
    try:
        dcp.load(state_dict(train, settings), checkpoint_id=path)
    except CheckpointException as e:   # every rank's failures, gathered (a BaseException)
        failure = next(iter(e.failures.values()), (e,))   # (exception, its traceback)
        raise_damaged(path, failure[0] if isinstance(failure, tuple) else failure)


def prune(directory, keep):
    """Delete all but the newest `keep` checkpoints, and what saves that died left behind."""
    newest = sorted(complete(directory))[-keep:]
    for step, path in complete(directory).items():
        if step not in newest:
            shutil.rmtree(path)
    for entry in os.listdir(directory):
        if entry.endswith(".partial") and NAME.match(entry.removesuffix(".partial")):
            shutil.rmtree(os.path.join(directory, entry))


def saver(train, settings, rank):
    """after_step(step) for the step loop: saves after every --checkpoint-every steps and the
    last (0-based `step` done)."""
    import torch.distributed.checkpoint as dcp

    def after_step(step):
        done, every = step + 1, settings.checkpoint_every
        if done != settings.steps and (every is None or done % every):
            return
        directory = settings.checkpoint_dir
        final = os.path.join(directory, f"step-{done:06d}")
        partial = final + ".partial"
        if rank == 0:
            os.makedirs(directory, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)   # a save that died before
        dist.barrier()
        dcp.save(state_dict(train, settings), checkpoint_id=partial)
        if rank == 0:
            with open(os.path.join(partial, MARKER), "w") as f:   # unpublished until renamed
                json.dump({"step": done, "settings": dataclasses.asdict(settings)}, f, indent=1)
            os.replace(partial, final)
            prune(directory, settings.keep_checkpoints)
        dist.barrier()

    return after_step
