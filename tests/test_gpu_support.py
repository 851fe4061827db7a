"""Every GPU generation: the torch build the set-up picks from nvidia-smi, the driver each CUDA
needs, what `partlab env` and `--device auto` say when torch sees none of the machine's GPUs, and
what setup.py compiles for (or why not) on a CUDA torch.

scripts/torch_variant.sh runs against stub nvidia-smi scripts on a PATH holding nothing else (a
GPU machine's own nvidia-smi must not answer); the GPUs and driver partlab reads from /proc and
/dev are a fake tree, torch's CUDA build and GPUs are monkeypatched, and setup.py runs (`--name`,
building nothing) under a sitecustomize that fakes a CUDA torch and a toolkit: every case runs
without a GPU. The setup.py cases import torch in a subprocess (~3 s each): not `fast`.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from launch import ROOT

from partlab import environment, nvidia
from partlab.config import Settings
from partlab.distributed import Launch, choose_device

SCRIPT = ROOT / "scripts" / "torch_variant.sh"
BASH = shutil.which("bash")
OLD_SMI = """case "$*" in *compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'
exit 2;; esac
echo 470.82.01"""


def torch_variant(tmp_path, gpus=None, smi=None, **env):
    """torch_variant.sh with a stub nvidia-smi that prints the CSV lines `gpus` (or runs the sh
    code `smi`; neither: no nvidia-smi): (exit status, stdout, stderr)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True)
    if gpus is not None:   # printf, a builtin: the stub's PATH has no cat either
        smi = r"printf '%s\n' " + " ".join(f"'{line}'" for line in gpus.splitlines())
    if smi is not None:
        stub = bindir / "nvidia-smi"
        stub.write_text(f"#!/bin/sh\n{smi}\n")
        stub.chmod(0o755)
    proc = subprocess.run([BASH, str(SCRIPT)], capture_output=True, text=True,
                          env={"PATH": str(bindir), **env})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.fast
@pytest.mark.parametrize("gpus,chosen,why", [
    ("580.65.06, 9.0", "cu130", "every GPU >= 7.5 (lowest 9.0)"),
    ("580, 7.5", "cu130", "driver 580 "),
    ("550.54.15, 7.0", "cu126", "compute capability 7.0"),
    ("535.104.05, 9.0", "cu126", "driver 535.104.05 is older than the 580"),
    ("525.60.13, 8.0", "cu126", "driver 525.60.13"),
    ("525.105.17, 8.6", "cu126", "driver 525.105.17"),    # 105 > 60: numbers, not strings
    ("580.65.06, 9.0\n580.65.06, 7.0\n580.65.06, 8.0", "cu126", "compute capability 7.0"),
    ("580.65.06, 12.0\n580.65.06, 7.5", "cu130", "lowest 7.5"),
])
def test_the_driver_and_the_lowest_compute_capability_pick_the_build(tmp_path, gpus, chosen, why):
    status, out, err = torch_variant(tmp_path, gpus)
    assert status == 0 and out == f"{chosen} https://download.pytorch.org/whl/{chosen}\n", err
    assert err.count("\n") == 1 and err.startswith(f"partlab: torch build {chosen}: ")
    assert why in err


@pytest.mark.fast
@pytest.mark.parametrize("gpus,smi,message", [
    ("470.82.01, 8.0", None, "NVIDIA driver 470.82.01 is older than 525.60.13"),
    (None, OLD_SMI, "NVIDIA driver 470.82.01 is older than 525.60.13"),  # no compute_cap field
    ("525.53, 8.0", None, "NVIDIA driver 525.53 is older than 525.60.13"),
    ("570.86.10, 10.0", None, "compute capability 10.0 needs torch's cu130 build"),
])
def test_a_driver_no_build_runs_on_is_one_line_naming_the_fix(tmp_path, gpus, smi, message):
    status, out, err = torch_variant(tmp_path, gpus, smi)
    assert status == 1 and out == "", out
    assert err.count("\n") == 1 and err.startswith("partlab: error: ") and message in err
    assert "update the driver" in err


