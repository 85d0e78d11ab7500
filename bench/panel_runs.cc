// Standalone measurement behind model/kernels/qmatmul.h's PanelGrain (bench/RESULTS.md, fourteenth session):
// one row times ~107M 4-bit weights in the kernels' panel layout (codes [panels, K, 16], float32 or float16
// scale/offset [panels, K / 32, 32]), the kernels' arithmetic, threads claiming CHUNK consecutive panels at a
// time. Prints the best of 15 runs for float32 and float16 scales.
//   g++ -O3 -mavx2 -mfma -mf16c -ffp-contract=off -std=c++17 -pthread bench/panel_runs.cc -o /tmp/panel_runs
//   /tmp/panel_runs THREADS CHUNK      (e.g. 2 1, 2 16)
#include <immintrin.h>
#include <cstdlib>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>
#include <atomic>
#include <algorithm>
constexpr int64_t kBlock = 32, kPanel = 32; int64_t CH = 16;
inline void Row4(const uint8_t* row, __m256i c[4]) {
  const __m256i low = _mm256_set1_epi32(15);
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)));
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8)));
  c[0] = _mm256_and_si256(a, low); c[1] = _mm256_and_si256(b, low);
  c[2] = _mm256_srli_epi32(a, 4); c[3] = _mm256_srli_epi32(b, 4);
}
template <bool F16>
void Panel(const float* x, const uint8_t* codes, const void* scale, const void* offset, float* y, int64_t K, int64_t p) {
  __m256 acc[4];
  for (int v = 0; v < 4; ++v) acc[v] = _mm256_setzero_ps();
  const uint8_t* c = codes + p * K * 16;
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m256 s[4], o[4];
    if (F16) {
      const uint16_t* sp = (const uint16_t*)scale + (p * (K / kBlock) + b) * kPanel;
      const uint16_t* op = (const uint16_t*)offset + (p * (K / kBlock) + b) * kPanel;
      for (int v = 0; v < 4; ++v) {
        s[v] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + 8 * v)));
        o[v] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(op + 8 * v)));
      }
    } else {
      const float* sp = (const float*)scale + (p * (K / kBlock) + b) * kPanel;
      const float* op = (const float*)offset + (p * (K / kBlock) + b) * kPanel;
      for (int v = 0; v < 4; ++v) { s[v] = _mm256_loadu_ps(sp + 8 * v); o[v] = _mm256_loadu_ps(op + 8 * v); }
    }
    for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) {
      __m256i ci[4]; Row4(c + k * 16, ci);
      const __m256 xv = _mm256_broadcast_ss(x + k);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) {
        __m256 w = _mm256_fmadd_ps(s[v], _mm256_cvtepi32_ps(ci[v]), o[v]);
        acc[v] = _mm256_fmadd_ps(xv, w, acc[v]);
      }
    }
  }
  for (int v = 0; v < 4; ++v) _mm256_storeu_ps(y + p * kPanel + 8 * v, acc[v]);
}
int main(int argc, char** argv) {
  const int64_t K = 576, N = 32 * 5824;  // ~107M weights
  const int threads = atoi(argv[1]); CH = atoi(argv[2]);
  std::vector<uint8_t> codes(N / kPanel * K * 16, 0x5a);
  std::vector<float> s32(N / kPanel * K / kBlock * kPanel, 0.01f), o32(s32.size(), -0.05f);
  std::vector<uint16_t> s16(s32.size(), 0x2000), o16(s32.size(), 0xa000);
  std::vector<float> x(K, 0.5f), y(N);
  for (int variant = 0; variant < 2; ++variant) {
    double best = 1e9;
    for (int rep = 0; rep < 15; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      std::atomic<int64_t> next{0};
      auto work = [&]() {
        for (int64_t p; (p = next.fetch_add(CH)) < N / kPanel;)
          for (int64_t q = p; q < std::min<int64_t>(p + CH, N / kPanel); ++q)
            variant ? Panel<true>(x.data(), codes.data(), s16.data(), o16.data(), y.data(), K, q)
                    : Panel<false>(x.data(), codes.data(), s32.data(), o32.data(), y.data(), K, q);
      };
      std::vector<std::thread> ts;
      for (int t = 1; t < threads; ++t) ts.emplace_back(work);
      work();
      for (auto& t : ts) t.join();
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      best = std::min(best, ms);
    }
    double bytes = codes.size() + (variant ? 2.0 : 4.0) * 2 * s32.size();
    printf("threads %d %s: %.2f ms, %.1f MB, %.1f GB/s\n", threads, variant ? "f16" : "f32", best, bytes / 1e6, bytes / best / 1e6);
  }
}
