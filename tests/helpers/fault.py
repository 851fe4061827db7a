"""Run a driver with a fault injected into one rank (a test stand-in for a real failure).

usage: torchrun ... tests/helpers/fault.py MODE DRIVER_MODULE [driver flags]
  raise        rank 1 raises at step 2
  hang         rank 1 sleeps at step 1 (the others wait in a collective until --timeout)
  skip-reduce  manual TP's forward all_reduce does nothing (a wrong result --check must catch)
  kill-mid-run   rank 1 kills itself (SIGKILL) at step 4, in torchrun's first attempt only
  kill-in-save   rank 0 kills itself in the first attempt's second save, after DCP has written
                 every file but before the checkpoint is published
"""
import importlib
import os
import signal
import sys
import time

import torch.distributed.checkpoint as dcp

import partlab.model
import partlab.tp_layers
from partlab.distributed import exit_process

mode, module, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
make_batch, save, saves = partlab.model.make_batch, dcp.save, []


def faulty_make_batch(settings, step, device):
    if rank == 1 and mode == "raise" and step == 2:
        raise RuntimeError("injected failure on rank 1")
    if rank == 1 and mode == "hang" and step == 1:
        time.sleep(600)
    if rank == 1 and mode == "kill-mid-run" and step == 3 and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)
    return make_batch(settings, step, device)


def faulty_save(*args, **kwargs):
    result = save(*args, **kwargs)
    saves.append(kwargs["checkpoint_id"])
    if rank == 0 and mode == "kill-in-save" and len(saves) == 2 and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)
    return result


partlab.model.make_batch = faulty_make_batch
dcp.save = faulty_save
if mode == "skip-reduce":
    partlab.tp_layers.ReduceFromTensorParallel.forward = staticmethod(
        lambda ctx, partial, group: partial)
exit_process(importlib.import_module(module).main(argv))
