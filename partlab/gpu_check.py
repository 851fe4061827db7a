"""The GPU node check, after scripts/gpu_check.sh has built the extension: one record of what works.

Steps, each ok / FAILED / skipped (with the reason) in the record:
  extension   partlab._C loads; with a CUDA torch both ops have CUDA kernels registered
  op tests    pytest tests/test_ops.py: the CPU tests always, the `cuda` ones on a GPU
  bench op    partlab bench op in bf16 at the lab shape, 8192x4096->4096 and 16384x64->1024
  gemm        a bf16 8192^3 matmul's TFLOP/s next to the device's peak
  drivers     every strategy of partlab/strategies.py on CUDA with --check: `partlab lab` on
              NCCL with >= 2 GPUs, else each as a world of one process
  timeline    a 1F1B pipeline with --timeline on CUDA (2 GPUs, else 1): its bubble timed by
              CUDA events, and the Gantt chart and trace beside the record
  all_reduce  bus bandwidth of a 256 MiB all_reduce, with >= 2 GPUs
Writes DIR/gpu-check-<date>-<device>.json and .md. Without a GPU the GPU steps are skipped and
the exit status says only whether the build and the CPU side passed.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from partlab import bench_op, nvidia, ops, strategies

BENCH_SHAPES = ["64x1024->1024", "8192x4096->4096", "16384x64->1024"]


def run(cmd, cwd, timeout=600, env=None):
    """Run cmd; (ok, seconds, the last lines of its output)."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, **(env or {})))
        ok, text = proc.returncode == 0, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        ok, text = False, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    return ok, round(time.perf_counter() - start, 1), "\n".join(text.splitlines()[-15:])


def check_extension():
    info = ops.extension_info()
    keys = {op: [k for k in ("CPU", "CUDA", "Autograd")
                 if torch._C._dispatch_has_kernel_for_dispatch_key(f"partlab::{op}", k)]
            for op in ("fused_linear", "fused_linear_backward")}
    ok = info["built"] and (torch.version.cuda is None
                            or all("CUDA" in k for k in keys.values()))
    return {"status": "ok" if ok else "FAILED", "info": info, "dispatch_keys": keys}


def op_tests(src):
    ok, secs, tail = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_ops.py"], src, timeout=900)
    summary = next((line for line in reversed(tail.splitlines()) if " in " in line), tail)
    return {"status": "ok" if ok else "FAILED", "seconds": secs, "summary": summary.strip("= "),
            **({} if ok else {"output": tail})}


def bench():
    ops.forward_paths(reset=True)
    path = Path(tempfile.mkdtemp()) / "bench-op.json"
    args = ["--device", "cuda", "--dtype", "bfloat16", "--variants", "fused", "eager",
            "addmm_act", "matmul", "--shapes", *BENCH_SHAPES, "--repeats", "5",
            "--min-run-time", "0.2", "--json", str(path)]
    code = bench_op.main(args)
    result = json.loads(path.read_text()) if code == 0 else {}
    rows = [{k: r[k] for k in ("shape", "mode", "variant", "median_s", "speedup_vs_eager")}
            for r in result.get("rows", [])]
    return {"status": "ok" if code == 0 else "FAILED", "rows": rows,
            "forward_paths": ops.forward_paths()}


def gemm_tflops():
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12
    name = torch.cuda.get_device_name()
    peak = nvidia.datasheet_tflops(name, "bf16")
    return {"status": "ok", "tflops": round(tflops, 1), "peak_tflops": peak,
            "share_of_peak": round(tflops / peak, 3) if peak else None}


def drivers(src, gpus, out_dir, device="cuda", keys=None):
    """Every registry strategy with --check: the lab on >= 2 GPUs, else each on a world of one
    (keys: only these, as the CPU test of this step does)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if gpus >= 2:
        cmd = [sys.executable, "-m", "partlab", "lab", "--out", str(out_dir), "--steps", "10"]
        ok, secs, tail = run(cmd, src)
        return {"status": "ok" if ok else "FAILED", "seconds": secs, "command": " ".join(cmd),
                "output": tail}
    runs = {}
    for entry in strategies.STRATEGIES:
        if entry.min_processes > 1 or (keys and entry.key not in keys):
            continue
        cmd = torchrun + ["--nproc_per_node", "1", *entry.command(), "--device", device,
                          "--check", "--steps", "10"]
        ok, secs, tail = run(cmd, src, timeout=300)
        step = re.search(r"step time ([\d.]+) ms", tail)
        runs[entry.key] = {
            "status": "ok" if ok else "FAILED", "seconds": secs,
            "step_ms": float(step.group(1)) if step else None, **({} if ok else {"output": tail})}
    failed = any(r["status"] != "ok" for r in runs.values())
    return {"status": "FAILED" if failed else "ok", "world": 1, "runs": runs}


def timeline(src, gpus, out_dir, device="cuda"):
    """A pipeline's timeline on the GPU: the bubble from CUDA events (record.bubble.clock)."""
    nproc, prefix = min(gpus, 2), out_dir / f"timeline-1f1b-{device}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "partlab.pipeline", "--schedule", "1f1b", "--microbatches", "8",
               "--device", device, "--steps", "6", "--check", "--timeline", str(prefix),
               "--json", f"{tmp}/record.json"]
        ok, secs, tail = run(cmd, src, timeout=300)
        if not ok:
            return {"status": "FAILED", "seconds": secs, "output": tail}
        bubble = json.loads(Path(f"{tmp}/record.json").read_text())["bubble"]
    expected = "cuda events" if device == "cuda" else "host"
    return {"status": "ok" if bubble["clock"] == expected else "FAILED", "seconds": secs,
            "processes": nproc, "clock": bubble["clock"], "measured": round(bubble["measured"], 3),
            "ideal": round(bubble["ideal"], 3), "theory": round(bubble["theory"], 3),
            "files": bubble["files"]}


