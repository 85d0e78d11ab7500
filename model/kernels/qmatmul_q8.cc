// y = x @ W for prompt chunks: int8 activations x 4-bit codes (FlaxchatQMatmul4Q8; the layout: qmatmul.h).
// Each row's 32-element blocks are quantised on their own: q = round(x * 127 / absmax), scale = absmax / 127,
// with sum = scale * (sum of q) for the blocks' offsets. A block's 32 products code * q are summed exactly
// in integers (vpmaddubsw pairs, then 16-bit sums of at most 8 pairs: |sum| <= 8 * 2 * 15 * 127 < 2^15),
// then y += (w_scale * scale) * isum + w_offset * sum, block after block: a row's bits depend only on its
// own activations, never on the other rows or their number. Decode steps keep float activations (their
// buckets of 1..B rows must agree bit for bit, and at one row the float path is as fast).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "qmatmul.h"
#include "xla/ffi/api/ffi.h"

namespace {

using namespace flaxchat;  // NOLINT: the layout and shared helpers of qmatmul.h

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
  StoreTile<R>(p.y, p.n, row, panel_index * kPanel + 16 * half, total);
}

constexpr int kIntTileRows = 4;

void Int8Product(ffi::ThreadPool& pool, const float* x, const Problem& w) {
  const int64_t m = w.m, k = w.k, n = w.n, panels = n / kPanel;
  thread_local QuantisedRows rows;
  QuantiseRows(x, m, k, rows);
  const IntProblem problem{&rows, w.scale, w.offset, w.codes, w.y, m, k, n};
  flaxchat::ParallelFor(pool, panels, (m * k * n) / (1 << 18), [problem](int64_t panel) {
    thread_local std::vector<uint8_t> quads;
    quads.resize(problem.k * kPanel);  // one byte per code
    Quads(problem.codes + panel * problem.k * Codes4::kRowBytes, problem.k, quads.data());
    for (int half = 0; half < 2; ++half) {
      for (int64_t row = 0; row < problem.m; row += kIntTileRows) {
        WithRowCount<kIntTileRows>(std::min<int64_t>(kIntTileRows, problem.m - row), [&](auto rows) {
          IntTile<decltype(rows)::value>(problem, panel, quads.data(), row, half);
        });
      }
    }
  }, PanelGrain(panels, m));
}

constexpr auto* QMatmul4Q8 = &LayerHandler<Codes4, Int8Product>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatQMatmul4Q8, QMatmul4Q8, FLAXCHAT_QMATMUL_BINDING());
