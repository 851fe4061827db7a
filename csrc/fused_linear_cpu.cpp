// CPU kernels for partlab::fused_linear and partlab::fused_linear_backward.
//
// Eager PyTorch runs linear + activation as separate passes over the [M, N] activations:
//   forward   addmm writes pre; relu/gelu reads pre and writes a fresh out
//   backward  activation-backward reads grad_out and saved, writes grad_pre; two GEMMs and the
//             bias sum each read grad_pre again from memory.
// Here the rows are processed in blocks small enough to stay in the L2 cache, so each
// [M, N] tensor crosses the memory bus about once:
//   forward   per block: addmm into out (or pre), then the activation in cache
//   backward  per block: grad_pre = grad_out * act'(saved) into a cache-sized scratch, fused with
//             the bias column sum; then grad_x rows and grad_weight += grad_pre^T x from cache.
// Blocking re-reads the weight once per block, so it is only used when K is small (the GEMM is
// cheap next to the elementwise traffic). With large K the GEMMs dominate and one block is used.
#include "fused_linear.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace partlab {
namespace {

// Rows per block: keep one [rows, N] block near 512 KiB (L2 is >= 1 MiB on current x86), never
// fewer than 16 rows. Large K: a single block (no re-reading of the weight).
int64_t rows_per_block(int64_t M, int64_t N, int64_t K, at::ScalarType dtype) {
  const bool blockable = dtype == at::kFloat || dtype == at::kDouble;  // grad_weight accumulates
  if (!blockable || K > 256 || M <= 16) return std::max<int64_t>(M, 1);
  const int64_t bytes_per_row = std::max<int64_t>(N, 1) * at::elementSize(dtype);
  const int64_t rows = std::max<int64_t>(16, (512 * 1024) / bytes_per_row);
  return std::min(rows, M);
}

// pre and out are the same block unless GELU keeps its pre-activation.
void apply_activation_(const at::Tensor& pre, at::Tensor out, Activation act, bool keep_pre) {
  switch (act) {
    case Activation::Relu: at::relu_(out); break;  // out already holds pre
    case Activation::Gelu:                         // ATen's vectorised tanh-GELU
      if (keep_pre) {
        at::gelu_out(out, pre, "tanh");
      } else {
        at::gelu_(out, "tanh");
      }
      break;
    case Activation::None: break;
  }
}

std::tuple<at::Tensor, at::Tensor> fused_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    c10::string_view activation,
                                                    bool save_pre) {
  const Activation act = parse_activation(activation);
  check_forward(x, weight, bias, c10::DeviceType::CPU);
  const bool keep_pre = act == Activation::Gelu && save_pre;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const at::Tensor wt = weight.t();
  const int64_t rb = rows_per_block(M, N, K, x.scalar_type());
  if (rb >= M && M * N > 0) {
    // One block (large K): the functional GEMM, then one activation pass, each allocating its
    // result as eager's do (in place; GELU keeping pre gets a fresh out from at::gelu).
    at::Tensor pre = bias.has_value() ? at::addmm(*bias, x, wt) : at::mm(x, wt);
    if (!keep_pre) {
      apply_activation_(pre, pre, act, false);
      return {pre, at::empty({0}, x.options())};
    }
    return {at::gelu(pre, "tanh"), pre};
  }
  at::Tensor out = at::empty({M, N}, x.options());
  at::Tensor saved = keep_pre ? at::empty({M, N}, x.options()) : at::empty({0}, x.options());
  if (out.numel() == 0) return {out, saved};
  at::Tensor target = keep_pre ? saved : out;  // where the GEMM writes
  for (int64_t r0 = 0; r0 < M; r0 += rb) {
    const int64_t rows = std::min(rb, M - r0);
    at::Tensor t = target.narrow(0, r0, rows);
    const at::Tensor xb = x.narrow(0, r0, rows);
    if (bias.has_value()) {
      at::addmm_out(t, *bias, xb, wt);
    } else {
      at::mm_out(t, xb, wt);
    }
    apply_activation_(t, out.narrow(0, r0, rows), act, keep_pre);
  }
  return {out, saved};
}

