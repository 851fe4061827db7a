"""partlab.ops.fused_linear against plain PyTorch, under autograd, opcheck and torch.compile.

Tolerances:
  float32  the op runs the same GEMM (addmm) and ATen's own activation kernels as the reference,
           so forward outputs agree to a few ulps; gradients differ only by summation order
           (blocked grad_weight accumulation, two-level bias sum): rtol/atol 1e-5 at K <= 1024.
  bfloat16 8 mantissa bits: one rounding of an O(1) value is up to 2^-8 = 0.0039 relative; the
           op and the reference may round the pre-activation and output at different points and
           sum in different orders, so allow 2 such roundings: rtol 1.6e-2, atol 1.6e-2
           (outputs are O(1) because weights are scaled by 1/sqrt(K)).
  float16  11 mantissa bits: 2^-11 = 4.9e-4 per rounding; the same 2 roundings: rtol/atol 2e-3.
           (Both half types accumulate the GEMMs in fp32 on either path.)
CUDA float32 runs with TF32 off (in the op and in the reference alike), so it is true fp32.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from partlab import ops
from partlab.ops import fused_linear, reference_fused_linear

pytestmark = pytest.mark.fast
ROOT = Path(__file__).resolve().parents[1]
ACTS = ("relu", "gelu", "none")
# No skip when the extension is missing: scripts/test.sh always builds it, so a missing or broken
# build must fail here, loudly, rather than pass as skips.
assert ops.extension_available(), f"partlab._C not built: {ops.extension_info()['error']}"
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


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
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), got, want, strict=False):
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
    for t, t0 in zip((x, w, b), before, strict=True):
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


def test_autocast_casts_like_linear():
    # Under autocast F.linear runs in the autocast dtype; the fused op must do the same (and its
    # gradients must reach the fp32 parameters in fp32), not fail on mixed dtypes.
    x, w, b = make(16, 32, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_linear(x, w, b, "gelu")
        r = reference_fused_linear(x.detach(), w.detach(), b.detach(), "gelu")
    assert y.dtype == r.dtype == torch.bfloat16
    torch.testing.assert_close(y, r, **TOL[torch.bfloat16])
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32


def test_cpu_forwards_leave_the_cuda_path_counts_alone():
    before = ops.forward_paths()
    fused_linear(*make(4, 8, 8), "relu")
    assert ops.forward_paths() == before
    assert set(before) == {"cublaslt", "fallback", "last_fallback_reason"}


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


def _setup_py(env):
    """setup.py's extension choice only (`--name` builds nothing): (exit code, its last stderr
    line, how many partlab lines). A CUDA torch on a machine without a GPU logs its own
    "No CUDA runtime is found" warning before ours."""
    proc = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={**os.environ, **env})
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines[-1] if lines else "", sum("partlab" in line for line in lines)


BAD_BUILDS = [({"PARTLAB_BUILD": "gpu"}, "PARTLAB_BUILD='gpu': use auto, cpu or cuda")] + (
    [({"PARTLAB_BUILD": "cuda"}, "PARTLAB_BUILD=cuda but torch")] if torch.version.cuda is None
    else [])


@pytest.mark.parametrize("env,message", BAD_BUILDS)
def test_setup_refuses_a_build_it_cannot_make_in_one_line(env, message):
    code, err, ours = _setup_py(env)
    assert code == 1 and err.startswith("partlab: error: ") and message in err, err
    assert ours == 1, err


@pytest.mark.skipif(torch.version.cuda is None,
                    reason="needs a CUDA build of torch (scripts/cuda_build_check.sh has one)")
def test_setup_refuses_an_nvcc_of_another_cuda_major(tmp_path):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 11.8, V11.8.89'\n")
    nvcc.chmod(0o755)
    code, err, ours = _setup_py({"PARTLAB_BUILD": "cuda", "CUDA_HOME": str(tmp_path)})
    assert code == 1 and err.startswith("partlab: error: ") and "is CUDA 11 but torch" in err
    assert ours == 1, err


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



# ---- CUDA: the same checks on a GPU, and what only a GPU can get wrong ----
# Each test asserts which forward path ran (partlab.ops.forward_paths): the cuBLASLt epilogue
# where the tensors allow it, the GEMM + hand-written kernel where they do not.

def gpu(*marks):
    def wrap(f):
        for mark in (pytest.mark.cuda, needs_gpu, *marks):
            f = mark(f)
        return f
    return wrap


@pytest.fixture
def paths(monkeypatch):
    """Counts the forward paths taken inside a test; TF32 off so fp32 is true fp32."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert ops.extension_info()["cuda"], "partlab._C was built without CUDA kernels"
    ops.forward_paths(reset=True)
    return ops.forward_paths


CUDA_SHAPES = [(1, 1, 1), (1, 64, 32), (33, 17, 65), (64, 1024, 1024), (0, 8, 5),
               (1000, 64, 256)]  # M > 256: several row blocks in the bias-gradient reduction


@gpu()
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", CUDA_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_matches_reference(m, k, n, act, dtype, bias, paths):
    check_against_reference(*make(m, k, n, dtype, "cuda", bias=bias), act, TOL[dtype])
    if m > 0:
        assert sum(paths()[p] for p in ("cublaslt", "fallback")) == 1


