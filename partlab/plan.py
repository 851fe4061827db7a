"""`partlab plan`: which layout for a model on a cluster. It enumerates tensor x pipeline x
data parallelism, microbatches, schedule, interleaving and activation recomputation, predicts
each layout's per-GPU memory and step time with partlab/theory/step.py, and prints the fastest
that fit, why they win, and why the rest do not; --json writes it all. --validate checks the
same model against the lab's own runs on this machine (partlab/plan_validate.py).

  partlab plan --model gpt3-175b --cluster dgx-a100 --gpus 1024 --global-batch 1536
"""
import argparse
import collections
import dataclasses
import os
import sys
import time

from partlab import nvidia
from partlab.config import Settings, UsageError
from partlab.report import write_json
from partlab.theory.step import Layout, Machine, memory_gib, predict

# Decoder-only transformers of well-known sizes (partlab's gpt: pre-LN, GELU MLP of 4h, learned
# positions; sequence 2048, GPT-2's vocabulary padded to 51200 as Megatron-LM pads it).
MODELS = {
    "gpt3-6.7b": {"layers": 32, "hidden_dim": 4096, "heads": 32},        # Brown et al. 2020
    "gpt3-13b": {"layers": 40, "hidden_dim": 5120, "heads": 40},
    "gpt3-175b": {"layers": 96, "hidden_dim": 12288, "heads": 96},
    "gpt-530b": {"layers": 105, "hidden_dim": 20480, "heads": 128},      # Smith et al. 2022
    "gpt-1t": {"layers": 128, "hidden_dim": 25600, "heads": 160},        # Narayanan et al. 2021
}
MODEL_DEFAULTS = {"model": "gpt", "seq_len": 2048, "vocab_size": 51200, "dtype": "bf16"}

# Nodes of 8 GPUs: memory (GB) and its bandwidth, NVLink per direction per GPU, and each GPU's
# share of the node's InfiniBand (A100: 8 x HDR 200 Gb/s; H100/H200: 8 x NDR 400 Gb/s), in GB/s;
# the bf16 peak is nvidia.DATASHEET_TFLOPS's. Latencies are typical NCCL figures for one ring
# step.
CLUSTERS = {
    "dgx-a100": {"gpu": "A100", "memory_gb": 80, "memory_gbps": 2039, "intra_gbps": 300,
                 "inter_gbps": 25},
    "dgx-h100": {"gpu": "H100", "memory_gb": 80, "memory_gbps": 3350, "intra_gbps": 450,
                 "inter_gbps": 50},
    "hgx-h200": {"gpu": "H200", "memory_gb": 141, "memory_gbps": 4800, "intra_gbps": 450,
                 "inter_gbps": 50},
}
CLUSTER_DEFAULTS = {"gpus_per_node": 8, "intra_latency_us": 5, "inter_latency_us": 10,
                    "efficiency": 0.75}
