"""The `partlab` command: thin dispatch to the lab, the environment report, the benchmarks and
the planner."""
import argparse
import sys

from partlab.config import UsageError


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="partlab",
        description="Tensor and pipeline parallelism lab. Drivers: torchrun ... -m "
                    "partlab.tensor_parallel_native | partlab.tensor_parallel_manual | "
                    "partlab.pipeline | partlab.pipeline_tensor_parallel")
    sub = p.add_subparsers(dest="command", required=True)
    lab = sub.add_parser("lab", help="run every strategy, compare with the reference, one table",
                         description="Unknown flags (--steps 5, --hidden-dim 4096, ...) are "
                                     "passed to every driver.")
    from partlab import lab as lab_module
    lab_module.add_arguments(lab)
    sub.add_parser("env", help="GPUs, versions, imports, extension: what the lab would run on")
    sub.add_parser("plan", help="which layout for a model on a cluster: memory, step time and "
                                "TFLOP/s predicted (`partlab plan --help`)", add_help=False)
    # No -h of its own: `partlab bench step --help` reaches the benchmark's own parser.
    bench = sub.add_parser("bench", help="sweeps that write JSON and plots: step, bubble, comm, "
                                         "memory, overhead, all; op: the fused op (`partlab "
                                         "bench step --help`)", add_help=False)
    from partlab.bench import SWEEPS
    bench.add_argument("what", choices=(*SWEEPS, "all", "op", "checkpoint", "list"),
                       help="a sweep (partlab/bench.py); op: the fused linear+bias+activation "
                            "op (partlab/bench_op.py); checkpoint: what saving costs "
                            "(partlab/bench_checkpoint.py); list (or nothing): list them")
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1].startswith("-")):
        argv = ["bench", "list", *argv[1:]]      # no sweep named: list them, whatever follows

    args, rest = p.parse_known_args(argv)
    try:
        if args.command == "lab":
            return lab_module.main(args, rest)
        if args.command == "plan":
            from partlab import plan
            return plan.main(rest)
        if rest and args.command == "env":
            p.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "env":
            from partlab import environment
            return environment.main()
        if args.what == "list":
            from partlab import bench
            print(bench.list_sweeps())
            if rest:
                raise UsageError(f"name a sweep before {rest[0]}: e.g. partlab bench all "
                                 + " ".join(rest))
            return 0
        if args.what == "op":
            from partlab import bench_op
            return bench_op.main(rest)
        if args.what == "checkpoint":
            from partlab import bench_checkpoint
            return bench_checkpoint.main(rest)
        from partlab import bench
        return bench.main(args.what, rest)
    except UsageError as e:
        print(f"partlab: error: {e}", file=sys.stderr)
        return 2
