"""Run a driver with a fault injected into one rank (a test stand-in for a real failure).

usage: torchrun ... tests/helpers/fault.py MODE DRIVER_MODULE [driver flags]
  raise        rank 1 raises at step 2
  hang         rank 1 sleeps at step 1 (the others wait in a collective until --timeout)
  skip-reduce  manual TP's forward all_reduce does nothing (a wrong result --check must catch)
"""
import importlib
import os
import sys
import time

import partlab.model
import partlab.tp_layers
from partlab.distributed import exit_process

mode, module, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ["RANK"])
make_batch = partlab.model.make_batch


def faulty_make_batch(settings, step, device):
    if rank == 1 and mode == "raise" and step == 2:
        raise RuntimeError("injected failure on rank 1")
    if rank == 1 and mode == "hang" and step == 1:
        time.sleep(600)
    return make_batch(settings, step, device)


partlab.model.make_batch = faulty_make_batch
if mode == "skip-reduce":
    partlab.tp_layers.ReduceFromTensorParallel.forward = staticmethod(
        lambda ctx, partial, group: partial)
exit_process(importlib.import_module(module).main(argv))
