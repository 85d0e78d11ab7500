// Decode attention: one new query position per row over that row's KV cache.
//   q [B, KV, G, D] float32 (already scaled by D^-0.5), caches [L, R, KV, S, D] (every layer's; float32,
//   bfloat16 stored as uint16 bits, or int8 codes with float32 scales [L, R, KV, S, groups]), rows [B] (cache row of each batch row; >= R marks a padding row),
//   positions [B] (the query's position: keys 0..position are visible, or the last `window` of them;
//   window <= 0: all), layer and window int32 scalars -> out [B, KV, G, D] float32.
// The caches come whole with the layer as an operand (cache_entries.h).
//
// Why a kernel (profiled, bench/RESULTS.md): XLA:CPU ran the blockwise online softmax as a while loop of
// ~20 small operations per cache block and layer, a fifth of a one-row decode step in dispatch overhead.
//
// Batch invariance by construction: each (row, kv head) is computed alone by the same code — scores in
// key order, the max, exponentials and their sum in a fixed order, the weighted sum of values in key order —
// so a row's bits depend only on its own query and cache entries, never on the other rows or the bucket.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cache_entries.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using flaxchat::Caches;
using flaxchat::Entry;
using flaxchat::Storage;

using Problem = flaxchat::AttentionProblem;

// Dot products of G query heads with one key, each in a fixed order: 8 lanes of FMAs over the dimension,
// then the lanes summed as ((0+4)+(1+5))+((2+6)+(3+7)), then any tail. The G products run side by side
// (independent chains) without changing any one of them.
template <int G>
inline void Dots(const float* q, int64_t dim, const float* key, float* scores, int64_t stride) {
  __m256 acc[G];
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) acc[g] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) {
    const __m256 k = _mm256_loadu_ps(key + i);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * dim + i), k, acc[g]);
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, acc[g]);
    float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (int64_t j = i; j < dim; ++j) s = std::fmaf(q[g * dim + j], key[j], s);
    scores[g * stride] = s;
  }
}

constexpr int kGroupsTogether = 4;

template <int G = kGroupsTogether>
inline void DotsOf(int64_t groups, const float* q, int64_t dim, const float* key, float* scores, int64_t stride) {
  if constexpr (G > 0) {
    if (groups == G) return Dots<G>(q, dim, key, scores, stride);
    DotsOf<G - 1>(groups, q, dim, key, scores, stride);
  }
}

// out[g] = sum over t of weights[g][t] * value_t, each element one FMA chain in key order from 0. Eight
// vectors of the dimension at a time stay in registers across all keys (a bfloat16 entry is widened in
// registers), instead of a load and store of the output per key.
void WeightedValues(const Problem& p, int64_t row, int64_t head, int64_t first, int64_t count,
                    const float* weights, float* out, std::vector<float>& entry) {
  constexpr int64_t kChunk = 64;  // dimension values per pass: 8 accumulators
  const int64_t base = ((row * p.c.kv_heads + head) * p.c.length + first) * p.c.dim;
  for (int64_t g = 0; g < p.groups; ++g) {
    const float* w = weights + g * count;
    float* o = out + g * p.c.dim;
    int64_t d0 = 0;
    for (; d0 + kChunk <= p.c.dim; d0 += kChunk) {
      __m256 acc[8];
      int64_t group_of[8];  // int8 caches: which scale of an entry each of the 8 vectors uses
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) acc[v] = _mm256_setzero_ps(), group_of[v] = (d0 + 8 * v) / p.c.group;
      for (int64_t t = 0; t < count; ++t) {
        const __m256 wt = _mm256_set1_ps(w[t]);
        if (p.c.storage == Storage::kInt8) {
          const int8_t* src = static_cast<const int8_t*>(p.c.v) + base + t * p.c.dim + d0;
          const float* scale = p.c.v_scale + (base / p.c.dim + t) * p.c.scale_groups;
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v) {
            const __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8 * v)));
            const __m256 value = _mm256_mul_ps(_mm256_cvtepi32_ps(wide), _mm256_set1_ps(scale[group_of[v]]));
            acc[v] = _mm256_fmadd_ps(wt, value, acc[v]);
          }
        } else if (p.c.storage == Storage::kBf16) {
          const uint16_t* src = static_cast<const uint16_t*>(p.c.v) + base + t * p.c.dim + d0;
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v) {
            const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 8 * v)));
            acc[v] = _mm256_fmadd_ps(wt, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)), acc[v]);
          }
        } else {
          const float* src = static_cast<const float*>(p.c.v) + base + t * p.c.dim + d0;
#pragma GCC unroll 8
          for (int v = 0; v < 8; ++v) acc[v] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(src + 8 * v), acc[v]);
        }
      }
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) _mm256_storeu_ps(o + d0 + 8 * v, acc[v]);
    }
    if (d0 < p.c.dim) {  // a dimension that is not a multiple of 64: the rest element by element, same chains
      std::fill(o + d0, o + p.c.dim, 0.0f);
      for (int64_t t = 0; t < count; ++t) {
        const float* value = Entry(p.c, p.c.v, p.c.v_scale, row, head, first + t, entry.data());
        for (int64_t d = d0; d < p.c.dim; ++d) o[d] = std::fmaf(w[t], value[d], o[d]);
      }
    }
  }
}