// kRelu: g = grad_out * relu'(out) (out > 0 <=> pre > 0), written to g. Otherwise g is already
// grad_pre (in cache). Either way bias_acc[n] += sum over rows of g, in the same pass.
// Columns are split across threads, so each thread owns its slice of bias_acc; rows are summed
// in chunks of 128 into a partial that is then added to bias_acc (two-level summation keeps the
// float32 rounding error near that of ATen's cascade sum).
template <typename scalar_t, typename acc_t, bool kRelu>
void grad_colsum(const scalar_t* go, const scalar_t* out, scalar_t* g, acc_t* bias_acc,
                 int64_t rows, int64_t N) {
  constexpr int64_t kChunk = 128;
  at::parallel_for(0, N, 256, [=](int64_t c0, int64_t c1) {
    const int64_t w = c1 - c0;
    if (bias_acc == nullptr) {
      if (!kRelu) return;
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* __restrict__ gor = go + r * N + c0;
        const scalar_t* __restrict__ outr = out + r * N + c0;
        scalar_t* __restrict__ gr = g + r * N + c0;
        for (int64_t c = 0; c < w; ++c) {
          const scalar_t a = gor[c], o = outr[c];  // unconditional loads: lets gcc vectorise
          gr[c] = o > scalar_t(0) ? a : scalar_t(0);
        }
      }
      return;
    }
    std::vector<acc_t> part(w);
    acc_t* __restrict__ p = part.data();
    for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
      std::fill(part.begin(), part.end(), acc_t(0));
      const int64_t r1 = std::min(rows, r0 + kChunk);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* __restrict__ gr = g + r * N + c0;
        if constexpr (kRelu) {
          const scalar_t* __restrict__ gor = go + r * N + c0;
          const scalar_t* __restrict__ outr = out + r * N + c0;
          for (int64_t c = 0; c < w; ++c) {
            const scalar_t a = gor[c], o = outr[c];
            const scalar_t v = o > scalar_t(0) ? a : scalar_t(0);
            gr[c] = v;
            p[c] += static_cast<acc_t>(v);
          }
        } else {
          for (int64_t c = 0; c < w; ++c) p[c] += static_cast<acc_t>(gr[c]);
        }
      }
      acc_t* __restrict__ dst = bias_acc + c0;
      for (int64_t c = 0; c < w; ++c) dst[c] += p[c];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& saved, c10::string_view activation, std::array<bool, 3> output_mask) {
  const Activation act = parse_activation(activation);
  check_backward(grad_out, x, weight, saved, act, c10::DeviceType::CPU);
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const auto opts = x.options();
  const int64_t rb = rows_per_block(M, N, K, x.scalar_type());
  if (act == Activation::None || rb >= M || N == 0) {
    // Nothing to fuse (grad_pre is grad_out itself; an empty M gives zero weight and bias
    // gradients), or one block (large K): the GEMMs dominate and no pass can stay in cache, so
    // run the very passes eager runs, each allocating its result as eager's do (allocating all
    // three up front measured 3-4 % slower at 64x1024->1024).
    at::Tensor g = grad_out;
    if (act == Activation::Relu) g = at::threshold_backward(grad_out, saved, 0);
    if (act == Activation::Gelu) g = at::gelu_backward(grad_out, saved, "tanh");
    return {output_mask[0] ? at::mm(g, weight) : at::empty({0}, opts),
            output_mask[1] ? at::mm(g.t(), x) : at::empty({0}, opts),
            output_mask[2] ? g.sum(0) : at::empty({0}, opts)};
  }
  at::Tensor gx = output_mask[0] ? at::empty({M, K}, opts) : at::empty({0}, opts);
  at::Tensor gw = output_mask[1] ? at::empty({N, K}, opts) : at::empty({0}, opts);
  at::Tensor gb = output_mask[2] ? at::empty({N}, opts) : at::empty({0}, opts);
  at::Tensor scratch = at::empty({rb, N}, opts);
  const auto dtype = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fused_linear_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor bias_acc;
    acc_t* acc = nullptr;
    if (output_mask[2]) {
      bias_acc = at::zeros({N}, opts.dtype(c10::CppTypeToScalarType<acc_t>::value));
      acc = bias_acc.data_ptr<acc_t>();
    }
    for (int64_t r0 = 0; r0 < M; r0 += rb) {
      const int64_t rows = std::min(rb, M - r0);
      at::Tensor g = scratch.narrow(0, 0, rows);
      const at::Tensor gob = grad_out.narrow(0, r0, rows);
      const at::Tensor sb = saved.narrow(0, r0, rows);
      if (act == Activation::Relu) {
        grad_colsum<scalar_t, acc_t, true>(gob.const_data_ptr<scalar_t>(),
                                           sb.const_data_ptr<scalar_t>(),
                                           g.mutable_data_ptr<scalar_t>(), acc, rows, N);
      } else {
        at::gelu_backward_out(g, gob, sb, "tanh");  // ATen's vectorised tanh-GELU derivative
        grad_colsum<scalar_t, acc_t, false>(nullptr, nullptr, g.mutable_data_ptr<scalar_t>(), acc,
                                            rows, N);
      }
      const at::Tensor xb = x.narrow(0, r0, rows);
      if (output_mask[0]) {
        at::Tensor gxb = gx.narrow(0, r0, rows);
        at::mm_out(gxb, g, weight);
      }
      if (output_mask[1]) {
        if (r0 == 0) {
          at::mm_out(gw, g.t(), xb);
        } else {
          gw.addmm_(g.t(), xb);
        }
      }
    }
    if (output_mask[2]) gb.copy_(bias_acc);
  });
  return {gx, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(partlab, CPU, m) {
  m.impl("fused_linear", &fused_linear_cpu);
  m.impl("fused_linear_backward", &fused_linear_backward_cpu);
}

}  // namespace partlab
