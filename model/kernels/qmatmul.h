// The block-quantised weight layout and what both product kernels share (qmatmul.cc: float activations,
// qmatmul_q8.cc: int8 activations for prompt chunks):
//   W[k, n] = scale[k / 32, n] * code[k, n] + offset[k / 32, n]
// stored in panels of 32 output columns, scale and offset [N / 32, K / 32, 32] (float32), and codes
//   8-bit (Codes8): [N / 32, K, 32], byte j of row k = code[k, j];
//   4-bit (Codes4): [N / 32, K, 16], byte j of row k = code[k, j] | code[k, j + 16] << 4;
// one matrix per decoder layer ([L, ...] on every weight operand), the layer to use an int32 operand, and
// `valid` [M] int32 the rows to compute (LeadingValidRows: a bucket's padding rows are not computed).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace flaxchat {

namespace ffi = xla::ffi;

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

// Code layouts: one row k of a panel's codes -> the 32 codes as 4 vectors of 8 int32 (columns 8v..8v+7).
struct Codes8 {
  static constexpr int64_t kRowBytes = 32;
  static inline void Row(const uint8_t* row, __m256i c[4]) {
    #pragma GCC unroll 8
    for (int v = 0; v < 4; ++v) c[v] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * v)));
  }
  // Columns 16h..16h+15 of the row as 2 vectors (c[2h], c[2h + 1] of Row).
  static inline void HalfRow(const uint8_t* row, int half, __m256i c[2]) {
    c[0] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 16 * half)));
    c[1] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 16 * half + 8)));
  }
};

struct Codes4 {
  static constexpr int64_t kRowBytes = 16;
  static inline void Row(const uint8_t* row, __m256i c[4]) {
    const __m256i low = _mm256_set1_epi32(15);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8)));
    c[0] = _mm256_and_si256(a, low);
    c[1] = _mm256_and_si256(b, low);
    c[2] = _mm256_srli_epi32(a, 4);
    c[3] = _mm256_srli_epi32(b, 4);
  }
  // Columns 16h..16h+15 of the row as 2 vectors (c[2h], c[2h + 1] of Row): the low or the high nibbles.
  static inline void HalfRow(const uint8_t* row, int half, __m256i c[2]) {
    const __m256i low = _mm256_set1_epi32(15);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8)));
    c[0] = half ? _mm256_srli_epi32(a, 4) : _mm256_and_si256(a, low);
    c[1] = half ? _mm256_srli_epi32(b, 4) : _mm256_and_si256(b, low);
  }
};

// Checks the operands (x [M, K], codes [L, N / 32, K, row_bytes], scale/offset [L, N / 32, K / 32, 32],
// layer a scalar, y [M, N]) and points `out` at layer `layer`'s weights.
inline ffi::Error LayerProblem(const char* kernel, int64_t row_bytes, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> layer,
                        ffi::ResultBuffer<ffi::F32>& y, Problem& out) {
  auto error = [kernel](const char* what) { return ffi::Error::InvalidArgument(std::string(kernel) + ": " + what); };
  const auto xd = x.dimensions(), cd = codes.dimensions();
  if (xd.size() != 2 || cd.size() != 4 || cd[2] != xd[1] || cd[3] != row_bytes || xd[1] % kBlock != 0 ||
      layer.element_count() != 1) {
    return error("x [M, K], codes [L, N / 32, K, 32 or 16], K a multiple of 32, layer a scalar");
  }
  const int64_t m = xd[0], k = xd[1], layers = cd[0], panels = cd[1], n = panels * kPanel;
  const int64_t index = layer.typed_data()[0];
  if (index < 0 || index >= layers) return error("layer out of range");
  const int64_t scales = n * (k / kBlock);  // per layer
  if (scale.element_count() != layers * scales || offset.element_count() != layers * scales ||
      y->element_count() != m * n) {
    return error("scale/offset [L, N / 32, K / 32, 32], y [M, N]");
  }
  out = Problem{x.typed_data(), codes.typed_data() + index * panels * k * row_bytes, scale.typed_data() + index * scales,
                offset.typed_data() + index * scales, y->typed_data(), m, k, n};
  return ffi::Error::Success();
}

// Stores a tile's accumulators: rows [row, row + R) x 16 columns from `column` of y [M, N].
template <int R>
inline void StoreTile(float* y, int64_t n, int64_t row, int64_t column, const __m256 acc[R][2]) {
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* out = y + (row + r) * n + column;
    _mm256_storeu_ps(out, acc[r][0]);
    _mm256_storeu_ps(out + 8, acc[r][1]);
  }
}

