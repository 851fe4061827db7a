"""Several driver runs in one torchrun launch: one process group, each run as its own driver
does it (parse, validate, build, train, compare with the reference, write --json). The tests pay
a launch's start-up (torchrun, `import torch` in every process, the rendezvous) once per world
size instead of once per run; what a run computes does not depend on the runs before it (every
build seeds itself, every batch comes from (seed, step)).

usage: torchrun ... tests/helpers/runs.py SPEC.json
  SPEC.json: [[driver module, [driver flags, ... --json PATH]], ...]
"""
import importlib
import json
import sys
from pathlib import Path

from partlab import distributed, report
from partlab.config import parse

specs = json.loads(Path(sys.argv[1]).read_text())


def train_each(_, group):
    launch = distributed.launch_env()
    status = 0
    for module, argv in specs:
        driver = importlib.import_module(module)
        settings = driver.validate(parse(driver.parser(), argv), launch)
        status = max(status, report.train_and_report(driver.build, settings, group))
    return status


first = importlib.import_module(specs[0][0])
distributed.exit_process(distributed.run(first.parser(), first.validate, train_each, specs[0][1]))