def all_reduce_worker():
    """One rank of the all_reduce measurement (run under torchrun): 256 MiB of fp32, 20 calls."""
    import torch.distributed as dist
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    x = torch.ones(64 * 2**20, device="cuda")
    for _ in range(5):
        dist.all_reduce(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(20):
        dist.all_reduce(x)
    end.record()
    torch.cuda.synchronize()
    seconds, n = start.elapsed_time(end) / 20 / 1e3, dist.get_world_size()
    if dist.get_rank() == 0:  # bus bandwidth: what a ring moves per rank, 2(n-1)/n of the data
        print(f"busbw {x.numel() * 4 * 2 * (n - 1) / n / seconds / 1e9:.1f}")
    dist.destroy_process_group()
    return 0


def all_reduce_busbw(src, gpus):
    ok, secs, tail = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", str(gpus), "-m", "partlab.gpu_check",
                          "--all-reduce-worker"], src, timeout=300)
    found = re.search(r"busbw ([\d.]+)", tail)
    return {"status": "ok" if ok and found else "FAILED", "gpus": gpus,
            "busbw_GBps": float(found.group(1)) if found else None,
            **({} if ok else {"output": tail})}


def provenance(root):
    """Where and with what the check ran. The revision: git's, else $PARTLAB_REVISION (a copy of
    the tree without .git)."""
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True) if shutil.which("git") else None
    rev = (git.stdout.strip() if git else "") or os.environ.get("PARTLAB_REVISION")
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "gpus": torch.cuda.device_count(), "git_revision": rev,
            "driver": smi.stdout.strip().splitlines()[0] if smi and smi.stdout.strip() else None}


def markdown(record):
    p = record["provenance"]
    lines = [f"# GPU check: {p['device'] or 'no GPU'} ({p['date']})", "",
             f"torch {p['torch']}, CUDA {p['cuda']}, driver {p['driver']}, {p['gpus']} GPU(s), "
             f"Python {p['python']}, git {p['git_revision']}, host {p['host']}", "",
             "| step | status | detail |", "|---|---|---|"]
    for name, step in record["steps"].items():
        detail = {k: v for k, v in step.items() if k not in ("status", "rows", "output", "runs")}
        lines.append(f"| {name} | {step['status']} | {json.dumps(detail)} |")
    for name, r in record["steps"].get("drivers", {}).get("runs", {}).items():
        lines.append(f"| driver {name} | {r['status']} | step {r['step_ms']} ms |")
    rows = record["steps"].get("bench op", {}).get("rows", [])
    if rows:
        lines += ["", "| shape | mode | variant | median ms | eager / this |",
                  "|---|---|---|---:|---:|"]
        lines += [f"| {r['shape']} | {r['mode']} | {r['variant']} | {r['median_s'] * 1e3:.3f} | "
                  f"{r['speedup_vs_eager']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="directory for the record (default: docs/gpu with a GPU, "
                                 "results/gpu-check without)")
    p.add_argument("--root", default=".", help="the repository (for the git revision)")
    p.add_argument("--build", default="{}", help="the build step's record, as JSON")
    p.add_argument("--all-reduce-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.all_reduce_worker:
        return all_reduce_worker()
    root, src = Path(args.root).resolve(), Path.cwd()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out_dir = Path(args.out or root / ("docs/gpu" if gpus else "results/gpu-check")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    no_gpu = {"status": "skipped", "reason": "no GPU visible to torch"}
    steps = {"build": json.loads(args.build), "extension": check_extension(),
             "op tests": op_tests(src)}
    print(f"gpu_check: extension {steps['extension']['status']}, op tests "
          f"{steps['op tests']['status']} ({steps['op tests']['summary']})", flush=True)
    steps["bench op"] = bench() if gpus else no_gpu
    steps["gemm"] = gemm_tflops() if gpus else no_gpu
    steps["drivers"] = drivers(src, gpus, out_dir) if gpus else no_gpu
    steps["timeline"] = timeline(src, gpus, out_dir) if gpus else no_gpu
    steps["all_reduce"] = (all_reduce_busbw(src, gpus) if gpus >= 2 else
                           {"status": "skipped", "reason": f"{gpus} GPU(s): needs 2"})
    record = {"provenance": provenance(root), "steps": steps}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", record["provenance"]["device"] or "no-gpu").strip("-")
    stem = out_dir / f"gpu-check-{record['provenance']['date'][:10]}-{slug}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    for name, step in steps.items():
        if step["status"] == "FAILED" and step.get("output"):
            print(f"gpu_check: {name} FAILED; the end of its output:\n{step['output']}")
    skipped = [name for name, s in steps.items() if s["status"] == "skipped"]
    if skipped:
        print(f"gpu_check: skipped (no GPU here): {', '.join(skipped)}")
    print(f"gpu_check: wrote {stem}.json and .md")
    return 1 if any(s["status"] == "FAILED" for s in steps.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