// Consecutive panels a thread claims at a time. With few rows a product streams its weights from memory,
// and a panel's codes, scales and offsets are three short runs (~14 KB at K = 576): threads taking
// alternate panels left the hardware prefetchers restarting at every one. So up to `kStreamingRows` rows
// claim runs of up to 16 panels (at least ~8 claims per call, so both threads finish together); more rows
// are bound by arithmetic, and single panels balance the threads best. Measured on the default model
// (int4, int8 KV), decode steps alone: 1 row 9.6-13.2 -> 7.6-9.9 ms, 2 rows 11.7-16.4 -> 10.1-10.6, 4
// rows 19-21 -> 16.7-18.1; at 16 rows runs of panels cost ~3 %. Which thread computes a panel never
// changes its bits.
constexpr int64_t kStreamingRows = 4;
inline int64_t PanelGrain(int64_t panels, int64_t rows) {
  if (rows > kStreamingRows) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(16, panels / 8));
}

// Calls tile(std::integral_constant<int, rows>) for a run-time `rows` in [1, R]: a register tile's row
// count has to be a compile-time constant.
template <int R, typename Tile>
inline void WithRowCount(int64_t rows, Tile&& tile) {
  if constexpr (R > 0) {
    if (rows == R) return tile(std::integral_constant<int, R>{});
    WithRowCount<R - 1>(rows, tile);
  }
}

// The rows of a call to compute: `valid` [M] flags the rows whose results are used (a prompt chunk's real
// tokens, a batched prefill's real tokens of each prompt, a decode bucket's live rows); the others are padding.
// Only flagged rows are computed and the rest of y is zero, so a padded bucket costs the rows it carries, not
// its size. When they lead the call (one prompt's chunk, a decode bucket: the common case, checked without
// allocating) the kernel runs on that prefix in place; otherwise they are gathered into a contiguous block
// first and their results scattered back. A computed row's bits never depend on which other rows are
// computed (each row is its own chain).
inline int64_t LeadingValidRows(const int32_t* flags, int64_t m) {
  int64_t leading = 0;
  while (leading < m && flags[leading]) ++leading;
  return std::any_of(flags + leading, flags + m, [](int32_t flag) { return flag != 0; }) ? -1 : leading;
}

// The FFI handler of one product kernel: checks the operands (LayerProblem) and runs `Run` on the layer's
// weights with the call's valid rows (LeadingValidRows); the other rows of y are zero.
using LayerRun = void (*)(ffi::ThreadPool& pool, const float* x, const Problem& problem);

template <typename Codes, LayerRun Run>
ffi::Error LayerHandler(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> layer,
                        ffi::Buffer<ffi::S32> valid, ffi::ResultBuffer<ffi::F32> y) {
  Problem problem;
  if (ffi::Error error = LayerProblem("qmatmul", Codes::kRowBytes, x, codes, scale, offset, layer, y, problem);
      error.failure()) {
    return error;
  }
  if (valid.element_count() != problem.m) {
    return ffi::Error::InvalidArgument("qmatmul: valid [M], one flag per row of x");
  }
  const int32_t* flags = valid.typed_data();
  const int64_t k = problem.k, n = problem.n, leading = LeadingValidRows(flags, problem.m);
  if (leading >= 0) {  // the valid rows lead the call: compute them in place
    std::fill(problem.y + leading * n, problem.y + problem.m * n, 0.0f);
    problem.m = leading;
    if (leading > 0) Run(pool, problem.x, problem);
    return ffi::Error::Success();
  }
  thread_local std::vector<int64_t> rows;
  rows.clear();
  for (int64_t i = 0; i < problem.m; ++i) {
    if (flags[i]) rows.push_back(i);
  }
  const int64_t count = static_cast<int64_t>(rows.size());
  thread_local std::vector<float> packed_x, packed_y;
  packed_x.resize(count * k);
  packed_y.resize(count * n);
  for (int64_t i = 0; i < count; ++i) std::copy_n(problem.x + rows[i] * k, k, packed_x.data() + i * k);
  float* out = problem.y;
  std::fill(out, out + problem.m * n, 0.0f);
  problem.x = packed_x.data(), problem.y = packed_y.data(), problem.m = count;
  Run(pool, problem.x, problem);
  for (int64_t i = 0; i < count; ++i) std::copy_n(packed_y.data() + i * n, n, out + rows[i] * n);
  return ffi::Error::Success();
}

}  // namespace flaxchat

#define FLAXCHAT_QMATMUL_BINDING()                           \
  ffi::Ffi::Bind()                                          \
      .Ctx<ffi::ThreadPool>()                               \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Arg<ffi::Buffer<ffi::U8>>()                          \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Arg<ffi::Buffer<ffi::S32>>()                         \
      .Arg<ffi::Buffer<ffi::S32>>()                         \
      .Ret<ffi::Buffer<ffi::F32>>()
