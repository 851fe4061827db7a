"""Python face of the partlab._C extension: the fused column-parallel linear.

    y = act(x @ weight^T + bias)     act in {"relu", "gelu" (tanh approximation), "none"}

`fused_linear` runs the C++/CUDA op `torch.ops.partlab.fused_linear`, whose autograd is C++
(csrc/fused_linear_autograd.cpp: the backward is the op `torch.ops.partlab.fused_linear_backward`,
reusing what the forward saved instead of recomputing the GEMM); this module registers the fake
(shape) kernels for torch.compile. `reference_fused_linear` is the same maths in plain PyTorch.
Importing this module never fails: without a built extension, `fused_linear` raises an error
that names the build command.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "none")
BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` in the repository "
              "(or run scripts/lab.sh)")

try:
    from partlab import _C  # noqa: F401  (importing registers the ops)
    _LOAD_ERROR = None
    _FUSED_LINEAR = torch.ops.partlab.fused_linear.default  # the overload, resolved once
except (ImportError, AttributeError) as e:  # not built, or built against another torch
    _LOAD_ERROR = f"{type(e).__name__}: {e}"
    _FUSED_LINEAR = None


def extension_info():
    """{'built': bool, 'cuda': bool, 'error': str | None} for `partlab env` and tests."""
    built = _LOAD_ERROR is None and hasattr(torch.ops.partlab, "fused_linear")
    cuda = built and torch._C._dispatch_has_kernel_for_dispatch_key(
        "partlab::fused_linear", "CUDA")
    return {"built": built, "cuda": bool(cuda), "error": _LOAD_ERROR}


def extension_available():
    return extension_info()["built"]


def forward_paths(reset=False):
    """How the CUDA forwards ran since the last reset: {'cublaslt': n, 'fallback': n,
    'last_fallback_reason': str} (the cuBLASLt epilogue, or a GEMM + the hand-written kernel)."""
    _require_extension()
    cublaslt, fallback, reason = torch.ops.partlab.forward_paths(reset)
    return {"cublaslt": cublaslt, "fallback": fallback, "last_fallback_reason": reason}


def _require_extension():
    if _LOAD_ERROR is not None:
        raise RuntimeError(f"partlab._C is not built ({_LOAD_ERROR}); {BUILD_HINT}")


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_linear: unknown activation {activation!r}; "
                         f"expected one of {ACTIVATIONS} (gelu is the tanh approximation)")


def reference_fused_linear(x, weight, bias=None, activation="relu"):
    """Plain PyTorch of the same maths (the unfused eager path)."""
    _check_activation(activation)
    y = F.linear(x, weight, bias)
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y, approximate="tanh")
    return y


def fused_linear(x, weight, bias=None, activation="relu"):
    """act(x @ weight^T + bias) as one op, forward and backward.

    x: [..., in_features]; weight: [out_features, in_features]; bias: [out_features] or None.
    Leading dims of x are flattened for the op and restored on the output. Inputs that are not
    contiguous (a transposed weight, a strided x) are copied to contiguous first. Under autocast
    the inputs are cast to the autocast dtype first, as F.linear's are.
    """
    _require_extension()
    _check_activation(activation)
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("fused_linear: x and weight must be tensors")
    if x.dim() < 1:
        raise ValueError(f"fused_linear: x must have at least 1 dim [..., in_features], got a "
                         f"{x.dim()}-D tensor")
    if weight.dim() != 2:
        raise ValueError(f"fused_linear: weight must be 2-D [out_features, in_features], got "
                         f"shape {tuple(weight.shape)}")
    k = x.shape[-1]
    if k != weight.shape[1]:
        raise ValueError(f"fused_linear: x has {k} input features but weight "
                         f"{tuple(weight.shape)} expects {weight.shape[1]}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    # .contiguous() returns the tensor itself when it already is.
    x2 = (x if x.dim() == 2 else x.reshape(-1, k)).contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    # GELU's backward needs the pre-activation; without autograd (inference) skip writing it.
    save_pre = activation == "gelu" and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    out, _ = _FUSED_LINEAR(x2, weight, bias, activation, save_pre)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], weight.shape[0])

if _LOAD_ERROR is None:

    @torch.library.register_fake("partlab::fused_linear")
    def _fused_linear_fake(x, weight, bias, activation, save_pre=True):
        torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
        torch._check(weight.dim() == 2, lambda: f"weight must be 2-D, got {weight.dim()}-D")
        torch._check(x.shape[1] == weight.shape[1], lambda: "x and weight in_features differ")
        torch._check(x.dtype == weight.dtype, lambda: "x and weight dtypes differ")
        torch._check(x.device == weight.device, lambda: "x and weight devices differ")
        torch._check(x.is_contiguous() and weight.is_contiguous(),
                     lambda: "x and weight must be contiguous")
        if bias is not None:
            torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                         lambda: "bias must be 1-D of size out_features")
            torch._check(bias.dtype == x.dtype and bias.device == x.device,
                         lambda: "bias dtype/device differ from x")
            torch._check(bias.is_contiguous(), lambda: "bias must be contiguous")
        torch._check(activation in ACTIVATIONS, lambda: f"unknown activation {activation!r}")
        out = x.new_empty((x.shape[0], weight.shape[0]))
        keep = activation == "gelu" and save_pre
        saved = out.new_empty(out.shape) if keep else x.new_empty((0,))
        return out, saved

    @torch.library.register_fake("partlab::fused_linear_backward")
    def _fused_linear_backward_fake(grad_out, x, weight, saved, activation, output_mask):
        torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x and weight must be 2-D")
        torch._check(grad_out.shape == (x.shape[0], weight.shape[0]),
                     lambda: "grad_out must be [M, N]")
        torch._check(grad_out.dtype == x.dtype and weight.dtype == x.dtype,
                     lambda: "grad_out, x and weight dtypes differ")
        torch._check(grad_out.is_contiguous() and x.is_contiguous() and weight.is_contiguous(),
                     lambda: "grad_out, x and weight must be contiguous")
        if activation != "none":
            torch._check(saved.shape == grad_out.shape, lambda: "saved must be [M, N]")
        gx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
        gw = weight.new_empty(weight.shape) if output_mask[1] else x.new_empty((0,))
        gb = x.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,))
        return gx, gw, gb
