"""`partlab bench op`: the fused linear+bias+activation op against the unfused PyTorch paths.

Variants, all computing act(x @ W^T + b) on the same tensors:
  fused       partlab.ops.fused_linear (the extension)
  eager       F.linear + F.relu / F.gelu(approximate="tanh")  (what manual TP ran before)
  addmm_act   torch._addmm_activation (ATen's own fused forward; it has no autograd formula,
              so it has no fwd+bwd row)
  compile     torch.compile of the eager function (compile time excluded)
  matmul      the bare x @ W^T, a floor for what any variant can cost
Timed with torch.utils.benchmark (synchronises CUDA); each cell is the median of
--repeats blocked_autorange measurements. fwd+bwd = forward + torch.autograd.grad w.r.t. x, W, b.
CPU runs are single-threaded (torch.set_num_threads(1), or --threads) in float32; CUDA in bf16.
"""
import argparse
import datetime
import json
import platform
import statistics
import sys

import torch
import torch.utils.benchmark as benchmark

from partlab import ops

SHAPES = {  # name: (M = batch rows, K = in_features, N = out_features)
    "64x1024->1024": (64, 1024, 1024),         # the lab's per-rank shape (hidden 2048 / 2)
    "1024x4096->4096": (1024, 4096, 4096),
    "8192x4096->4096": (8192, 4096, 4096),
    "16384x64->1024": (16384, 64, 1024),      # memory-bound: tiny K, big activations
}
QUICK_SHAPES = ("64x1024->1024", "16384x64->1024")
VARIANTS = ("fused", "eager", "addmm_act", "compile", "matmul")


def _parser():
    p = argparse.ArgumentParser(prog="partlab bench op", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--activation", choices=("relu", "gelu"), default="relu")
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), metavar="SHAPE",
                   help=f"subset of {', '.join(SHAPES)} (default: all; --quick: the small two)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=5, help="measurements per cell (median)")
    p.add_argument("--min-run-time", type=float, default=0.5,
                   help="seconds per measurement (blocked_autorange)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small shapes, 1 repeat, short measurements, no compile")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return p


def _variant_fn(name, activation):
    if name == "fused":
        return lambda x, w, b: ops.fused_linear(x, w, b, activation)
    if name == "eager":
        return lambda x, w, b: ops.reference_fused_linear(x, w, b, activation)
    if name == "addmm_act":
        gelu = activation == "gelu"
        return lambda x, w, b: torch._addmm_activation(b, x, w.t(), use_gelu=gelu)
    if name == "compile":
        return torch.compile(lambda x, w, b: ops.reference_fused_linear(x, w, b, activation))
    return lambda x, w, b: x @ w.t()


def _make_stmt(variant, mode, activation, x, w, b, g):
    fn = _variant_fn(variant, activation)
    if mode == "fwd":
        def stmt():
            with torch.no_grad():
                return fn(x, w, b)
        return stmt
    wrt = (x, w) if variant == "matmul" else (x, w, b)

    def stmt_bwd():
        return torch.autograd.grad(fn(x, w, b), wrt, g)
    return stmt_bwd


def run(args):
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = args.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else tuple(SHAPES))
    variants = [v for v in args.variants if not (args.quick and v == "compile")]
    repeats, min_run = (1, 0.05) if args.quick else (args.repeats, args.min_run_time)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        M, K, N = SHAPES[shape]
        x = torch.randn(M, K, generator=gen).to(device, dtype).requires_grad_()
        w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(device, dtype).requires_grad_()
        b = torch.randn(N, generator=gen).to(device, dtype).requires_grad_()
        g = torch.randn(M, N, generator=gen).to(device, dtype)
        for mode in ("fwd", "fwd+bwd"):
            stmts = {}
            for variant in variants:
                if mode == "fwd+bwd" and variant == "addmm_act":
                    continue  # no derivative formula in ATen
                stmts[variant] = _make_stmt(variant, mode, args.activation, x, w, b, g)
                stmts[variant]()  # warm-up (compiles the torch.compile variant)
            # Interleave the variants round by round so drift on a shared machine hits all alike.
            samples = {v: [] for v in stmts}
            for _ in range(repeats):
                for variant, stmt in stmts.items():
                    timer = benchmark.Timer(stmt="f()", globals={"f": stmt})
                    samples[variant].append(timer.blocked_autorange(min_run_time=min_run).median)
            for variant, ts in samples.items():
                t = statistics.median(ts)
                rows.append({"shape": shape, "M": M, "K": K, "N": N, "variant": variant,
                             "mode": mode, "median_s": t, "samples_s": ts})
                print(f"  {shape:>16} {mode:>8} {variant:>10} {t * 1e3:10.3f} ms",
                      file=sys.stderr, flush=True)
    _add_ratios(rows)
    return {
        "device": device, "dtype": dtype_name, "activation": args.activation,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "repeats": repeats, "quick": args.quick, "rows": rows,
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _add_ratios(rows):
    """speedup_vs_X = time(X) / time(variant) for the same shape and mode (>1: variant faster)."""
    index = {(r["shape"], r["mode"], r["variant"]): r["median_s"] for r in rows}
    for r in rows:
        for ref in ("eager", "addmm_act"):
            t_ref = index.get((r["shape"], r["mode"], ref))
            r[f"speedup_vs_{ref}"] = None if t_ref is None else t_ref / r["median_s"]


def format_table(result):
    lines = [f"device={result['device']} ({result['device_name']}) dtype={result['dtype']} "
             f"activation={result['activation']} threads={result['threads']} "
             f"torch={result['torch']} repeats={result['repeats']}",
             "| shape | mode | variant | median ms | eager / this | addmm_act / this |",
             "|---|---|---|---:|---:|---:|"]
    def ratio(value):
        return "-" if value is None else f"{value:.3f}"

    for r in result["rows"]:
        lines.append(f"| {r['shape']} | {r['mode']} | {r['variant']} | "
                     f"{r['median_s'] * 1e3:.3f} | {ratio(r['speedup_vs_eager'])} | "
                     f"{ratio(r['speedup_vs_addmm_act'])} |")
    return "\n".join(lines)


def main(argv=None):
    args = _parser().parse_args(argv)
    info = ops.extension_info()
    if not info["built"]:
        print(f"partlab bench op: the extension is not built ({info['error']}); "
              f"{ops.BUILD_HINT}", file=sys.stderr)
        return 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("partlab bench op: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 1
    if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) \
            and not info["cuda"]:
        print("partlab bench op: this build of partlab._C has no CUDA kernels "
              "(rebuild on a CUDA machine with PARTLAB_BUILD=cuda)", file=sys.stderr)
        return 1
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
