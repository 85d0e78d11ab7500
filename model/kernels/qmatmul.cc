// y = x @ W for float32 activations x [M, K] and 8-bit block-quantised weights W [K, N]:
//   W[k, n] = scale[k / 32, n] * code[k, n] + offset[k / 32, n]      (uint8 codes)
// stored in panels of 32 output columns: codes [N / 32, K, 32], scale and offset [N / 32, K / 32, 32].
//
// Why a kernel of our own (measured, bench/RESULTS.md): XLA:CPU materialises a float copy of converted
// weights before a dot (slower than float32 weights), or needs int8 activations (which cost quality).
// This reads each weight byte once per call and keeps activations in float32.
//
// Batch invariance by construction: every output is one sequential chain over k,
//   acc = fma(x[m, k], W[k, n], acc)   for k = 0 .. K-1, starting from 0,
// with W[k, n] = fma(scale, code, offset) computed the same way on every path. How rows are grouped,
// how many rows the call has and which thread takes which panel change nothing in that chain, so a
// row's bits never depend on the other rows of the call (the seed contract relies on it).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // weights per (scale, offset) pair along K
constexpr int64_t kPanel = 32;  // output columns per panel: 4 vectors of 8 floats

struct Problem {
  const float* x;
  const uint8_t* codes;
  const float* scale;
  const float* offset;
  float* y;
  int64_t m, k, n;
};

// The 32 weights W[k, panel columns] as 4 vectors.
inline void Weights(const uint8_t* codes, const float* scale, const float* offset, __m256 w[4]) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + 16));
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int v = 0; v < 4; ++v) {
    const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[v]));
    w[v] = _mm256_fmadd_ps(_mm256_loadu_ps(scale + 8 * v), c, _mm256_loadu_ps(offset + 8 * v));
  }
}

// Rows [row, row + R) of one panel. Weights come from `panel` (dequantised already, [K, 32]) when it is
// not null, else straight from the codes; the values are the same either way.
template <int R>
inline void Tile(const Problem& p, int64_t panel_index, const float* panel, int64_t row) {
  const uint8_t* codes = p.codes + panel_index * p.k * kPanel;
  const float* scale = p.scale + panel_index * (p.k / kBlock) * kPanel;
  const float* offset = p.offset + panel_index * (p.k / kBlock) * kPanel;
  __m256 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < p.k; ++k) {
    __m256 w[4];
    if (panel) {
      for (int v = 0; v < 4; ++v) w[v] = _mm256_loadu_ps(panel + k * kPanel + 8 * v);
    } else {
      const int64_t b = (k / kBlock) * kPanel;
      Weights(codes + k * kPanel, scale + b, offset + b, w);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(p.x + (row + r) * p.k + k);
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_fmadd_ps(xv, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* out = p.y + (row + r) * p.n + panel_index * kPanel;
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, acc[r][v]);
  }
}

void Panel(const Problem& p, int64_t panel_index, std::vector<float>& buffer) {
  const float* panel = nullptr;
  if (p.m > 2) {  // several row pairs reuse the weights: dequantise the panel once
    buffer.resize(p.k * kPanel);
    const uint8_t* codes = p.codes + panel_index * p.k * kPanel;
    const float* scale = p.scale + panel_index * (p.k / kBlock) * kPanel;
    const float* offset = p.offset + panel_index * (p.k / kBlock) * kPanel;
    for (int64_t k = 0; k < p.k; ++k) {
      __m256 w[4];
      const int64_t b = (k / kBlock) * kPanel;
      Weights(codes + k * kPanel, scale + b, offset + b, w);
      for (int v = 0; v < 4; ++v) _mm256_storeu_ps(buffer.data() + k * kPanel + 8 * v, w[v]);
    }
    panel = buffer.data();
  }
  int64_t row = 0;
  for (; row + 2 <= p.m; row += 2) Tile<2>(p, panel_index, panel, row);
  for (; row < p.m; ++row) Tile<1>(p, panel_index, panel, row);
}

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 3 || cd[1] != xd[1] || cd[2] != kPanel || xd[1] % kBlock != 0) {
    return ffi::Error::InvalidArgument("qmatmul: x [M, K], codes [N / 32, K, 32], K a multiple of 32");
  }
  const int64_t m = xd[0], k = xd[1], panels = cd[0], n = panels * kPanel;
  if (scale.element_count() != n * (k / kBlock) || offset.element_count() != n * (k / kBlock) ||
      y->element_count() != m * n) {
    return ffi::Error::InvalidArgument("qmatmul: scale/offset [N / 32, K / 32, 32], y [M, N]");
  }
  const Problem problem{x.typed_data(), codes.typed_data(), scale.typed_data(), offset.typed_data(),
                        y->typed_data(), m, k, n};
  flaxchat::ParallelFor(pool, panels, (m * k * n) / (1 << 18), [problem](int64_t panel) {
    thread_local std::vector<float> buffer;
    Panel(problem, panel, buffer);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
