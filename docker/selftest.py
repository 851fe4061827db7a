"""Image self-test: the compiled extension loads; the fused op matches its PyTorch reference.

Runs at the end of `docker build` (no GPU there), in the Apptainer %test, and by hand:
    python /opt/partlab/selftest.py
CPU is always checked; with a CUDA build of torch both ops must have CUDA kernels registered
(an image built without them fails here, GPU or not), and with a GPU the CUDA kernels must pass
too: an image whose CUDA kernels are missing or broken fails here, not in the middle of a lab run.
"""
import ctypes
import sys

import torch


def check(ops, device):
    gen = torch.Generator().manual_seed(0)
    # Shapes that are not multiples of a tile or a vector width, plus a bias-free case.
    for (m, k, n), activation, with_bias in [((7, 33, 65), "relu", True),
                                             ((64, 128, 96), "gelu", True),
                                             ((5, 16, 8), "gelu", False)]:
        x = torch.randn(m, k, generator=gen).to(device)
        w = torch.randn(n, k, generator=gen).to(device) / k ** 0.5
        b = torch.randn(n, generator=gen).to(device) if with_bias else None
        got = ops.fused_linear(x, w, b, activation)
        want = ops.reference_fused_linear(x, w, b, activation)
        # fp32: the fused kernel and the reference sum the same products in a different order.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        print(f"selftest: fused_linear {activation:<4} {m}x{k} @ {n}x{k}^T "
              f"bias={with_bias} on {device}: ok")


def main():
    import partlab._C  # noqa: F401  (fails loudly when the extension was not built)

    # NCCL dlopens libibverbs for InfiniBand/RoCE; without it multi-node runs use TCP sockets.
    ctypes.CDLL("libibverbs.so.1")
    print("selftest: libibverbs.so.1 loads (NCCL can use InfiniBand)")

    try:
        from partlab import ops
    except ImportError as e:
        print(f"selftest: partlab._C imports; partlab.ops does not ({e}): op check skipped")
        return 1
    if torch.version.cuda is not None and not ops.extension_info()["cuda"]:
        print(f"selftest: torch {torch.__version__} has CUDA but partlab._C has no CUDA kernels "
              "(built with PARTLAB_BUILD=cpu?)")
        return 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        check(ops, device)
    print(f"selftest: ok (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
          f"devices checked: {', '.join(devices)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
