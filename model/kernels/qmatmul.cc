// y = x @ W for float32 activations x [M, K] and block-quantised weights W [K, N]:
//   W[k, n] = scale[k / 32, n] * code[k, n] + offset[k / 32, n]
// stored in panels of 32 output columns, scale and offset [N / 32, K / 32, 32] (float32), and codes
//   8-bit (FlaxchatQMatmul):  [N / 32, K, 32], byte j of row k = code[k, j];
//   4-bit (FlaxchatQMatmul4): [N / 32, K, 16], byte j of row k = code[k, j] | code[k, j + 16] << 4.
// The weights come stacked, one matrix per decoder layer ([L, ...] on every weight operand), with the
// layer to use as an int32 operand: the model's loop over layers hands the kernel the whole stack and
// its layer index, so no layer's weights are ever sliced out (XLA:CPU would copy the slice).
// A decode step at one row streams every weight byte once, so it runs at memory speed (measured ~15 GB/s
// per core here): 4-bit codes (0.75 bytes per weight with the scales, against 1.25) are what make it
// faster, and they hold a 4-bit checkpoint's weights (GGUF Q4_0/Q4_1/Q4_K blocks) exactly.
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
//
// Prompt chunks of 4-bit weights take a third path (FlaxchatQMatmul4Q8, below): activations quantised to
// int8 per block of 32, integer products, a float epilogue per block — twice the float path's speed, the
// arithmetic llama.cpp uses for Q4 weights, and still one fixed sequence per row.
//
// Two paths with the same arithmetic: one or two rows convert each code in registers (DirectTile, the
// block's scale/offset loaded once per 32 k); more rows dequantise a panel into a buffer once and run
// register-blocked tiles of 6 rows x 16 columns over it (BufferTile). The `#pragma GCC unroll` lines are
// load-bearing: without them GCC kept the accumulator arrays on the stack and stored them every k
// (measured 1.3-1.7x slower at 16 rows).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
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

// Code layouts: one row k of a panel's codes -> the 32 codes as 4 vectors of 8 int32 (columns 8v..8v+7).
struct Codes8 {
  static constexpr int64_t kRowBytes = 32;
  static inline void Row(const uint8_t* row, __m256i c[4]) {
    #pragma GCC unroll 8
    for (int v = 0; v < 4; ++v) c[v] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * v)));
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
};

// The 32 weights W[k, panel columns] as 4 vectors, from a row of codes and the block's scale/offset:
// the same fma for both layouts, so a 4-bit and an 8-bit code of the same value give the same weight.
template <typename Codes>
inline void Weights(const uint8_t* row, const __m256 scale[4], const __m256 offset[4], __m256 w[4]) {
  __m256i c[4];
  Codes::Row(row, c);
  #pragma GCC unroll 8
  for (int v = 0; v < 4; ++v) w[v] = _mm256_fmadd_ps(scale[v], _mm256_cvtepi32_ps(c[v]), offset[v]);
}

inline void LoadBlock(const float* scale, const float* offset, __m256 s[4], __m256 o[4]) {
  #pragma GCC unroll 8
  for (int v = 0; v < 4; ++v) {
    s[v] = _mm256_loadu_ps(scale + 8 * v);
    o[v] = _mm256_loadu_ps(offset + 8 * v);
  }
}

struct PanelData {
  const uint8_t* codes;  // [K, row bytes]
  const float* scale;    // [K / 32, 32]
  const float* offset;   // [K / 32, 32]
};

template <typename Codes>
PanelData PanelOf(const Problem& p, int64_t panel_index) {
  const int64_t blocks = p.k / kBlock;
  return {p.codes + panel_index * p.k * Codes::kRowBytes, p.scale + panel_index * blocks * kPanel,
          p.offset + panel_index * blocks * kPanel};
}

