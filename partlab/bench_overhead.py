"""What the drivers' own measuring costs: their step loop against a bare loop of the same step.

A driver times every step (synchronising the device around it), reads the loss back, counts
collectives and saved activations on the last step, and (pipelines) times every compute call
for the timeline. Here two copies of one strategy are built in the same process group; one
runs the driver's loop (harness.run_steps), the other the same steps with nothing around them,
alternating, and rank 0 reports how much longer the driver's loop takes.

Run by `partlab bench overhead`; by hand:
  torchrun --standalone --nproc_per_node 2 -m partlab.bench_overhead --strategy tp-manual --steps 10
"""
import argparse
import functools
import importlib
import statistics
import sys
import time

from partlab import distributed, harness, strategies
from partlab import model as models
from partlab.harness import Driver
from partlab.report import write_json


def bare_loop(settings, device, step):
    """The same steps with nothing around them: no per-step sync, timing or loss read-back.
    Returns the seconds per step over the steps the driver's summary uses (timed_steps)."""
    timed = harness.timed_steps(range(settings.steps))     # a range: the steps in the middle
    untimed_before, untimed_after = range(timed[0]), range(timed[-1] + 1, settings.steps)
    for i in untimed_before:
        step(*models.make_batch(settings, i, device))
    harness.synchronize(device)
    start = time.perf_counter()
    for i in timed:
        step(*models.make_batch(settings, i, device))
    harness.synchronize(device)
    seconds = (time.perf_counter() - start) / len(timed)
    for i in untimed_after:
        step(*models.make_batch(settings, i, device))
    return seconds


def compare_loops(build, rounds, json_path, settings, group):
    """Alternate the driver's loop and the bare loop; compare the mean of the driver's timed
    steps (the steps its reported median comes from) with the bare loop's mean over the same
    steps, and the whole loops' wall time (which includes the driver's slower last step, where
    it counts collectives and memory). The bare pipeline keeps its timeline's wrappers, idle:
    one attribute test per compute call."""
    measured, bare = build(settings, group), build(settings, group)
    reported, plain, driver_wall, bare_wall = [], [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        trace = harness.run_steps(settings, group.device, measured.step,
                                  measured.params.values(), measured.timeline)
        driver_wall.append(time.perf_counter() - start)
        reported.append(statistics.mean(harness.timed_steps(trace.times)))
        start = time.perf_counter()
        plain.append(bare_loop(settings, group.device, bare.step))
        bare_wall.append(time.perf_counter() - start)
    if group.rank == 0:
        step_cost = statistics.median(reported) / statistics.median(plain) - 1
        loop_cost = statistics.median(driver_wall) / statistics.median(bare_wall) - 1
        result = {"strategy": measured.name, "world_size": group.world_size,
                  "steps": settings.steps, "rounds": rounds, "reported_step_s": reported,
                  "bare_step_s": plain, "driver_loop_s": driver_wall, "bare_loop_s": bare_wall,
                  "step_overhead": step_cost, "loop_overhead": loop_cost}
        print(f"{measured.name}: median of {rounds} rounds of {settings.steps} steps: step "
              f"{statistics.median(reported) * 1e3:.2f} ms timed by the driver, "
              f"{statistics.median(plain) * 1e3:.2f} ms in a bare loop: {step_cost:+.1%}; "
              f"whole loop (incl. the counted last step) {loop_cost:+.1%}")
        if json_path:
            write_json(result, json_path)
    return 0


def main(argv=None):
    own = argparse.ArgumentParser(
        prog="partlab.bench_overhead", add_help=False,
        description="The driver's step loop vs a bare loop of the same strategy. Other flags "
                    "go to the strategy's driver.")
    own.add_argument("--strategy", choices=strategies.BY_KEY, default="tp-manual",
                     help="a key of partlab/strategies.py")
    own.add_argument("--rounds", type=int, default=5, help="driver/bare loop pairs")
    own.add_argument("--json", metavar="PATH", help="rank 0 writes the result here")
    args, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    entry = strategies.get(args.strategy)
    driver: Driver = importlib.import_module(entry.module)
    work = functools.partial(compare_loops, driver.build, args.rounds, args.json)
    return distributed.run(driver.parser(), driver.validate, work, [*entry.flags, *rest])


if __name__ == "__main__":
    distributed.exit_process(main())
