// Attention of T new query positions per row over that row's KV cache (which already holds them): a prompt
// chunk's, or a decode step's one (T = 1), by the same arithmetic, so a position's keys and values are the
// same whichever kind of call wrote them (decoded tokens' blocks can then serve as cached prefix).
//   q [B, KV, G * T, D] float32 (already scaled by D^-0.5; row g * T + t is query head g at position t),
//   caches [L, R, KV, S, D] (cache_entries.h), rows [B] (>= R: a padding row),
//   positions [B, T] (a query at position p sees keys <= p, or the last `window` of them; window <= 0: all),
//   layer and window int32 scalars, lengths [B] (row b's first lengths[b] positions are real; the rest pad a
//   bucket and are not computed: their output is zero) -> out [B, KV, G * T, D] float32.
//
// Why a kernel (measured, bench/RESULTS.md): XLA:CPU ran the blockwise online softmax of a prompt chunk
// over a long cached prefix (a chat's next turn, a shared system prompt) at ~30-40 GFLOP/s, about as long as
// the chunk's matmuls; this keeps a block of keys and values in L1 and runs register-blocked tiles over it.
//
// Chunk invariance by construction (the prefix cache relies on it, sampling/steps.py): every query row
// is computed alone by one fixed sequence that depends only on its own query, position and cache entries —
// cache blocks of kKeys keys aligned to absolute positions, visited in order wherever the row sees a key;
// in each, scores as one FMA chain over the dimension, the block's max, exponentials (Exp below), their
// sum in a fixed order, the running output rescaled and then one FMA chain over the block's keys. Tiles
// group rows only to share loads, so how a prompt is cut into chunks, where a chunk starts and which other
// rows or positions share the call never move a row's bits.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cache_entries.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using flaxchat::Caches;
using flaxchat::Entry;
using flaxchat::Exp;
using flaxchat::MaxLanes;
using flaxchat::SumLanes;

constexpr int64_t kKeys = 64;     // keys per cache block (blocks start at multiples of kKeys)
constexpr int64_t kPositions = 16;  // query positions per work item (x G query heads = the item's rows)
constexpr int kTileRows = 6;       // rows per register tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using Problem = flaxchat::AttentionProblem;

// One query row of a work item: where it reads and writes, the keys it sees and its online softmax.
struct QueryRow {
  const float* q;
  float* out;  // accumulates the unnormalised output until the end
  int64_t lo, hi;  // visible keys lo..hi
  float top, total;
};

struct Scratch {
  std::vector<float> keys;    // [D, kKeys]: the block's keys, transposed (zero past the cache)
  std::vector<float> values;  // [kKeys, D]
  std::vector<float> scores;  // [active rows, kKeys]
  std::vector<float> entry;   // [kKeys, D]: the keys before the transpose
  std::vector<QueryRow> rows;
  std::vector<QueryRow*> active;
};

// dst[j][i] = src[i][j] for an 8 x 8 tile of floats.
inline void Transpose8(const float* src, int64_t src_stride, float* dst, int64_t dst_stride) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * dst_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// The block's keys (transposed, [D, kKeys]) and values ([kKeys, D]) as float32, zero past `count`.
void LoadBlock(const Problem& p, int64_t row, int64_t head, int64_t first, int64_t count, Scratch& s) {
  const int64_t dim = p.c.dim;
  s.keys.resize(dim * kKeys);
  s.values.resize(kKeys * dim);
  s.entry.resize(kKeys * dim);  // the keys as rows, before the transpose
  for (int64_t t = 0; t < count; ++t) {
    float* key = s.entry.data() + t * dim;
    const float* k = Entry(p.c, p.c.k, p.c.k_scale, row, head, first + t, key);
    if (k != key) std::copy(k, k + dim, key);  // a float32 cache: a pointer into it
    float* value = s.values.data() + t * dim;
    const float* v = Entry(p.c, p.c.v, p.c.v_scale, row, head, first + t, value);
    if (v != value) std::copy(v, v + dim, value);
  }
  std::fill(s.entry.begin() + count * dim, s.entry.end(), 0.0f);
  std::fill(s.values.begin() + count * dim, s.values.end(), 0.0f);
  for (int64_t t = 0; t < kKeys; t += 8) {
    for (int64_t d = 0; d < dim; d += 8) Transpose8(s.entry.data() + t * dim + d, dim, s.keys.data() + d * kKeys + t, kKeys);
  }
}

