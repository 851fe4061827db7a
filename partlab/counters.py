"""Counting what a step does, from inside: the communication ops the dispatcher sees (count and
bytes) and the activations autograd saves for backward. partlab/harness.py runs them on a run's
last step."""
import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Dispatcher op name -> what the table calls it. c10d ops come from torch.distributed calls;
# the functional ones from DTensor. (wait_tensor and friends are bookkeeping, not communication.)
COMM_OPS = {
    "allreduce_": "all_reduce", "all_reduce": "all_reduce",
    "allgather_": "all_gather", "_allgather_base_": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "broadcast_": "broadcast", "broadcast": "broadcast",
    "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "send": "send", "recv_": "recv", "recv_any_source_": "recv", "barrier": "barrier",
}
# Ops whose first argument is the output: what this rank contributes is the second.
INPUT_IS_SECOND = {"allgather_", "_allgather_base_", "reduce_scatter_", "_reduce_scatter_base_",
                   "alltoall_", "alltoall_base_"}


def nbytes(tensors):
    """Bytes of a tensor or a (nested) list of tensors; 0 for anything else."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(nbytes(t) for t in tensors)
    return 0


class CommCounter(TorchDispatchMode):
    """Counts the communication ops the dispatcher sees (c10d calls and DTensor's collectives)
    and the bytes this rank hands to each (the payload, before any algorithm splits it).

    Ops issued while the autograd engine runs a backward node are also counted as backward.
    An op on DTensors is handed back to DTensor (NotImplemented), so the collectives its own op
    handlers issue on the local shards (loss_parallel's, a sharded norm's gradient sum) are seen
    here too, as torch's CommDebugMode sees them.
    """

    def __init__(self):
        super().__init__()
        self.total = collections.Counter()
        self.backward = collections.Counter()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtensor = sys.modules.get("torch.distributed.tensor")
        if dtensor and any(issubclass(t, dtensor.DTensor) for t in types):
            return NotImplemented
        name = COMM_OPS.get(func._opname) if func.namespace in (
            "c10d", "_c10d_functional", "c10d_functional") else None
        if name:
            self.total[name] += 1
            self.bytes[name] += nbytes(args[1 if func._opname in INPUT_IS_SECOND else 0])
            if torch._C._current_autograd_node() is not None:
                self.backward[name] += 1
        return func(*args, **(kwargs or {}))


class _Saved:
    """A tensor saved for backward; the meter forgets it when autograd frees it."""

    def __init__(self, meter, tensor, key):
        self.meter, self.tensor, self.key = meter, tensor, key

    def __del__(self):
        self.meter.release(self.key)


class ActivationMeter(torch.autograd.graph.saved_tensors_hooks):
    """Peak bytes of the tensors autograd keeps for backward (activations), parameters excluded.

    Measured the same way on every device, so GPipe and 1F1B compare on CPU too: GPipe keeps
    every microbatch's activations until the backwards start, 1F1B at most p microbatches'.
    A tensor saved by several ops is counted once.
    """

    def __init__(self, params):
        self.skip = {self.local(p).data_ptr() for p in params}
        self.refs = collections.Counter()
        self.live = self.peak = 0
        super().__init__(self.pack, lambda saved: saved.tensor)

    @staticmethod
    def local(t):
        """A DTensor's local shard, else t. DTensor is looked up, not imported: a run that never
        loaded it (manual TP, the pipeline) has none, and importing it costs ~0.5 s a process."""
        dtensor = sys.modules.get("torch.distributed.tensor")
        return t._local_tensor if dtensor and isinstance(t, dtensor.DTensor) else t

    def pack(self, tensor):
        local = self.local(tensor)
        key = (local.data_ptr(), local.numel() * local.element_size())
        if key[0] in self.skip or key[1] == 0:
            return _Saved(self, tensor, None)
        if self.refs[key] == 0:
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Saved(self, tensor, key)

    def release(self, key):
        if key is not None:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                self.live -= key[1]
                del self.refs[key]