// Scores -> exp(score - max) in place, eight keys at a time; returns their sum (eight lane sums in key
// order, then the lanes in a fixed order).
float Softmax(float* scores, int64_t count) {
  __m256 top = _mm256_set1_ps(scores[0]);
  int64_t t = 0;
  for (; t + 8 <= count; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + t));
  float top_value = flaxchat::MaxLanes(top);
  for (; t < count; ++t) top_value = std::max(top_value, scores[t]);
  const __m256 shift = _mm256_set1_ps(top_value);
  __m256 sum = _mm256_setzero_ps();
  for (t = 0; t < count; t += 8) {
    const int64_t n = std::min<int64_t>(8, count - t);
    alignas(32) float lanes[8] = {};
    std::copy(scores + t, scores + t + n, lanes);
    alignas(32) float weights[8];
    _mm256_store_ps(weights, flaxchat::Exp(_mm256_sub_ps(_mm256_load_ps(lanes), shift)));
    std::fill(weights + n, weights + 8, 0.0f);
    std::copy(weights, weights + n, scores + t);
    sum = _mm256_add_ps(sum, _mm256_load_ps(weights));
  }
  return flaxchat::SumLanes(sum);
}

void OneHead(const Problem& p, int64_t b, int64_t h, std::vector<float>& scores, std::vector<float>& entry) {
  float* out = p.out + ((b * p.c.kv_heads + h) * p.groups) * p.c.dim;
  const int64_t row = p.rows[b];
  if (row < 0 || row >= p.c.cache_rows) {  // a padding row: its output is discarded
    std::fill(out, out + p.groups * p.c.dim, 0.0f);
    return;
  }
  const int64_t last = std::min<int64_t>(p.positions[b], p.c.length - 1);
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, last - p.window + 1) : 0;
  const int64_t count = last - first + 1;
  const float* q = p.q + ((b * p.c.kv_heads + h) * p.groups) * p.c.dim;
  scores.resize(p.groups * count);
  entry.resize(p.c.dim);
  for (int64_t t = 0; t < count; ++t) {
    const float* key = Entry(p.c, p.c.k, p.c.k_scale, row, h, first + t, entry.data());
    for (int64_t g = 0; g < p.groups; g += kGroupsTogether) {
      DotsOf(std::min<int64_t>(kGroupsTogether, p.groups - g), q + g * p.c.dim, p.c.dim, key,
             scores.data() + g * count + t, count);
    }
  }
  float total[64];  // groups per kv head (checked at the call)
  for (int64_t g = 0; g < p.groups; ++g) total[g] = Softmax(scores.data() + g * count, count);
  WeightedValues(p, row, h, first, count, scores.data(), out, entry);
  for (int64_t g = 0; g < p.groups; ++g) {
    const float inverse = 1.0f / total[g];
    for (int64_t d = 0; d < p.c.dim; ++d) out[g * p.c.dim + d] *= inverse;
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> rows,
                           ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> window,
                           ffi::ResultBuffer<ffi::F32> out) {
  Caches caches;
  if (ffi::Error error = flaxchat::LayerOf("decode_attention", k, v, k_scale, v_scale, layer, caches); error.failure()) {
    return error;
  }
  const auto qd = q.dimensions();
  if (qd.size() != 4 || qd[1] != caches.kv_heads || qd[3] != caches.dim || rows.element_count() != qd[0] ||
      positions.element_count() != qd[0] || window.element_count() != 1) {
    return ffi::Error::InvalidArgument("decode_attention: q [B, KV, G, D], rows/positions [B], window a scalar");
  }
  if (qd[2] > 64) return ffi::Error::InvalidArgument("decode_attention: at most 64 query heads per kv head");
  const Problem problem{q.typed_data(), caches, rows.typed_data(), positions.typed_data(), out->typed_data(), qd[0],
                        qd[2], 1, window.typed_data()[0]};
  int64_t work = 0;  // visible keys in all rows: not worth a helper when small
  for (int64_t b = 0; b < qd[0]; ++b) work += std::min<int64_t>(positions.typed_data()[b], caches.length - 1) + 1;
  flaxchat::ParallelFor(pool, qd[0] * qd[1], work * qd[1] * qd[2] * qd[3] / (1 << 16), [problem](int64_t item) {
    thread_local std::vector<float> scores, entry;
    OneHead(problem, item / problem.c.kv_heads, item % problem.c.kv_heads, scores, entry);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatDecodeAttention, DecodeAttention, FLAXCHAT_ATTENTION_BINDING());