@gpu()
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_aligned_tensors_take_the_cublaslt_path(act, dtype, paths, monkeypatch):
    monkeypatch.setenv("PARTLAB_REQUIRE_CUBLASLT", "1")  # a fallback now raises, with its reason
    check_against_reference(*make(256, 512, 384, dtype, "cuda"), act, TOL[dtype])
    assert paths()["cublaslt"] == 1 and paths()["fallback"] == 0, paths()


@gpu()
@pytest.mark.parametrize("act", ("relu", "gelu"))
def test_cuda_gelu_with_and_without_its_pre_activation(act, paths):
    x, w, b = (t.detach() for t in make(128, 256, 512, torch.bfloat16, "cuda"))
    with torch.no_grad():  # inference: save_pre=False, no aux output
        torch.testing.assert_close(fused_linear(x, w, b, act),
                                   reference_fused_linear(x, w, b, act), **TOL[torch.bfloat16])
    out, saved = torch.ops.partlab.fused_linear(x, w, b, act, True)
    assert saved.numel() == (out.numel() if act == "gelu" else 0)
    if act == "gelu":  # the aux output is the pre-activation itself
        torch.testing.assert_close(saved, F.linear(x, w, b), **TOL[torch.bfloat16])
    assert paths()["fallback"] == 0, paths()


@gpu()
@pytest.mark.parametrize("act", ACTS)
def test_cuda_unaligned_bias_shard_falls_back(act, paths):
    buf = torch.randn(3 + 64, device="cuda")
    b = buf[3:].requires_grad_()  # 12-byte offset: the epilogue's bias must be 16-byte aligned
    x = torch.randn(40, 2 * 32, device="cuda")[:, ::2].requires_grad_()
    w = (torch.randn(32, 64, device="cuda") / 8).t().requires_grad_()
    check_against_reference(x, w, b, act, TOL[torch.float32])
    assert paths()["fallback"] == 1 and "bias" in paths()["last_fallback_reason"]


@gpu()
@pytest.mark.parametrize("offset", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_row_views_at_an_offset(offset, dtype, paths):
    # A pipeline microbatch is a row slice of the batch: contiguous, used in place, but only
    # offset * K * itemsize bytes past an aligned start (K = 34: 8-byte aligned in fp32, 4 or
    # 12 bytes past 16 in bf16).
    x, w, b = make(64 + offset, 34, 48, dtype, "cuda")
    view = x.detach()[offset:].requires_grad_()
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    check_against_reference(view, w, b, "relu", TOL[dtype])
    assert paths()["cublaslt"] + paths()["fallback"] == 1


@gpu()
def test_cuda_runs_on_the_current_stream(paths):
    # x is produced on a side stream by a long matmul; if the op ran on another stream it would
    # read x before it is written.
    side = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda")
    w, b = (torch.randn(512, 4096, device="cuda") / 64), torch.randn(512, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        x = (a @ a) / 4096
        y = fused_linear(x, w, b, "relu")
        want = reference_fused_linear(x, w, b, "relu")
    side.synchronize()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)


@gpu(pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU: no second device"))
def test_cuda_second_device(paths):
    with torch.cuda.device(0):  # the op must follow its inputs' device, not the current one
        check_against_reference(*make(64, 128, 96, torch.float32, "cuda:1"), "gelu",
                                TOL[torch.float32])
    assert paths()["cublaslt"] + paths()["fallback"] == 1


@gpu()
@pytest.mark.parametrize("aligned_bias", [True, False])
def test_cuda_nan_passes_through_relu_on_both_paths(aligned_bias, paths):
    x, w, b = (t.detach() for t in make(32, 64, 48, torch.float32, "cuda"))
    x[5, 7] = float("nan")
    if not aligned_bias:
        b = torch.cat([b.new_zeros(1), b])[1:]  # 4-byte offset: the fallback path
    got, want = fused_linear(x, w, b, "relu"), reference_fused_linear(x, w, b, "relu")
    assert torch.isnan(got[5]).all() and not torch.isnan(got[:5]).any()
    torch.testing.assert_close(got, want, equal_nan=True)
    assert paths()["cublaslt" if aligned_bias else "fallback"] == 1, paths()


@gpu()
def test_cuda_gradcheck_opcheck_compile(paths):
    x, w, b = make(7, 5, 4, dtype=torch.float64, device="cuda", seed=3)  # float64: fallback
    assert torch.autograd.gradcheck(lambda *a: fused_linear(*a, activation="gelu"), (x, w, b))
    for dtype in (torch.float32, torch.bfloat16):  # the cuBLASLt path
        xf, wf, bf = (t.detach().to(dtype) for t in make(64, 128, 96, device="cuda"))
        for act in ACTS:
            torch.library.opcheck(torch.ops.partlab.fused_linear.default, (xf, wf, bf, act))
    assert paths()["cublaslt"] > 0
    f = torch.compile(lambda x, w, b: fused_linear(x, w, b, "relu"), fullgraph=True)
    xf, wf, bf = (t.detach().float() for t in (x, w, b))
    torch.testing.assert_close(f(xf, wf, bf), reference_fused_linear(xf, wf, bf, "relu"))
