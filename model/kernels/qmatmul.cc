// y = x @ W for float32 activations x [M, K] and block-quantised weights W [K, N] (the layout: qmatmul.h),
// 8-bit codes (FlaxchatQMatmul) or 4-bit (FlaxchatQMatmul4). The weights come stacked, one matrix per
// decoder layer, with the layer to use as an int32 operand: the model's loop over layers hands the kernel
// the whole stack and its layer index, so no layer's weights are ever sliced out (XLA:CPU would copy the slice).
// A decode step at one row streams every weight byte once, so it runs near memory speed: 4-bit codes (0.75
// bytes per weight with the scales, against 1.25) are what make it faster, and they hold a 4-bit
// checkpoint's weights (GGUF Q4_0/Q4_1/Q4_K blocks) exactly. With few rows each thread takes runs of
// consecutive panels (PanelGrain, qmatmul.h), so the prefetchers see long streams.
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
// Prompt chunks of 4-bit weights may take a third path (FlaxchatQMatmul4Q8, qmatmul_q8.cc): activations quantised to
// int8 per block of 32, integer products, a float epilogue per block — twice the float path's speed, the
// arithmetic llama.cpp uses for Q4 weights, and still one fixed sequence per row.
//
// Three paths with the same arithmetic: one or two rows convert each code in registers (DirectTile, the
// block's scale/offset loaded once per 32 k); three or four rows do the same one half-panel (16 columns)
// at a time, so their 8 accumulators fit the registers (DirectHalfTile: 1.2-1.3x the buffer path at 3-4
// rows, measured on 30 layers' gate/up products); more rows dequantise a panel into a buffer once and run
// register-blocked tiles of 6 rows x 16 columns over it (BufferTile). The `#pragma GCC unroll` lines are
// load-bearing: without them GCC kept the accumulator arrays on the stack and stored them every k
// (measured 1.3-1.7x slower at 16 rows).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "qmatmul.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace flaxchat;  // NOLINT: the layout and shared helpers of qmatmul.h

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

// Rows [row, row + R) x 16 columns (half `half` of a panel) straight from the codes: for a few rows more
// than DirectTile holds in registers, converting each weight once per half costs less than a trip through
// the panel buffer. The same w = fma(scale, code, offset) and the same chain over k as the other paths.
template <typename Codes, int R>
void DirectHalfTile(const Problem& p, int64_t panel_index, int64_t row, int half) {
  const PanelData d = PanelOf<Codes>(p, panel_index);
  __m256 acc[R][2];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.k / kBlock; ++b) {
    const float* scale = d.scale + b * kPanel + 16 * half;
    const float* offset = d.offset + b * kPanel + 16 * half;
    const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
    const __m256 o0 = _mm256_loadu_ps(offset), o1 = _mm256_loadu_ps(offset + 8);
    for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) {
      __m256i c[2];
      Codes::HalfRow(d.codes + k * Codes::kRowBytes, half, c);
      const __m256 w0 = _mm256_fmadd_ps(s0, _mm256_cvtepi32_ps(c[0]), o0);
      const __m256 w1 = _mm256_fmadd_ps(s1, _mm256_cvtepi32_ps(c[1]), o1);
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xv = _mm256_broadcast_ss(p.x + (row + r) * p.k + k);
        acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
  }
  StoreTile<R>(p.y, p.n, row, panel_index * kPanel + 16 * half, acc);
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
  StoreTile<R>(p.y, p.n, row, panel_index * kPanel + 16 * half, acc);
}

constexpr int kTileRows = 6;
constexpr int kDirectHalfRows = 4;  // up to this many rows: DirectHalfTile, no panel buffer

template <typename Codes>
void Panel(const Problem& p, int64_t panel_index, std::vector<float>& buffer) {
  if (p.m <= 2) {
    if (p.m == 2) return DirectTile<Codes, 2>(p, panel_index, 0);
    return DirectTile<Codes, 1>(p, panel_index, 0);
  }
  if (p.m <= kDirectHalfRows) {
    for (int half = 0; half < 2; ++half) {
      WithRowCount<kDirectHalfRows>(p.m, [&](auto rows) {
        DirectHalfTile<Codes, decltype(rows)::value>(p, panel_index, 0, half);
      });
    }
    return;
  }
  buffer.resize(p.k * kPanel);  // several rows reuse the weights: dequantise the panel once
  Dequantise<Codes>(p, panel_index, buffer.data());
  for (int half = 0; half < 2; ++half) {
    for (int64_t row = 0; row < p.m; row += kTileRows) {
      WithRowCount<kTileRows>(std::min<int64_t>(kTileRows, p.m - row), [&](auto rows) {
        BufferTile<decltype(rows)::value>(p, panel_index, buffer.data(), row, half);
      });
    }
  }
}

template <typename Codes>
void FloatProduct(ffi::ThreadPool& pool, const float* /*x*/, const Problem& problem) {
  const int64_t panels = problem.n / kPanel;
  flaxchat::ParallelFor(pool, panels, (problem.m * problem.k * problem.n) / (1 << 18),
                        [problem](int64_t panel) {
                          thread_local std::vector<float> buffer;
                          Panel<Codes>(problem, panel, buffer);
                        },
                        PanelGrain(panels, problem.m));
}

constexpr auto* QMatmul8 = &LayerHandler<Codes8, FloatProduct<Codes8>>;
constexpr auto* QMatmul4 = &LayerHandler<Codes4, FloatProduct<Codes4>>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatQMatmul, QMatmul8, FLAXCHAT_QMATMUL_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatQMatmul4, QMatmul4, FLAXCHAT_QMATMUL_BINDING());
