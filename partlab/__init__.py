"""partlab: tensor and pipeline parallelism in PyTorch, checked against a one-device reference."""
import pathlib

__version__ = "0.1.0"

# The oldest torch the suite has passed on: CI runs the pinned torch (every test) and the CUDA
# build of constraints.txt (the CUDA build and the op tests); 2.11.0, the torch of the GPU machines
# partlab is checked on, passed the CPU suite and the real CUDA build by hand. (Pipelining with
# scale_grads, the public DTensor API and gloo point-to-point came in 2.6, but nothing older than
# 2.11 has been run.)
MIN_TORCH = (2, 11)


def _pinned_torch():
    """torch's version in the repository's constraints.txt; None where partlab was installed
    without its repository (the image's wheel)."""
    pins = pathlib.Path(__file__).resolve().parent.parent / "constraints.txt"
    try:
        return next(line.split("==")[1].strip() for line in pins.read_text().splitlines()
                    if line.startswith("torch=="))
    except (OSError, StopIteration):
        return None


PINNED_TORCH = _pinned_torch()
# What to install: the pin, else any torch partlab supports.
TORCH_REQUIREMENT = f"torch=={PINNED_TORCH}" if PINNED_TORCH else \
    f"torch>={'.'.join(map(str, MIN_TORCH))}"


def _check_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(
            f"partlab: error: torch is not installed; run scripts/lab.sh "
            f"(or `pip install '{TORCH_REQUIREMENT}'`)"
        ) from None
    found = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise SystemExit(
            f"partlab: error: torch {torch.__version__} is too old; partlab needs torch>={need} "
            f"(pipelining, DTensor): `pip install '{TORCH_REQUIREMENT}'`"
        )


_check_torch()


def missing_torch_feature(module, error):
    """The one-line message a driver exits with when a torch.distributed module won't import."""
    need = ".".join(map(str, MIN_TORCH))
    return (f"partlab: error: cannot import {module} ({error}): this torch lacks it; partlab "
            f"needs torch>={need} with distributed support: pip install '{TORCH_REQUIREMENT}'")
