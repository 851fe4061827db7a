"""The one list of strategies: what `partlab lab`, every `partlab bench` sweep, the overhead
benchmark, the GPU check, the Slurm scripts and the tests run. Adding a strategy is one entry
here (and its key in scripts/slurm/run.sbatch's `case`, which tests/test_slurm.py checks).

An entry is a driver module and the flags that pick the strategy out of it; `kind` says which
family it belongs to (the sweeps choose by it), `min_processes` the smallest world it runs on.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str                      # what users type: partlab lab --only KEY, run.sbatch KEY
    module: str                   # the driver: torchrun ... -m MODULE
    flags: tuple[str, ...]        # the driver flags that make it this strategy
    label: str                    # how tables and plots name it
    kind: str                     # "tp", "pipeline" or "pipeline-tp"
    min_processes: int = 1

    def command(self):
        """The driver part of its torchrun command line: -m MODULE FLAGS..."""
        return ["-m", self.module, *self.flags]

    def flag(self, name):
        """The value this entry gives flag `name` (e.g. --schedule)."""
        return self.flags[self.flags.index(name) + 1]


def _pipeline(schedule):
    return Entry(f"pipeline-{schedule}", "partlab.pipeline", ("--schedule", schedule),
                 f"pipeline {schedule}", "pipeline")


STRATEGIES = (
    Entry("tp-native", "partlab.tensor_parallel_native", (), "native TP", "tp"),
    Entry("tp-manual", "partlab.tensor_parallel_manual", ("--fused",), "manual TP fused", "tp"),
    Entry("tp-manual-unfused", "partlab.tensor_parallel_manual", ("--no-fused",),
          "manual TP unfused", "tp"),
    *(_pipeline(s) for s in ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")),
    Entry("pp-tp-native", "partlab.pipeline_tensor_parallel", ("--tp", "2", "--tp-impl", "native"),
          "pipeline x native TP", "pipeline-tp", min_processes=4),
    Entry("pp-tp-manual", "partlab.pipeline_tensor_parallel", ("--tp", "2", "--tp-impl", "manual"),
          "pipeline x manual TP", "pipeline-tp", min_processes=4),
)
BY_KEY = {s.key: s for s in STRATEGIES}


def get(key):
    """The entry called `key`; a KeyError names the keys there are."""
    try:
        return BY_KEY[key]
    except KeyError:
        raise KeyError(f"unknown strategy {key!r}: choose from {', '.join(BY_KEY)}") from None


def of_kind(kind):
    return [s for s in STRATEGIES if s.kind == kind]