@pytest.mark.fast
@pytest.mark.parametrize("smi,why", [
    (None, "no nvidia-smi"),
    ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'\n"
     "echo 'Make sure that the latest NVIDIA driver is installed and running.'\nexit 9",
     "nvidia-smi: NVIDIA-SMI has failed because"),
])
def test_without_a_gpu_torch_comes_from_the_default_index(tmp_path, smi, why):
    # What CI's set-up installs: `pip install torch` from pip's own index, so no INDEX is printed.
    status, out, err = torch_variant(tmp_path, smi=smi)
    assert status == 0 and out == "cpu\n"
    assert err.count("\n") == 1 and why in err and "default index" in err


@pytest.mark.fast
def test_the_variant_and_its_index_can_be_chosen(tmp_path):
    status, out, err = torch_variant(tmp_path, "580.65.06, 9.0", PARTLAB_TORCH_VARIANT="cu126",
                                     PARTLAB_TORCH_INDEX_URL="https://mirror.example/whl/cu126")
    assert status == 0 and out == "cu126 https://mirror.example/whl/cu126\n"
    assert "PARTLAB_TORCH_VARIANT=cu126" in err
    status, out, err = torch_variant(tmp_path / "x", PARTLAB_TORCH_VARIANT="gpu")
    assert status == 1 and "PARTLAB_TORCH_VARIANT=gpu is no torch build" in err


