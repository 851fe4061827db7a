"""partlab.ops.fused_linear against plain PyTorch, under autograd, opcheck and torch.compile.

Tolerances:
  float32  the op runs the same GEMM (addmm) and ATen's own activation kernels as the reference,
           so forward outputs agree to a few ulps; gradients differ only by summation order
           (blocked grad_weight accumulation, two-level bias sum): rtol/atol 1e-5 at K <= 1024.
  bfloat16 8 mantissa bits: one rounding of an O(1) value is up to 2^-8 = 0.0039 relative; the
           op and the reference may round the pre-activation and output at different points and
           sum in different orders, so allow 2 such roundings: rtol 1.6e-2, atol 1.6e-2
           (outputs are O(1) because weights are scaled by 1/sqrt(K)).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from partlab import ops
from partlab.ops import fused_linear, reference_fused_linear

ROOT = Path(__file__).resolve().parents[1]
ACTS = ("relu", "gelu", "none")
# No skip when the extension is missing: scripts/test.sh always builds it, so a missing or broken
# build must fail here, loudly, rather than pass as skips.
assert ops.extension_available(), f"partlab._C not built: {ops.extension_info()['error']}"
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make(m, k, n, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) / max(k, 1) ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    conv = lambda t: None if t is None else t.to(device, dtype).requires_grad_()  # noqa: E731
    return conv(x), conv(w), conv(b)


def check_against_reference(x, w, b, act, tol):
    y = fused_linear(x, w, b, act)
    r = reference_fused_linear(x.detach(), w.detach(), None if b is None else b.detach(), act)
    assert y.shape == r.shape and y.dtype == r.dtype
    torch.testing.assert_close(y, r, **tol)
    if y.numel() == 0 and x.numel() == 0:
        return
    leaves = [t for t in (x, w, b) if t is not None]
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, gy, allow_unused=True)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    bias_ref = ref_leaves[2] if b is not None else None
    r = reference_fused_linear(ref_leaves[0], ref_leaves[1], bias_ref, act)
    want = torch.autograd.grad(r, ref_leaves, gy, allow_unused=True)
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got, want):
        # Gradients are sums over M (weight, bias) or N (input) products, accumulated in a
        # different order than ATen's (blocked grad_weight, chunked bias sum): the rounding error
        # scales with the size of the entries, not of each one, so atol is scaled by the largest.
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [(1, 1, 1), (33, 17, 65), (64, 1024, 1024), (0, 8, 5), (300, 64, 40)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_reference_fp32(m, k, n, act):
    check_against_reference(*make(m, k, n), act, TOL[torch.float32])


@pytest.mark.parametrize("act", ACTS)
def test_no_bias_and_3d_input(act):
    x, w, _ = make(6 * 7, 24, 10, bias=False)
    x3 = x.detach().reshape(6, 7, 24).requires_grad_()
    y = fused_linear(x3, w, None, act)
    assert y.shape == (6, 7, 10)
    check_against_reference(x3, w, None, act, TOL[torch.float32])


@pytest.mark.parametrize("act", ACTS)
def test_blocked_path_many_rows(act):
    # K <= 256 and many rows: the CPU kernel processes cache-sized row blocks (see csrc).
    check_against_reference(*make(1000, 32, 700), act, TOL[torch.float32])


@pytest.mark.parametrize("act", ACTS)
def test_noncontiguous_inputs_and_unaligned_bias_shard(act):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2 * 48, generator=g)[:, ::2].requires_grad_()      # strided columns
    w = torch.randn(48, 36, generator=g).t().requires_grad_()              # transposed [36, 48]
    buf = torch.randn(3 + 36 + 5, generator=g)
    b = buf[3:3 + 36].requires_grad_()  # a TP shard at element offset 3: 12 bytes, not 16-aligned
    assert not x.is_contiguous() and not w.is_contiguous() and b.data_ptr() % 16 != 0
    check_against_reference(x, w, b, act, TOL[torch.float32])


@pytest.mark.parametrize("act", ACTS)
def test_matches_reference_bf16(act):
    check_against_reference(*make(64, 256, 128, dtype=torch.bfloat16), act, TOL[torch.bfloat16])


@pytest.mark.parametrize("act", ACTS)
def test_inference_matches_reference(act):
    # no_grad: GELU skips saving its pre-activation (save_pre=False), the result must not change
    x, w, b = (t.detach() for t in make(300, 64, 40, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(fused_linear(x, w, b, act),
                                   reference_fused_linear(x, w, b, act), **TOL[torch.float32])
    out, saved = torch.ops.partlab.fused_linear(x, w, b, act, False)
    assert saved.numel() == 0


def test_output_is_not_aliased_and_inputs_untouched():
    x, w, b = make(20, 16, 12)
    before = [t.detach().clone() for t in (x, w, b)]
    y = fused_linear(x, w, b, "relu")
    y.sum().backward()
    for t, t0 in zip((x, w, b), before):
        assert torch.equal(t.detach(), t0)
    assert y.data_ptr() not in (x.data_ptr(), w.data_ptr(), b.data_ptr())


@pytest.mark.parametrize("act", ACTS)
def test_gradcheck_float64(act):
    x, w, b = make(7, 5, 4, dtype=torch.float64, seed=3)
    # keep pre-activations away from ReLU's kink at 0, where the derivative is undefined
    with torch.no_grad():
        pre = F.linear(x, w, b)
        b += torch.where(pre.abs().min(0).values < 1e-3, 0.1, 0.0)
    assert torch.autograd.gradcheck(lambda *a: fused_linear(*a, activation=act), (x, w, b))


@pytest.mark.parametrize("act", ACTS)
def test_opcheck(act):
    x, w, b = make(9, 6, 5, seed=4)
    torch.library.opcheck(torch.ops.partlab.fused_linear.default, (x, w, b, act))
    torch.library.opcheck(torch.ops.partlab.fused_linear.default,
                          (x.detach(), w.detach(), None, act))
    torch.library.opcheck(torch.ops.partlab.fused_linear.default,
                          (x.detach(), w.detach(), b.detach(), act, False))  # inference form
    out, pre = torch.ops.partlab.fused_linear(x.detach(), w.detach(), b.detach(), act)
    saved = pre if act == "gelu" else out
    g = torch.randn_like(out)
    torch.library.opcheck(torch.ops.partlab.fused_linear_backward.default,
                          (g, x.detach(), w.detach(), saved, act, [True, True, True]))


def test_torch_compile_fullgraph():
    class ColumnLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 12)

        def forward(self, x):
            return fused_linear(x, self.lin.weight, self.lin.bias, "gelu").sum(-1)

    torch._dynamo.reset()
    mod = ColumnLayer()
    x = torch.randn(2, 3, 16, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    gx, gw = x.grad.clone(), mod.lin.weight.grad.clone()
    x.grad = None
    mod.zero_grad()
    mod(x).sum().backward()
    torch.testing.assert_close(y, mod(x), **TOL[torch.float32])
    torch.testing.assert_close(gx, x.grad, **TOL[torch.float32])
    torch.testing.assert_close(gw, mod.lin.weight.grad, **TOL[torch.float32])


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w, b: fused_linear(x, w, b, "swish"), ValueError, "unknown activation"),
    (lambda x, w, b: fused_linear(x, w[0], b), ValueError, "weight must be 2-D"),
    (lambda x, w, b: fused_linear(x[:, :3], w, b), ValueError, "input features"),
    (lambda x, w, b: fused_linear(x, w, b[:2]), RuntimeError, "bias must be 1-D of size"),
    (lambda x, w, b: fused_linear(x, w, b.reshape(1, -1)), RuntimeError, "bias must be 1-D"),
    (lambda x, w, b: fused_linear(x.double(), w, b), RuntimeError, "dtype"),
    (lambda x, w, b: fused_linear(x, w, b.double()), RuntimeError, "dtype"),
    (lambda x, w, b: fused_linear(x.int(), w.int(), b.int()), RuntimeError, "floating dtype"),
    (lambda x, w, b: fused_linear(x, w, b.to("meta")), RuntimeError, "device|meta"),
    (lambda x, w, b: torch.ops.partlab.fused_linear(x.reshape(-1), w, b, "relu"),
     RuntimeError, "x must be 2-D"),
    (lambda x, w, b: torch.ops.partlab.fused_linear(x, w.t(), None, "relu"),
     RuntimeError, "in_features differ|contiguous"),
    (lambda x, w, b: torch.ops.partlab.fused_linear(x, w, b, "tanh"),
     ValueError, "unknown activation"),
])
def test_bad_inputs_raise_clearly(call, exc, match):
    x, w, b = (t.detach() for t in make(4, 6, 5))
    with pytest.raises(exc, match=match):
        call(x, w, b)


def test_extension_info_and_missing_extension_message():
    info = ops.extension_info()
    assert info == {"built": True, "cuda": info["cuda"], "error": None}
    # A Python without partlab._C: importing ops must work and the call must name the build.
    code = ("import sys; sys.modules['partlab._C'] = None\n"
            "import torch; from partlab import ops\n"
            "assert ops.extension_info()['built'] is False\n"
            "try:\n    ops.fused_linear(torch.ones(1, 1), torch.ones(1, 1))\n"
            "except RuntimeError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install --no-build-isolation -e ." in out.stdout


def test_bench_op_quick_smoke(tmp_path):
    from partlab import bench_op
    path = tmp_path / "bench.json"
    assert bench_op.main(["--quick", "--device", "cpu", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    got = {(r["shape"], r["mode"], r["variant"]) for r in result["rows"]}
    want = {(s, m, v) for s in bench_op.QUICK_SHAPES for m in ("fwd", "fwd+bwd")
            for v in ("fused", "eager", "addmm_act", "matmul")
            if not (m == "fwd+bwd" and v == "addmm_act")}
    assert got == want
    assert all(r["median_s"] > 0 for r in result["rows"])


NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                 else None)
# CI (CI=true) has nvcc and must compile-check the .cu files; a user's machine without a CUDA
# toolkit skips these two tests and says so.
needs_nvcc = pytest.mark.skipif(
    NVCC is None and not os.environ.get("CI"),
    reason="nvcc not found: csrc/*.cu were NOT compile-checked (CI fails instead)")


def _check_cuda(*files, archs="80"):
    # One architecture keeps the test quick; scripts/check_cuda.sh defaults to sm_80 + sm_90.
    env = dict(os.environ, CUDA_ARCHS=archs, PYTHON=sys.executable)
    return subprocess.run(["bash", str(ROOT / "scripts" / "check_cuda.sh"), *files],
                          capture_output=True, text=True, cwd=ROOT, timeout=900, env=env)


@needs_nvcc
def test_cuda_sources_compile_with_nvcc():
    out = _check_cuda()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert out.stdout.count("check_cuda: OK") == len(list((ROOT / "csrc").glob("*.cu")))


@needs_nvcc
def test_cuda_check_fails_on_a_broken_file(tmp_path):
    bad = tmp_path / "broken.cu"
    bad.write_text("__global__ void k(float* x) { x[0] = 1.0f }\n")  # missing ';'
    out = _check_cuda(str(bad))
    assert out.returncode != 0 and "FAIL" in out.stderr


# ---- CUDA: the same checks on a GPU (never run yet: no GPU machine was lent) ----

@cuda
@needs_gpu
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (33, 17, 65), (64, 1024, 1024), (0, 8, 5)])
def test_cuda_matches_reference(m, k, n, act, dtype):
    assert ops.extension_info()["cuda"], "partlab._C was built without CUDA kernels"
    # float32 on CUDA: TF32 may be on for matmuls in the reference and the op alike; compare with
    # TF32 off so both are true fp32 GEMMs.
    with _no_tf32():
        check_against_reference(*make(m, k, n, dtype, "cuda"), act, TOL[dtype])


@cuda
@needs_gpu
@pytest.mark.parametrize("act", ACTS)
def test_cuda_unaligned_bias_shard_and_noncontiguous(act):
    buf = torch.randn(3 + 64, device="cuda")
    b = buf[3:].requires_grad_()  # 12-byte offset: cuBLASLt's epilogue path must not be taken
    x = torch.randn(40, 2 * 32, device="cuda")[:, ::2].requires_grad_()
    w = (torch.randn(32, 64, device="cuda") / 8).t().requires_grad_()
    with _no_tf32():
        check_against_reference(x, w, b, act, TOL[torch.float32])


@cuda
@needs_gpu
def test_cuda_gradcheck_opcheck_compile():
    x, w, b = make(7, 5, 4, dtype=torch.float64, device="cuda", seed=3)
    assert torch.autograd.gradcheck(lambda *a: fused_linear(*a, activation="gelu"), (x, w, b))
    torch.library.opcheck(torch.ops.partlab.fused_linear.default,
                          tuple(t.detach().float() for t in (x, w, b)) + ("relu",))
    f = torch.compile(lambda x, w, b: fused_linear(x, w, b, "relu"), fullgraph=True)
    xf, wf, bf = (t.detach().float() for t in (x, w, b))
    torch.testing.assert_close(f(xf, wf, bf), reference_fused_linear(xf, wf, bf, "relu"))


class _no_tf32:
    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old