// Scores of R rows against keys [column, column + 16) of the block: score = chain of FMAs over d from 0.
template <int R>
void ScoreTile(QueryRow* const* rows, const float* keys, int64_t dim, float* scores, int64_t column) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; ++d) {
    const __m256 k0 = _mm256_loadu_ps(keys + d * kKeys + column), k1 = _mm256_loadu_ps(keys + d * kKeys + column + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(rows[r]->q + d);
      acc[r][0] = _mm256_fmadd_ps(x, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, k1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(scores + r * kKeys + column, acc[r][0]);
    _mm256_storeu_ps(scores + r * kKeys + column + 8, acc[r][1]);
  }
}

// out[d0, d0 + 16) of R rows += sum over the block's keys t of weight[t] * value_t[d], in key order.
template <int R>
void ValueTile(QueryRow* const* rows, const float* values, int64_t dim, const float* weights, int64_t count,
               int64_t d0) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r][0] = _mm256_loadu_ps(rows[r]->out + d0);
    acc[r][1] = _mm256_loadu_ps(rows[r]->out + d0 + 8);
  }
  for (int64_t t = 0; t < count; ++t) {
    const __m256 v0 = _mm256_loadu_ps(values + t * dim + d0), v1 = _mm256_loadu_ps(values + t * dim + d0 + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 w = _mm256_broadcast_ss(weights + r * kKeys + t);
      acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(rows[r]->out + d0, acc[r][0]);
    _mm256_storeu_ps(rows[r]->out + d0 + 8, acc[r][1]);
  }
}

template <int R = kTileRows>
void Scores(int64_t n, QueryRow* const* rows, const float* keys, int64_t dim, float* scores, int64_t column) {
  if constexpr (R > 0) {
    if (n == R) return ScoreTile<R>(rows, keys, dim, scores, column);
    Scores<R - 1>(n, rows, keys, dim, scores, column);
  }
}

template <int R = kTileRows>
void Values(int64_t n, QueryRow* const* rows, const float* values, int64_t dim, const float* weights, int64_t count,
            int64_t d0) {
  if constexpr (R > 0) {
    if (n == R) return ValueTile<R>(rows, values, dim, weights, count, d0);
    Values<R - 1>(n, rows, values, dim, weights, count, d0);
  }
}

// The online softmax step of one row over one block: its scores become weights (0 where it sees no key),
// its running output is rescaled to the new max, its total gains the block's sum.
void Softmax(QueryRow& row, int64_t first, float* scores, int64_t dim) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 visible[kKeys / 8];
  __m256 top = _mm256_set1_ps(kNegInf);
  for (int64_t v = 0; v < kKeys / 8; ++v) {
    const __m256i key = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(first + 8 * v)), lanes);
    const __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(row.lo)), key);
    const __m256i above = _mm256_cmpgt_epi32(key, _mm256_set1_epi32(static_cast<int32_t>(row.hi)));
    visible[v] = _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_or_si256(below, above), _mm256_set1_epi32(-1)));
    top = _mm256_max_ps(top, _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_loadu_ps(scores + 8 * v), visible[v]));
  }
  const float new_top = std::max(row.top, MaxLanes(top));
  const float scale = row.top == kNegInf ? 0.0f : _mm256_cvtss_f32(Exp(_mm256_set1_ps(row.top - new_top)));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t v = 0; v < kKeys / 8; ++v) {
    const __m256 w = Exp(_mm256_sub_ps(_mm256_loadu_ps(scores + 8 * v), _mm256_set1_ps(new_top)));
    const __m256 weight = _mm256_blendv_ps(_mm256_setzero_ps(), w, visible[v]);
    _mm256_storeu_ps(scores + 8 * v, weight);
    sum = _mm256_add_ps(sum, weight);
  }
  row.total = row.total * scale + SumLanes(sum);
  row.top = new_top;
  const __m256 factor = _mm256_set1_ps(scale);
  for (int64_t d = 0; d < dim; d += 8) _mm256_storeu_ps(row.out + d, _mm256_mul_ps(_mm256_loadu_ps(row.out + d), factor));
}

