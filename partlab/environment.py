"""`partlab env`: the handout's "verify the GPUs" step, plus everything else the lab needs.

Prints what is there and exits 1 with a fix for each thing that is missing.
"""
import importlib
import platform

import torch
import torch.distributed as dist

import partlab
from partlab import lab, nvidia

FIX_TORCH = f"pip install '{partlab.TORCH_REQUIREMENT}' (or run scripts/lab.sh)"
FIX_EXTENSION = "pip install --no-build-isolation -e . (or run scripts/lab.sh)"


def gpu_lines(problems):
    """What torch sees; where it sees no GPU but the machine has some, why (a problem when the
    set-up is to blame: a CPU build of torch, a driver older than its CUDA needs)."""
    if not torch.cuda.is_available():
        lines = ["GPUs: none visible to torch (the lab runs on CPU processes with gloo)"]
        missing = nvidia.unseen(torch.__version__, torch.version.cuda)
        if missing and missing.fix:
            problems.append(f"{missing}: {missing.fix}")
        elif missing:
            lines.append(f"  {missing}")
        return lines
    lines = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        lines.append(f"GPU {i}: {prop.name}, {prop.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {prop.major}.{prop.minor}")
    return lines


def import_check(module):
    try:
        importlib.import_module(module)
        return None
    except ImportError as e:
        return str(e)


def main():
    problems = []
    print(f"partlab {partlab.__version__}, Python {platform.python_version()}, "
          f"host {platform.node()}")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda}, NCCL: {nccl}, "
          f"gloo: {dist.is_gloo_available()}, nccl backend: {dist.is_nccl_available()})")
    for line in gpu_lines(problems):
        print(line)
    for module in ("torch.distributed.tensor.parallel", "torch.distributed.pipelining"):
        error = import_check(module)
        print(f"import {module}: {'ok' if error is None else 'FAILED: ' + error}")
        if error:
            problems.append(f"{module} does not import: {FIX_TORCH}")
    if not dist.is_gloo_available():
        problems.append(f"this torch has no gloo backend (needed on CPU): {FIX_TORCH}")

    from partlab import ops
    info = ops.extension_info()
    if info["built"]:
        print(f"extension partlab._C: built, CUDA kernels: {'yes' if info['cuda'] else 'no'}")
        if torch.cuda.is_available() and not info["cuda"]:
            problems.append("the extension was built without CUDA on a CUDA machine: "
                            "PARTLAB_BUILD=cuda " + FIX_EXTENSION)
    else:
        print(f"extension partlab._C: NOT BUILT ({info['error']})")
        problems.append(f"the fused op is not built: {FIX_EXTENSION}")

    nproc, runs_on = lab.choose_processes(None, "auto")
    print(f"partlab lab would run each strategy on {runs_on}")
    for problem in problems:
        print(f"partlab: error: {problem}")
    return 1 if problems else 0