@pytest.mark.fast
def test_min_driver_compares_versions_as_numbers():
    assert nvidia.min_driver("12.6") == nvidia.min_driver("12.8") == "525.60.13"
    assert nvidia.min_driver("13.0") == "580" and nvidia.min_driver(None) is None
    assert nvidia.min_driver("14.0") is None
    assert nvidia.version("525.105.17") > nvidia.version("525.60.13")   # as strings: smaller
    assert nvidia.version("580") <= nvidia.version("580.65.06")
    assert nvidia.version("525.53") < nvidia.version("525.60.13")


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """machine(gpus, driver, control=True): a fake /proc/driver/nvidia and /dev/nvidiactl, no
    nvidia-smi on PATH, no CUDA_VISIBLE_DEVICES, and a torch that sees no GPU."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def make(gpus=2, driver="550.54.15", control=True):
        proc = tmp_path / "proc"
        for i in range(gpus):
            (proc / "gpus" / f"0000:{i + 1:02x}:00.0").mkdir(parents=True)
        proc.mkdir(exist_ok=True)
        (proc / "version").write_text(
            f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {driver}  Release Build  "
            "(dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\nGCC version:  gcc 12\n")
        if control:
            (tmp_path / "nvidiactl").touch()
        monkeypatch.setattr(nvidia, "PROC", proc)
        monkeypatch.setattr(nvidia, "CONTROL", tmp_path / "nvidiactl")
    return make


def torch_build(monkeypatch, cuda, version):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch, "__version__", version)


@pytest.mark.fast
def test_gpus_and_driver_are_read_without_torch(machine):
    machine(gpus=3, driver="535.104.05")
    assert nvidia.count() == 3 and nvidia.driver_version() == "535.104.05"


@pytest.mark.fast
def test_gpus_a_container_was_not_given_are_not_counted(machine):
    machine(gpus=2, control=False)   # /proc shows the host's GPUs; no /dev/nvidiactl here
    assert nvidia.count() == 0


def env_errors(capsys):
    status = environment.main()
    out = capsys.readouterr().out
    return status, out, [line for line in out.splitlines() if line.startswith("partlab: error:")]


@pytest.mark.fast
def test_env_names_a_cpu_torch_on_a_gpu_machine(machine, monkeypatch, capsys):
    machine(gpus=2, driver="550.54.15")
    torch_build(monkeypatch, None, "2.13.0+cpu")
    status, out, errors = env_errors(capsys)
    mine = [e for e in errors if "NVIDIA GPU" in e]
    assert status == 1 and len(mine) == 1, out
    assert "2 NVIDIA GPU(s), driver 550.54.15, but torch 2.13.0+cpu is a CPU build" in mine[0]
    assert "rm -rf .venv && scripts/lab.sh" in mine[0]


@pytest.mark.fast
@pytest.mark.parametrize("cuda,driver,need,cu126", [
    ("13.0", "550.54.15", "580", True),       # V100-era driver: the cu126 build runs on it
    ("12.6", "470.82.01", "525.60.13", False),  # older than any CUDA 12: only a new driver helps
    ("13.0", "470.82.01", "580", False),
])
def test_env_names_the_driver_torch_needs_and_the_fix(machine, monkeypatch, capsys, cuda,
                                                      driver, need, cu126):
    machine(gpus=4, driver=driver)
    torch_build(monkeypatch, cuda, f"2.13.0+cu{cuda.replace('.', '')}")
    status, out, errors = env_errors(capsys)
    mine = [e for e in errors if "NVIDIA GPU" in e]
    assert status == 1 and len(mine) == 1, out
    assert f"driver {driver}, but torch 2.13.0+cu" in mine[0]
    assert f"needs driver >= {need}: update the driver to >= {need}" in mine[0]
    assert ("PARTLAB_TORCH_VARIANT=cu126 scripts/lab.sh" in mine[0]) == cu126


@pytest.mark.fast
def test_env_notes_gpus_hidden_from_a_working_set_up(machine, monkeypatch, capsys):
    machine(gpus=2, driver="580.65.06")
    torch_build(monkeypatch, "13.0", "2.13.0+cu130")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    status, out, errors = env_errors(capsys)
    assert not [e for e in errors if "NVIDIA GPU" in e], out   # not the set-up's fault
    assert "cannot use them (CUDA_VISIBLE_DEVICES='')" in out


@pytest.mark.fast
def test_device_auto_says_once_per_node_why_it_runs_on_cpu(machine, monkeypatch, capsys):
    machine(gpus=2, driver="535.104.05")
    torch_build(monkeypatch, "13.0", "2.13.0+cu130")
    for local_rank in (0, 1):
        assert choose_device(Settings(device="auto"), Launch(local_rank, 2, local_rank, 2)) \
            == (torch.device("cpu"), "gloo")
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["partlab: this machine has 2 NVIDIA GPU(s), driver 535.104.05, but torch "
                     "2.13.0+cu130 (CUDA 13.0) needs driver >= 580: running on CPU with gloo "
                     "(--device cuda makes this an error)"]
    choose_device(Settings(device="cpu"), Launch(0, 2, 0, 2))
    assert capsys.readouterr().err == ""


@pytest.mark.fast
def test_device_auto_is_quiet_on_a_machine_without_gpus(machine, capsys):
    machine(gpus=0)
    choose_device(Settings(device="auto"), Launch(0, 2, 0, 2))
    assert capsys.readouterr().err == ""


SITECUSTOMIZE = '''
import os, sys, setuptools, torch, torch.utils.cpp_extension as cpp_extension
torch.version.cuda = os.environ["FAKE_TORCH_CUDA"]
torch.cuda.get_arch_list = lambda: os.environ["FAKE_ARCHS"].split()
cpp_extension.CUDA_HOME = None if os.environ.get("FAKE_NO_NVCC") else os.environ["CUDA_HOME"]
def setup(ext_modules, **kwargs):
    cuda = any(source.endswith(".cu") for e in ext_modules for source in e.sources)
    print(f"cuda kernels: {cuda}, archs: {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
setuptools.setup = setup
'''


def setup_py(tmp_path, cuda, archs, nvcc=None, **env):
    """setup.py's choices (no build) for a torch of CUDA `cuda` shipping `archs`, with a fake
    toolkit whose nvcc is CUDA `nvcc` and targets compute_50..compute_90 (None: no toolkit;
    "runtime only": a CUDA_HOME without bin/nvcc):
    (exit status, stdout, stderr)."""
    (tmp_path / "site").mkdir(parents=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    home = tmp_path / "cuda"
    for sub in ("bin", "include", "lib64"):
        (home / sub).mkdir(parents=True)
    (home / "include" / "cublasLt.h").touch()
    (home / "lib64" / "libcublasLt.so").touch()
    targets = " ".join(f"compute_{cc}" for cc in (50, 60, 70, 75, 80, 86, 90))
    (home / "bin" / "nvcc").write_text(
        f'#!/bin/sh\ncase "$1" in\n--version) echo "Cuda compilation tools, release {nvcc}";;\n'
        f'--list-gpu-arch) printf "%s\\n" {targets};;\nesac\n')
    (home / "bin" / "nvcc").chmod(0o755)
    variables = {k: v for k, v in os.environ.items()
                 if k not in ("TORCH_CUDA_ARCH_LIST", "PARTLAB_BUILD", "CUDA_PATH")}
    variables.update(PYTHONPATH=str(tmp_path / "site"), CUDA_HOME=str(home),
                     FAKE_TORCH_CUDA=cuda, FAKE_ARCHS=archs, **env)
    if nvcc is None:
        variables["FAKE_NO_NVCC"] = "1"
    elif nvcc == "runtime only":       # CUDA_HOME is a CUDA without its compiler
        (home / "bin" / "nvcc").unlink()
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=variables,
                          capture_output=True, text=True)
    return proc.returncode, proc.stdout, "\n".join(
        line for line in proc.stderr.splitlines() if line.startswith("partlab"))


CU126 = "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90"
CU130 = "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120"


@pytest.mark.parametrize("cuda,archs,nvcc,expected", [
    ("12.6", CU126, "12.6", "5.0;6.0;7.0;8.0;9.0+PTX"),   # V100's 7.0 among them
    ("12.8", CU130, "12.6", "7.5;8.0;9.0+PTX"),   # what this nvcc cannot target is left out
])
def test_setup_compiles_one_arch_per_gpu_family_of_the_torch_build(tmp_path, cuda, archs, nvcc,
                                                                   expected):
    status, out, err = setup_py(tmp_path, cuda, archs, nvcc)
    assert status == 0 and f"cuda kernels: True, archs: {expected}" in out, (out, err)
    status, out, err = setup_py(tmp_path / "x", cuda, archs, nvcc, TORCH_CUDA_ARCH_LIST="8.0")
    assert "archs: 8.0\n" in out, "a TORCH_CUDA_ARCH_LIST the user set wins"


@pytest.mark.parametrize("nvcc,message", [
    (None, f"torch {torch.__version__} has CUDA 13.0 but no nvcc"),
    ("runtime only", f"torch {torch.__version__} has CUDA 13.0 but no nvcc was found in "),
    ("12.6", "nvcc in "),
])
def test_setup_without_a_matching_nvcc_builds_cpu_kernels_saying_why(tmp_path, nvcc, message):
    status, out, err = setup_py(tmp_path, "13.0", CU130, nvcc)
    assert status == 0 and "cuda kernels: False" in out, (out, err)
    assert err.count("\n") == 0 and err.startswith(f"partlab: {message}"), err
    assert "building partlab._C with CPU kernels only" in err and "CUDA 13.x toolkit" in err
    status, out, err = setup_py(tmp_path / "x", "13.0", CU130, nvcc, PARTLAB_BUILD="cuda")
    assert status == 1 and err.startswith("partlab: error: "), err   # asked for CUDA: an error


@pytest.mark.parametrize("name,fp32,bf16", [
    ("NVIDIA H100 80GB HBM3", 67, 989),      # SXM
    ("NVIDIA H100 PCIe", 51, 756),           # not the SXM figure its name contains
    ("NVIDIA H200", 67, 989),
    ("NVIDIA A100-SXM4-80GB", 19.5, 312),
    ("Tesla V100-SXM2-32GB", 15.7, None),    # no bf16
    ("NVIDIA L40S", 91.6, 362),
    ("NVIDIA GeForce RTX 4090", None, None), # not listed: MFU is against the measured matmul
    ("NVIDIA L40", None, None),              # not the L4 its name begins with
    ("NVIDIA A10G", None, None), ("NVIDIA RTX A1000", None, None),
    ("Tesla V100S-PCIE-32GB", None, None),
])
def test_datasheet_peaks_by_device_name(name, fp32, bf16):
    assert (nvidia.datasheet_tflops(name, "fp32"), nvidia.datasheet_tflops(name, "bf16")) \
        == (fp32, bf16)
