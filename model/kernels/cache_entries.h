// The KV cache as the attention kernels read it: one layer of the stacked caches [L, R, KV, S, D], entries
// stored as float32, bfloat16 (as uint16 bits) or int8 codes with float32 scales [L, R, KV, S, groups].
//
// The attention kernel (prefill_attention.cc) takes the whole stack plus the layer as an operand,
// so the model's loop over layers never slices a layer's cache out (XLA:CPU would copy it); `LayerOf`
// checks the operands once and points at the layer.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace flaxchat {

enum class Storage { kF32, kBf16, kInt8 };

struct Caches {
  const void* k;
  const void* v;
  const float* k_scale;  // int8 caches: `scale_groups` scales per entry (row, head, position); else unused
  const float* v_scale;
  Storage storage;
  int64_t scale_groups, group;  // scales per entry, elements per scale (a multiple of 8)
  int64_t cache_rows, kv_heads, length, dim;
};

inline float Bf16ToFloat(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

// Entry t of a cache row/head as floats: a pointer into a float32 cache, or `dst` filled from bfloat16
// bits (a bfloat16 is the top half of a float32: widen, shift left 16 — exact) or from int8 codes
// (code * scale, one rounding, as model/kv_cache.py's dequantize_entries computes it).
inline const float* Entry(const Caches& c, const void* cache, const float* scales, int64_t row, int64_t head,
                          int64_t t, float* dst) {
  const int64_t entry = (row * c.kv_heads + head) * c.length + t, offset = entry * c.dim;
  if (c.storage == Storage::kF32) return static_cast<const float*>(cache) + offset;
  int64_t d = 0;
  if (c.storage == Storage::kInt8) {
    const int8_t* src = static_cast<const int8_t*>(cache) + offset;
    const float* scale = scales + entry * c.scale_groups;
    for (int64_t g = 0; g < c.scale_groups; ++g) {
      const __m256 s = _mm256_set1_ps(scale[g]);
      for (const int64_t end = d + c.group; d < end; d += 8) {
        const __m256i wide = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + d)));
        _mm256_storeu_ps(dst + d, _mm256_mul_ps(_mm256_cvtepi32_ps(wide), s));
      }
    }
    return dst;
  }
  const uint16_t* src = static_cast<const uint16_t*>(cache) + offset;
  for (; d + 8 <= c.dim; d += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d)));
    _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; d < c.dim; ++d) dst[d] = Bf16ToFloat(src[d]);
  return dst;
}

// Checks the cache operands (k, v [L, R, KV, S, D]; scales [L, R, KV, S, groups] for int8, else anything)
// and returns layer `layer`'s view in `out`; `kernel` names the caller in the error.
inline xla::ffi::Error LayerOf(const char* kernel, xla::ffi::AnyBuffer k, xla::ffi::AnyBuffer v,
                               xla::ffi::Buffer<xla::ffi::F32> k_scale, xla::ffi::Buffer<xla::ffi::F32> v_scale,
                               xla::ffi::Buffer<xla::ffi::S32> layer, Caches& out) {
  namespace ffi = xla::ffi;
  const auto kd = k.dimensions();
  auto error = [kernel](const char* what) { return ffi::Error::InvalidArgument(std::string(kernel) + ": " + what); };
  if (kd.size() != 5 || v.element_count() != k.element_count() || k.element_type() != v.element_type() ||
      layer.element_count() != 1) {
    return error("caches [L, R, KV, S, D] of one type, layer a scalar");
  }
  const int64_t index = layer.typed_data()[0];
  if (index < 0 || index >= kd[0]) return error("layer out of range");
  int64_t itemsize;
  switch (k.element_type()) {
    case ffi::DataType::F32: out.storage = Storage::kF32, itemsize = 4; break;
    case ffi::DataType::U16: out.storage = Storage::kBf16, itemsize = 2; break;
    case ffi::DataType::S8: out.storage = Storage::kInt8, itemsize = 1; break;
    default: return error("caches must be float32, bfloat16 bits or int8");
  }
  const int64_t layer_entries = kd[1] * kd[2] * kd[3];  // (row, head, position) triples of one layer
  const auto sd = k_scale.dimensions();
  out.scale_groups = out.storage == Storage::kInt8 && sd.size() == 5 ? sd[4] : 1;
  if (out.storage == Storage::kInt8 &&
      (sd.size() != 5 || kd[4] % out.scale_groups != 0 || (kd[4] / out.scale_groups) % 8 != 0 ||
       k_scale.element_count() != kd[0] * layer_entries * out.scale_groups ||
       v_scale.element_count() != k_scale.element_count())) {
    return error("int8 caches need scales [L, R, KV, S, groups], groups of a multiple of 8 elements");
  }
  const int64_t layer_bytes = layer_entries * kd[4] * itemsize;
  const int64_t scale_offset = out.storage == Storage::kInt8 ? index * layer_entries * out.scale_groups : 0;
  out.k = static_cast<const char*>(k.untyped_data()) + index * layer_bytes;
  out.v = static_cast<const char*>(v.untyped_data()) + index * layer_bytes;
  out.k_scale = k_scale.typed_data() + scale_offset;
  out.v_scale = v_scale.typed_data() + scale_offset;
  out.group = kd[4] / out.scale_groups;
  out.cache_rows = kd[1], out.kv_heads = kd[2], out.length = kd[3], out.dim = kd[4];
  return ffi::Error::Success();
}

// One attention call's operands: q [B, KV, G * seq, D] (seq query positions per row; 1 for decode), the
// caches, each row's cache row and positions, the output like q, and the sliding window (0: none).
struct AttentionProblem {
  const float* q;
  Caches c;
  const int32_t* rows;
  const int32_t* positions;
  const int32_t* lengths;  // [B]: real positions per row (the rest pad the call)
  float* out;
  int64_t batch, groups, seq, window;
};

}  // namespace flaxchat

// The attention kernels' XLA binding: q, k, v, k_scale, v_scale, rows, positions, layer, window, lengths -> out.
#define FLAXCHAT_ATTENTION_BINDING()                \
  xla::ffi::Ffi::Bind()                            \
      .Ctx<xla::ffi::ThreadPool>()                 \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()      \
      .Arg<xla::ffi::AnyBuffer>()                  \
      .Arg<xla::ffi::AnyBuffer>()                  \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()      \
      .Arg<xla::ffi::Buffer<xla::ffi::F32>>()      \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()      \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()      \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()      \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()      \
      .Arg<xla::ffi::Buffer<xla::ffi::S32>>()      \
      .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