SCHEDULES = (("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 4),
             ("zero-bubble", 2))
MICROBATCH_SIZES = (1, 2, 4, 8)


def cluster(name, dtype="bf16", **overrides):
    c = {**CLUSTER_DEFAULTS, **CLUSTERS[name], **overrides}
    peak = c.pop("peak_tflops", None) or nvidia.datasheet_tflops(c.pop("gpu"), dtype)
    c.pop("gpu", None)
    return Machine(name=name, memory_gib=c.pop("memory_gb") * 1e9 / 2**30, peak_tflops=peak,
                   **c)


def layouts(s, gpus):
    """The layouts of `gpus` GPUs for Settings `s` (batch_size: the global batch) that the step
    model covers (partlab's drivers run the tensor and pipeline parts; data parallelism and
    recomputation are modelled only): t a power of 2 dividing the heads and the sequence (for
    sequence parallelism, which TP always uses here: the same bytes, less memory), two nodes'
    worth at most; stages of whole blocks; replicas splitting the batch into whole
    microbatches; schedules with the microbatches they need. Without a pipeline the
    microbatches are gradient accumulation (1F1B on one rank: one alive at a time), the largest
    first."""
    for t in (2**k for k in range(gpus.bit_length())):
        if gpus % t or s.heads % t or s.seq_len % t or t > 16:
            continue
        for p in (p for p in range(1, gpus // t + 1) if gpus // t % p == 0 and p <= s.layers):
            d = gpus // (t * p)
            for b in MICROBATCH_SIZES if p > 1 else sorted(MICROBATCH_SIZES, reverse=True):
                if s.batch_size % (d * b):
                    continue
                m = s.batch_size // (d * b)
                for schedule, v in SCHEDULES if p > 1 else (("1f1b", 1),):
                    if s.layers % (p * v) == 0 and (schedule != "1f1b" or m >= p) \
                            and (v == 1 or m % p == 0):
                        for recompute in (False, True):
                            yield Layout(t, p, d, m, schedule, v, recompute,
                                         sequence_parallel=t > 1)


def search(s, gpus, machine):
    """(fitting predictions, fastest first; {reason: count} for the rest)."""
    fits, rejected, fitted, accumulated = [], collections.Counter(), set(), set()
    for layout in layouts(s, gpus):
        if layout.recompute and dataclasses.replace(layout, recompute=False) in fitted:
            continue        # it fits without recomputing, which is faster
        if layout.pp == 1 and (layout.tp, layout.recompute) in accumulated:
            continue        # fewer, larger microbatches fit: the same maths, fewer calls
        memory = memory_gib(s, layout, machine)
        if memory["fits"]:
            fitted.add(layout)
            if layout.pp == 1:
                accumulated.add((layout.tp, layout.recompute))
            fits.append(predict(s, layout, machine))
            continue
        too_much = "weights, gradients and optimizer state" \
            if memory["state"] > machine.usable * machine.memory_gib \
            else "activations on top of the state"
        rejected[f"{too_much} exceed {machine.usable:.0%} of {machine.memory_gib:.0f} "
                 "GiB"] += 1
    fits.sort(key=lambda r: r["time_s"]["step"])
    return fits, rejected


def why(r, best):
    """What a layout's step is made of, and what it costs against the best."""
    t, mem = r["time_s"], r["memory_gib"]
    parts = (f"step {t['step']:.2f} s = compute and tensor-parallel collectives "
             f"{t['compute_and_tp']:.2f} + pipeline idle {t['pipeline_idle']:.2f} (bubble "
             f"{r['bubble']:.1%}, with messages) + SP's norm gradients "
             f"{t['sp_gradients']:.2f} + data-parallel all_reduce "
             f"{t['dp_all_reduce']:.2f} + optimizer {t['optimizer']:.2f}; {mem['total']:.1f} GiB "
             "per GPU")
    if r is best:
        return parts
    return parts + f"; {t['step'] / best['time_s']['step'] - 1:+.1%} against the best"


def parser():
    p = argparse.ArgumentParser(prog="partlab plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt3-175b",
                   help=f"a preset ({', '.join(MODELS)}), or gpt with --layers/--hidden-dim/"
                        "--heads/--seq-len/--vocab-size")
    for flag in ("layers", "hidden_dim", "heads", "seq_len", "vocab_size"):
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, dest=flag)
    p.add_argument("--cluster", choices=CLUSTERS, default="dgx-a100")
    p.add_argument("--gpus", type=int, default=1024)
    p.add_argument("--global-batch", type=int, default=1536, help="sequences per step")
    p.add_argument("--efficiency", type=float,
                   help=f"share of the peak a large matmul reaches (default "
                        f"{CLUSTER_DEFAULTS['efficiency']})")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", help="write the search here")
    p.add_argument("--validate", action="store_true",
                   help="check the model against the lab's own runs on this machine")
    p.add_argument("--repeats", type=int, default=1, metavar="N",
                   help="with --validate: run and calibrate each configuration N times and "
                        "compare the medians (a noisy machine's step times vary)")
    p.add_argument("--quick", action="store_true",
                   help="with --validate: three tiny runs, to check that it works (not a "
                        "measurement)")
    return p


def model_settings(args):
    if args.model != "gpt" and args.model not in MODELS:
        raise UsageError(f"--model {args.model}: a preset ({', '.join(MODELS)}) or gpt")
    sizes = {} if args.model == "gpt" else MODELS[args.model]
    given = {k: getattr(args, k) for k in ("layers", "hidden_dim", "heads", "seq_len",
                                           "vocab_size") if getattr(args, k) is not None}
    missing = {"layers", "hidden_dim", "heads"} - set(sizes) - set(given)
    if missing:
        raise UsageError("--model gpt needs " + ", ".join(
            f"--{k.replace('_', '-')}" for k in sorted(missing)))
    s = Settings(**{**MODEL_DEFAULTS, **sizes, **given, "batch_size": args.global_batch})
    if min(s.layers, s.hidden_dim, s.heads, s.seq_len, s.vocab_size) < 1 \
            or s.hidden_dim % s.heads:
        raise UsageError(f"--hidden-dim {s.hidden_dim} must be a positive multiple of --heads "
                         f"{s.heads}, and every size positive")
    return s


def main(argv):
    args = parser().parse_args(argv)
    if args.json:
        try:
            os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        except OSError as e:
            raise UsageError(f"--json {args.json}: cannot make its directory ({e.strerror}): "
                             "write somewhere else") from None
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise UsageError(f"--efficiency {args.efficiency:g}: a share of the peak, above 0 and "
                         "at most 1")
    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: at least 1")
    if args.validate:
        from partlab import plan_validate
        return plan_validate.main(args)
    s = model_settings(args)
    if args.gpus < 1 or args.global_batch < 1:
        raise UsageError("--gpus and --global-batch must be positive")
    machine = cluster(args.cluster, **({} if args.efficiency is None
                                      else {"efficiency": args.efficiency}))
    start = time.perf_counter()
    fits, rejected = search(s, args.gpus, machine)
    seconds = time.perf_counter() - start
    searched = len(fits) + sum(rejected.values())
    print(f"{args.model}: {s.layers} blocks, hidden {s.hidden_dim}, {s.heads} heads, sequence "
          f"{s.seq_len}; {args.gpus} x {machine.name} GPUs ({machine.peak_tflops:g} TFLOP/s "
          f"bf16 at {machine.efficiency:.0%}), global batch {args.global_batch}: {searched} "
          f"layouts in {seconds:.1f} s, {len(fits)} fit")
    for i, r in enumerate(fits[:args.top], 1):
        print(f"{i}. {r['describe']} (b={r['microbatch_size']}): {r['tflops_per_gpu']:.0f} "
              f"TFLOP/s per GPU "
              f"(MFU {r['mfu']:.1%})\n   {why(r, fits[0])}")
    for reason, n in rejected.most_common():
        print(f"do not fit: {n} layouts, {reason}")
    if not searched:
        print(f"partlab: error: no layout makes {args.gpus} GPUs: t (a power of 2 up to 16 "
              f"dividing the heads and the sequence) x p (up to the {s.layers} blocks) x "
              f"replicas (dividing the batch of {args.global_batch}): change --gpus or "
              "--global-batch", file=sys.stderr)
    elif not fits:
        print("partlab: error: no layout fits: more GPUs, a smaller batch, or a GPU with more "
              "memory", file=sys.stderr)
    if args.json:
        write_json({"model": dataclasses.asdict(s), "machine": dataclasses.asdict(machine),
                    "gpus": args.gpus, "global_batch": args.global_batch, "seconds": seconds,
                    "searched": searched, "fit": fits, "rejected": dict(rejected)}, args.json)
    return 0 if fits else 1
