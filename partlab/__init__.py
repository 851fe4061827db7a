"""partlab: tensor and pipeline parallelism in PyTorch, checked against a one-device reference."""
__version__ = "0.1.0"

# The oldest torch the suite has passed on: CI runs 2.13.0 (every test) and 2.14.1 (the CUDA
# build and the op tests); 2.11.0, the torch of the GPU machines partlab is checked on, passed the
# CPU suite and the real CUDA build by hand. (Pipelining with scale_grads, the public DTensor API
# and gloo point-to-point came in 2.6, but nothing older than 2.11 has been run.)
MIN_TORCH = (2, 11)
# The torch that scripts/_setup.sh installs for local runs (the one version pinned for them).
PINNED_TORCH = "2.13.0"
# The CUDA build of torch that scripts/cuda_build_check.sh builds the real CUDAExtension against
# on machines without a GPU (CI): the newest torch the registry serves, 2.14.1+cu130 (CUDA 13.0,
# the major of the nvcc there), whose headers need C++20. (2.13.0 from the registry is CPU-only.)
PINNED_CUDA_TORCH = "2.14.1"


def _check_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(
            f"partlab: error: torch is not installed; run scripts/lab.sh "
            f"(or `pip install torch=={PINNED_TORCH}`)"
        ) from None
    found = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if found < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise SystemExit(
            f"partlab: error: torch {torch.__version__} is too old; partlab needs torch>={need} "
            f"(pipelining, DTensor): `pip install torch=={PINNED_TORCH}`"
        )


_check_torch()


def missing_torch_feature(module, error):
    """The one-line message a driver exits with when a torch.distributed module won't import."""
    need = ".".join(map(str, MIN_TORCH))
    return (f"partlab: error: cannot import {module} ({error}): this torch lacks it; partlab "
            f"needs torch>={need} with distributed support: pip install torch=={PINNED_TORCH}")