// Calls visit(k, w) for k = 0 .. K-1 with w the 32 weights W[k, panel columns] as 4 vectors, loading a
// block's scale and offset once for its 32 values of k.
template <typename Codes, typename Visit>
inline void ForEachK(const Problem& p, int64_t panel_index, Visit visit) {
  const PanelData d = PanelOf<Codes>(p, panel_index);
  for (int64_t b = 0; b < p.k / kBlock; ++b) {
    __m256 s[4], o[4];
    LoadBlock(d.scale + b * kPanel, d.offset + b * kPanel, s, o);
    for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) {
      __m256 w[4];
      Weights<Codes>(d.codes + k * Codes::kRowBytes, s, o, w);
      visit(k, w);
    }
  }
}

// Rows [row, row + R) of one panel straight from the codes (few rows: each weight is used R times, so
// converting it in registers costs less than a trip through a buffer).
template <typename Codes, int R>
void DirectTile(const Problem& p, int64_t panel_index, int64_t row) {
  __m256 acc[R][4];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_setzero_ps();
  ForEachK<Codes>(p, panel_index, [&](int64_t k, const __m256 w[4]) {
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(p.x + (row + r) * p.k + k);
      #pragma GCC unroll 8
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_fmadd_ps(xv, w[v], acc[r][v]);
    }
  });
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* out = p.y + (row + r) * p.n + panel_index * kPanel;
    #pragma GCC unroll 8
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + 8 * v, acc[r][v]);
  }
}

// The panel's weights as floats [K, 32] (the same values DirectTile computes in registers).
template <typename Codes>
void Dequantise(const Problem& p, int64_t panel_index, float* buffer) {
  ForEachK<Codes>(p, panel_index, [&](int64_t k, const __m256 w[4]) {
    #pragma GCC unroll 8
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(buffer + k * kPanel + 8 * v, w[v]);
  });
}

// Rows [row, row + R) x 16 columns (half `half` of a dequantised panel): 2R accumulators, two weight
// vectors per k shared by R rows (a register-blocked tile; R = 6 fills the 16 vector registers).
template <int R>
void BufferTile(const Problem& p, int64_t panel_index, const float* panel, int64_t row, int half) {
  __m256 acc[R][2];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* x = p.x + row * p.k;
  const float* w = panel + 16 * half;
  for (int64_t k = 0; k < p.k; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * kPanel), w1 = _mm256_loadu_ps(w + k * kPanel + 8);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * p.k + k);
      acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* out = p.y + (row + r) * p.n + panel_index * kPanel + 16 * half;
    _mm256_storeu_ps(out, acc[r][0]);
    _mm256_storeu_ps(out + 8, acc[r][1]);
  }
}

constexpr int kTileRows = 6;

template <int R = kTileRows>
void BufferRows(const Problem& p, int64_t panel_index, const float* panel, int64_t row, int half, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R) return BufferTile<R>(p, panel_index, panel, row, half);
    BufferRows<R - 1>(p, panel_index, panel, row, half, rows);
  }
}

template <typename Codes>
void Panel(const Problem& p, int64_t panel_index, std::vector<float>& buffer) {
  if (p.m <= 2) {
    if (p.m == 2) return DirectTile<Codes, 2>(p, panel_index, 0);
    return DirectTile<Codes, 1>(p, panel_index, 0);
  }
  buffer.resize(p.k * kPanel);  // several rows reuse the weights: dequantise the panel once
  Dequantise<Codes>(p, panel_index, buffer.data());
  for (int half = 0; half < 2; ++half) {
    for (int64_t row = 0; row < p.m; row += kTileRows) {
      BufferRows(p, panel_index, buffer.data(), row, half, std::min<int64_t>(kTileRows, p.m - row));
    }
  }
}