// Positions [t0, t0 + kPositions) of batch row b, kv head h: every query head of those positions.
void Item(const Problem& p, int64_t b, int64_t h, int64_t t0, Scratch& s) {
  const int64_t dim = p.c.dim, seq = p.seq, t1 = std::min(t0 + kPositions, seq);
  const int64_t real = std::min<int64_t>(t1, p.lengths[b]);  // positions [t0, real) are computed
  const int64_t base = (b * p.c.kv_heads + h) * p.groups * seq * dim;
  const int64_t row = p.rows[b];
  s.rows.clear();
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t offset = base + (g * seq + t) * dim;
      const int64_t hi = std::min<int64_t>(p.positions[b * seq + t], p.c.length - 1);
      const int64_t lo = p.window > 0 ? std::max<int64_t>(0, hi - p.window + 1) : 0;
      std::fill(p.out + offset, p.out + offset + dim, 0.0f);
      if (t < real) s.rows.push_back({p.q + offset, p.out + offset, lo, hi, kNegInf, 0.0f});
    }
  }
  if (row < 0 || row >= p.c.cache_rows || s.rows.empty()) return;  // padding: its output is discarded
  int64_t lo = s.rows[0].lo, hi = s.rows[0].hi;
  for (const QueryRow& r : s.rows) lo = std::min(lo, r.lo), hi = std::max(hi, r.hi);
  for (int64_t first = lo / kKeys * kKeys; first <= hi; first += kKeys) {
    const int64_t count = std::min(kKeys, p.c.length - first);
    s.active.clear();
    for (QueryRow& r : s.rows) {
      if (r.lo < first + count && r.hi >= first) s.active.push_back(&r);
    }
    if (s.active.empty()) continue;
    LoadBlock(p, row, h, first, count, s);
    const int64_t n = static_cast<int64_t>(s.active.size());
    s.scores.resize(n * kKeys);
    for (int64_t r = 0; r < n; r += kTileRows) {
      for (int64_t column = 0; column < kKeys; column += 16) {
        Scores(std::min<int64_t>(kTileRows, n - r), s.active.data() + r, s.keys.data(), dim,
               s.scores.data() + r * kKeys, column);
      }
    }
    for (int64_t r = 0; r < n; ++r) Softmax(*s.active[r], first, s.scores.data() + r * kKeys, dim);
    for (int64_t r = 0; r < n; r += kTileRows) {
      for (int64_t d0 = 0; d0 < dim; d0 += 16) {
        Values(std::min<int64_t>(kTileRows, n - r), s.active.data() + r, s.values.data(), dim,
               s.scores.data() + r * kKeys, count, d0);
      }
    }
  }
  for (QueryRow& r : s.rows) {
    const __m256 inverse = _mm256_set1_ps(1.0f / r.total);
    for (int64_t d = 0; d < dim; d += 8) _mm256_storeu_ps(r.out + d, _mm256_mul_ps(_mm256_loadu_ps(r.out + d), inverse));
  }
}

ffi::Error PrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                            ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> v_scale, ffi::Buffer<ffi::S32> rows,
                            ffi::Buffer<ffi::S32> positions, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> window,
                            ffi::Buffer<ffi::S32> lengths, ffi::ResultBuffer<ffi::F32> out) {
  Caches caches;
  if (ffi::Error error = flaxchat::LayerOf("prefill_attention", k, v, k_scale, v_scale, layer, caches);
      error.failure()) {
    return error;
  }
  const auto qd = q.dimensions(), pd = positions.dimensions();
  if (qd.size() != 4 || qd[1] != caches.kv_heads || qd[3] != caches.dim || caches.dim % 16 != 0 ||
      rows.element_count() != qd[0] || pd.size() != 2 || pd[0] != qd[0] || qd[2] % pd[1] != 0 ||
      window.element_count() != 1 || lengths.element_count() != qd[0]) {
    return ffi::Error::InvalidArgument(
        "prefill_attention: q [B, KV, G * T, D] with D a multiple of 16, rows [B], positions [B, T], window a "
        "scalar, lengths [B]");
  }
  const int64_t seq = pd[1], tiles = (seq + kPositions - 1) / kPositions;
  const Problem problem{q.typed_data(), caches, rows.typed_data(), positions.typed_data(), lengths.typed_data(),
                        out->typed_data(), qd[0], qd[2] / seq, seq, window.typed_data()[0]};
  const int64_t items = qd[0] * caches.kv_heads * tiles;
  int64_t longest = 0;
  for (int64_t i = 0; i < positions.element_count(); ++i) longest = std::max<int64_t>(longest, positions.typed_data()[i]);
  flaxchat::ParallelFor(pool, items, qd[0] * qd[2] * caches.kv_heads * caches.dim * (longest + 1) / (1 << 16),
                        [problem, tiles](int64_t item) {
                          thread_local Scratch scratch;
                          const int64_t tile = item % tiles, head = item / tiles % problem.c.kv_heads;
                          Item(problem, item / tiles / problem.c.kv_heads, head, tile * kPositions, scratch);
                        });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxchatPrefillAttention, PrefillAttention, FLAXCHAT_ATTENTION_BINDING());
