// Decode attention: one new query position per row over that row's KV cache.
//   q [B, KV, G, D] float32 (already scaled by D^-0.5), caches [R, KV, S, D] (float32, or bfloat16 stored
//   as uint16 bits), rows [B] (cache row of each batch row; >= R marks a padding row), positions [B]
//   (the query's position: keys 0..position are visible, or the last `window` of them)
//   -> out [B, KV, G, D] float32.
//
// Why a kernel (profiled, bench/RESULTS.md): XLA:CPU ran the blockwise online softmax as a while loop of
// ~20 small operations per cache block and layer, a fifth of a one-row decode step in dispatch overhead.
//
// Batch invariance by construction: each (row, kv head) is computed alone by the same code — scores in
// key order, the max, exponentials and their sum in key order, the weighted sum of values in key order —
// so a row's bits depend only on its own query and cache entries, never on the other rows or the bucket.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  bool bf16;
  const int32_t* rows;
  const int32_t* positions;
  float* out;
  int64_t batch, kv_heads, groups, dim, cache_rows, length, window;
};

inline float Bf16ToFloat(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// Entry t of a cache row/head as floats into `dst` (dim values).
inline void Load(const Problem& p, const void* cache, int64_t row, int64_t head, int64_t t, float* dst) {
  const int64_t offset = ((row * p.kv_heads + head) * p.length + t) * p.dim;
  if (p.bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(cache) + offset;
    for (int64_t d = 0; d < p.dim; ++d) dst[d] = Bf16ToFloat(src[d]);
  } else {
    std::memcpy(dst, static_cast<const float*>(cache) + offset, p.dim * sizeof(float));
  }
}

inline float Dot(const float* a, const float* b, int64_t n) {  // fixed order: lanes, then lanes summed
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
  for (; i < n; ++i) s = std::fmaf(a[i], b[i], s);
  return s;
}

void OneHead(const Problem& p, int64_t b, int64_t h, std::vector<float>& scores, std::vector<float>& entry) {
  float* out = p.out + ((b * p.kv_heads + h) * p.groups) * p.dim;
  const int64_t row = p.rows[b];
  if (row < 0 || row >= p.cache_rows) {  // a padding row: its output is discarded
    std::fill(out, out + p.groups * p.dim, 0.0f);
    return;
  }
  const int64_t last = std::min<int64_t>(p.positions[b], p.length - 1);
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, last - p.window + 1) : 0;
  const int64_t count = last - first + 1;
  const float* q = p.q + ((b * p.kv_heads + h) * p.groups) * p.dim;
  scores.resize(p.groups * count);
  entry.resize(p.dim);
  for (int64_t t = 0; t < count; ++t) {
    Load(p, p.k, row, h, first + t, entry.data());
    for (int64_t g = 0; g < p.groups; ++g) scores[g * count + t] = Dot(q + g * p.dim, entry.data(), p.dim);
  }
  std::vector<float> total(p.groups);
  for (int64_t g = 0; g < p.groups; ++g) {
    float* s = scores.data() + g * count;
    float top = s[0];
    for (int64_t t = 1; t < count; ++t) top = std::max(top, s[t]);
    float sum = 0.0f;
    for (int64_t t = 0; t < count; ++t) {
      s[t] = std::exp(s[t] - top);
      sum += s[t];
    }
    total[g] = sum;
    std::fill(out + g * p.dim, out + (g + 1) * p.dim, 0.0f);
  }
  for (int64_t t = 0; t < count; ++t) {
    Load(p, p.v, row, h, first + t, entry.data());
    for (int64_t g = 0; g < p.groups; ++g) {
      const __m256 w = _mm256_set1_ps(scores[g * count + t]);
      float* o = out + g * p.dim;
      int64_t d = 0;
      for (; d + 8 <= p.dim; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(w, _mm256_loadu_ps(entry.data() + d), _mm256_loadu_ps(o + d)));
      for (; d < p.dim; ++d) o[d] = std::fmaf(scores[g * count + t], entry[d], o[d]);
    }
  }
  for (int64_t g = 0; g < p.groups; ++g) {
    const float inverse = 1.0f / total[g];
    for (int64_t d = 0; d < p.dim; ++d) out[g * p.dim + d] *= inverse;
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> positions,
                           ffi::ResultBuffer<ffi::F32> out, int64_t window) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || kd[1] != qd[1] || kd[3] != qd[3] ||
      v.element_count() != k.element_count() || k.element_type() != v.element_type() || rows.element_count() != qd[0] ||
      positions.element_count() != qd[0]) {
    return ffi::Error::InvalidArgument("decode_attention: q [B, KV, G, D], caches [R, KV, S, D], rows/positions [B]");
  }
  const bool bf16 = k.element_type() == ffi::DataType::U16;
  if (!bf16 && k.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("decode_attention: caches must be float32 or bfloat16 bits (uint16)");
  }
  const Problem problem{q.typed_data(), k.untyped_data(), v.untyped_data(), bf16, rows.typed_data(),
                        positions.typed_data(), out->typed_data(), qd[0], qd[1], qd[2], qd[3], kd[0], kd[2], window};
  int64_t work = 0;  // visible keys in all rows: not worth a helper when small
  for (int64_t b = 0; b < qd[0]; ++b) work += std::min<int64_t>(positions.typed_data()[b], kd[2] - 1) + 1;
  flaxchat::ParallelFor(pool, qd[0] * qd[1], work * qd[1] * qd[2] * qd[3] / (1 << 16), [problem](int64_t item) {
    thread_local std::vector<float> scores, entry;
    OneHead(problem, item / problem.kv_heads, item % problem.kv_heads, scores, entry);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window"));