// Checks the operands (x [M, K], codes [L, N / 32, K, row_bytes], scale/offset [L, N / 32, K / 32, 32],
// layer a scalar, y [M, N]) and points `out` at layer `layer`'s weights.
ffi::Error LayerProblem(const char* kernel, int64_t row_bytes, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
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

// ---- Prompt chunks: int8 activations x 4-bit codes ------------------------------------------------------
// Each row's 32-element blocks are quantised on their own: q = round(x * 127 / absmax), scale = absmax / 127,
// with sum = scale * (sum of q) for the blocks' offsets. A block's 32 products code * q are summed exactly
// in integers (vpmaddubsw pairs, then 16-bit sums of at most 8 pairs: |sum| <= 8 * 2 * 15 * 127 < 2^15),
// then y += (w_scale * scale) * isum + w_offset * sum, block after block: a row's bits depend only on its
// own activations, never on the other rows or their number. Decode steps keep float activations (their
// buckets of 1..B rows must agree bit for bit, and at one row the float path is as fast).

struct QuantisedRows {
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> scale;  // [M, K / 32]
  std::vector<float> sum;    // [M, K / 32]: scale * sum of the block's q
};

void QuantiseRows(const float* x, int64_t m, int64_t k, QuantisedRows& out) {
  const int64_t blocks = k / kBlock;
  out.q.resize(m * k);
  out.scale.resize(m * blocks);
  out.sum.resize(m * blocks);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t i = 0; i < m * blocks; ++i) {
    const float* v = x + i * kBlock;
    __m256 top = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(v + 8 * j), magnitude));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top);
    float absmax = 0.0f;
    for (float lane : lanes) absmax = std::max(absmax, lane);
    const __m256 inverse = _mm256_set1_ps(absmax > 0.0f ? 127.0f / absmax : 0.0f);
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), inverse));
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + i * kBlock), bytes);
    alignas(32) int32_t totals[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(totals),
                       _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    int32_t total = 0;
    for (int32_t t : totals) total += t;
    out.scale[i] = absmax / 127.0f;
    out.sum[i] = out.scale[i] * static_cast<float>(total);
  }
}

// A panel's 4-bit codes regrouped for vpmaddubsw: for each 4 consecutive k, 32 columns x 4 codes (128
// bytes; 32-byte group v holds columns 8v..8v+7, each as its 4 codes in k order).
void Quads(const uint8_t* codes, int64_t k, uint8_t* quads) {
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t quad = 0; quad < k / 4; ++quad) {
    __m128i lo[4], hi[4];
    for (int i = 0; i < 4; ++i) {
      const __m128i row = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + (4 * quad + i) * 16));
      lo[i] = _mm_and_si128(row, low);                     // columns 0..15
      hi[i] = _mm_and_si128(_mm_srli_epi16(row, 4), low);  // columns 16..31
    }
    for (int half = 0; half < 2; ++half) {
      const __m128i* c = half ? hi : lo;
      const __m128i a = _mm_unpacklo_epi8(c[0], c[1]), b = _mm_unpackhi_epi8(c[0], c[1]);
      const __m128i e = _mm_unpacklo_epi8(c[2], c[3]), f = _mm_unpackhi_epi8(c[2], c[3]);
      __m128i* dst = reinterpret_cast<__m128i*>(quads + quad * 128 + half * 64);
      _mm_storeu_si128(dst, _mm_unpacklo_epi16(a, e));
      _mm_storeu_si128(dst + 1, _mm_unpackhi_epi16(a, e));
      _mm_storeu_si128(dst + 2, _mm_unpacklo_epi16(b, f));
      _mm_storeu_si128(dst + 3, _mm_unpackhi_epi16(b, f));
    }
  }
}

struct IntProblem {
  const QuantisedRows* x;
  const float* scale;   // the layer's weight scales [N / 32, K / 32, 32]
  const float* offset;
  const uint8_t* codes;  // the layer's codes [N / 32, K, 16]
  float* y;
  int64_t m, k, n;
};

