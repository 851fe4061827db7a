"""This machine's NVIDIA GPUs and driver, read without torch, and the driver each CUDA needs.

When torch sees no GPU it cannot say why; a CPU build of torch, or one whose CUDA is newer than
the driver, is the usual answer on a machine that has GPUs, and the facts that tell these apart
come from the driver itself. `partlab env` and `--device auto` both ask here.
"""
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

PROC = Path("/proc/driver/nvidia")
# /proc/driver/nvidia lists the host's GPUs even inside a container that was given none (a
# `docker build` on a GPU host); the control device is there only where the driver is usable.
CONTROL = Path("/dev/nvidiactl")
# The oldest Linux driver each CUDA major runs on, by CUDA's minor-version compatibility (the
# CUDA Toolkit release notes' table): CUDA 12.x from 525.60.13, the driver CUDA 12.0 came with
# (torch's cu126 build), 13.x from 580 (its cu130 build). scripts/torch_variant.sh, which runs
# before partlab is installed, holds the same two figures.
MIN_DRIVER = {12: "525.60.13", 13: "580"}
FIX_CPU_BUILD = ("install a CUDA build of torch: rm -rf .venv && scripts/lab.sh (it picks one "
                 "from nvidia-smi)")
FIX_CU126 = ("or use torch's CUDA 12.6 build: rm -rf .venv && PARTLAB_TORCH_VARIANT=cu126 "
             "scripts/lab.sh (in a container: the CUDA 12.6 image, docs/containers.md)")
# Dense peak TFLOP/s (fp32 on CUDA cores: torch does not use TF32 unless told; bf16 on tensor
# cores, no sparsity) from NVIDIA's datasheets, by whole words of torch.cuda.get_device_name();
# the first match wins, so the PCIe and NVL parts come before the SXM ones they share a name
# with ("L4" is not "L40", "A10" not "A10G" or "A1000": those are not listed).
DATASHEET_TFLOPS = (("H100 PCIe", 51, 756), ("H100 NVL", 60, 835), ("H200 NVL", 60, 835),
                    ("H100", 67, 989), ("H200", 67, 989), ("GH200", 67, 989),
                    ("A100", 19.5, 312), ("V100-PCIE", 14, None), ("V100", 15.7, None),
                    ("L40S", 91.6, 362), ("L4", 30.3, 121), ("A10", 31.2, 125))


def datasheet_tflops(device_name, dtype):
    """The datasheet's peak for `dtype` ("fp32"/"bf16") on the GPU called device_name, None when
    the GPU is not listed (or, V100, has no bf16)."""
    for part, fp32, bf16 in DATASHEET_TFLOPS:
        if re.search(rf"\b{re.escape(part)}\b", device_name):
            return fp32 if dtype == "fp32" else bf16
    return None


def version(text):
    """'525.60.13' -> (525, 60, 13), for comparing driver versions."""
    return tuple(int(part) for part in text.split("."))


def min_driver(cuda):
    """The oldest driver that runs CUDA `cuda` ('12.6'), or None for a major not listed here."""
    return MIN_DRIVER.get(int(cuda.split(".")[0])) if cuda else None


def _nvidia_smi(field):
    """One line per GPU of `nvidia-smi --query-gpu=field`, [] without a usable nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return proc.stdout.split() if proc.returncode == 0 else []


def count():
    """How many NVIDIA GPUs the driver offers this process (0 where it offers none)."""
    if PROC.is_dir():
        return len(list((PROC / "gpus").glob("*"))) if CONTROL.exists() else 0
    return len(_nvidia_smi("driver_version"))  # no /proc/driver/nvidia: WSL, for one


def driver_version():
    """The driver's version ('550.54.15'), from /proc or nvidia-smi; None where neither says."""
    try:
        found = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", (PROC / "version").read_text())
        if found:
            return found[1]
    except OSError:
        pass
    return next(iter(_nvidia_smi("driver_version")), None)


@dataclasses.dataclass(frozen=True)
class Unseen:
    """Why torch sees none of this machine's GPUs; `fix` is None where the set-up is not at
    fault (a job or container that was given no GPU, CUDA_VISIBLE_DEVICES)."""

    gpus: int
    driver: str | None
    reason: str
    fix: str | None

    def __str__(self):
        return (f"this machine has {self.gpus} NVIDIA GPU(s), driver {self.driver}, "
                f"but {self.reason}")


def unseen(torch_version, torch_cuda):
    """Unseen for a torch that sees no GPU, or None when this machine has none either."""
    gpus = count()
    if not gpus:
        return None
    driver, need = driver_version(), min_driver(torch_cuda)
    if torch_cuda is None:
        return Unseen(gpus, driver, f"torch {torch_version} is a CPU build", FIX_CPU_BUILD)
    torch_is = f"torch {torch_version} (CUDA {torch_cuda})"
    if driver and need and version(driver) < version(need):
        fix = f"update the driver to >= {need}"
        if int(torch_cuda.split(".")[0]) > 12 and version(driver) >= version(MIN_DRIVER[12]):
            fix += f", {FIX_CU126}"
        return Unseen(gpus, driver, f"{torch_is} needs driver >= {need}", fix)
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={hidden!r}" if hidden is not None else \
        "a job or container given no GPU? Slurm --gpus, docker --gpus all, apptainer --nv"
    return Unseen(gpus, driver, f"{torch_is} cannot use them ({where})", None)