// Rows [row, row + R) x 16 columns (half `half` of a panel).
template <int R>
void IntTile(const IntProblem& p, int64_t panel_index, const uint8_t* quads, int64_t row, int half) {
  const int64_t blocks = p.k / kBlock;
  const float* w_scale = p.scale + panel_index * blocks * kPanel + 16 * half;
  const float* w_offset = p.offset + panel_index * blocks * kPanel + 16 * half;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 total[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) total[r][0] = total[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int64_t quad = b * 8; quad < b * 8 + 8; ++quad) {
      const uint8_t* w = quads + quad * 128 + half * 64;
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, p.x->q.data() + (row + r) * p.k + quad * 4, 4);
        const __m256i xq = _mm256_set1_epi32(four);
        acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(w0, xq));
        acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(w1, xq));
      }
    }
    const __m256 s0 = _mm256_loadu_ps(w_scale + b * kPanel), s1 = _mm256_loadu_ps(w_scale + b * kPanel + 8);
    const __m256 o0 = _mm256_loadu_ps(w_offset + b * kPanel), o1 = _mm256_loadu_ps(w_offset + b * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x_scale = _mm256_broadcast_ss(p.x->scale.data() + (row + r) * blocks + b);
      const __m256 x_sum = _mm256_broadcast_ss(p.x->sum.data() + (row + r) * blocks + b);
      const __m256 i0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][0], ones));
      const __m256 i1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[r][1], ones));
      total[r][0] = _mm256_fmadd_ps(o0, x_sum, _mm256_fmadd_ps(_mm256_mul_ps(s0, x_scale), i0, total[r][0]));
      total[r][1] = _mm256_fmadd_ps(o1, x_sum, _mm256_fmadd_ps(_mm256_mul_ps(s1, x_scale), i1, total[r][1]));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* out = p.y + (row + r) * p.n + panel_index * kPanel + 16 * half;
    _mm256_storeu_ps(out, total[r][0]);
    _mm256_storeu_ps(out + 8, total[r][1]);
  }
}

constexpr int kIntTileRows = 4;

template <int R = kIntTileRows>
void IntRows(const IntProblem& p, int64_t panel_index, const uint8_t* quads, int64_t row, int half, int64_t rows) {
  if constexpr (R > 0) {
    if (rows == R) return IntTile<R>(p, panel_index, quads, row, half);
    IntRows<R - 1>(p, panel_index, quads, row, half, rows);
  }
}

ffi::Error QMatmul4Q8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> layer,
                      ffi::ResultBuffer<ffi::F32> y) {
  Problem w;
  if (ffi::Error error = LayerProblem("qmatmul4_q8", Codes4::kRowBytes, x, codes, scale, offset, layer, y, w);
      error.failure()) {
    return error;
  }
  const int64_t m = w.m, k = w.k, n = w.n, panels = n / kPanel;
  thread_local QuantisedRows rows;
  QuantiseRows(x.typed_data(), m, k, rows);
  const IntProblem problem{&rows, w.scale, w.offset, w.codes, w.y, m, k, n};
  flaxchat::ParallelFor(pool, panels, (m * k * n) / (1 << 18), [problem](int64_t panel) {
    thread_local std::vector<uint8_t> quads;
    quads.resize(problem.k * kPanel);  // one byte per code
    Quads(problem.codes + panel * problem.k * Codes4::kRowBytes, problem.k, quads.data());
    for (int half = 0; half < 2; ++half) {
      for (int64_t row = 0; row < problem.m; row += kIntTileRows) {
        IntRows(problem, panel, quads.data(), row, half, std::min<int64_t>(kIntTileRows, problem.m - row));
      }
    }
  });
  return ffi::Error::Success();
}

template <typename Codes>
ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                   ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> offset, ffi::Buffer<ffi::S32> layer,
                   ffi::ResultBuffer<ffi::F32> y) {
  Problem problem;
  if (ffi::Error error = LayerProblem("qmatmul", Codes::kRowBytes, x, codes, scale, offset, layer, y, problem);
      error.failure()) {
    return error;
  }
  flaxchat::ParallelFor(pool, problem.n / kPanel, (problem.m * problem.k * problem.n) / (1 << 18),
                        [problem](int64_t panel) {
                          thread_local std::vector<float> buffer;
                          Panel<Codes>(problem, panel, buffer);
                        });
  return ffi::Error::Success();
}

}  // namespace

#define FLAXCHAT_QMATMUL_BINDING()                           \
  ffi::Ffi::Bind()                                          \
      .Ctx<ffi::ThreadPool>()                               \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Arg<ffi::Buffer<ffi::U8>>()                          \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Arg<ffi::Buffer<ffi::F32>>()                         \
      .Arg<ffi::Buffer<ffi::S32>>()                         \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatQMatmul, QMatmul<Codes8>, FLAXCHAT_QMATMUL_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatQMatmul4, QMatmul<Codes4>, FLAXCHAT_QMATMUL_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatQMatmul4Q8, QMatmul4Q8, FLAXCHAT_QMATMUL_BINDING());
