// Exact nearest-code search on AVX-512, fused: every similarity is computed, compared and dropped in
// registers. See unitok/native/__init__.py for why this is hand-written and how it is built and checked.
//
// Reference: for each sub-codebook k and token i, argmax_j <z[k, i], c[k, j]> with every similarity
// the in-order float32 FMA chain s = fma(z[d-1], c[d-1], ... fma(z[1], c[1], z[0] * c[0])) (what the
// CPU GEMM computes at these widths; the Python side confirms it on the running machine), and the
// first index among equal maxima.
//
// Layout: z (K, N, d) float32 contiguous; codes (K, nb, d, 16) float32, block b holding coordinate i
// of codes 16b .. 16b + 15 at [k, b, i, :], with NaN for the padding codes past n (a NaN never
// compares greater, so a padding code is never taken); out (K, N) int64.
//
// Each lane of a 16-wide register follows its own subset of codes (lane l: codes 16b + l); it keeps
// the largest similarity seen so far and the block it came from, and replaces them only on a strictly
// greater value, so within a lane the first of equal maxima stays. The 16 lanes are then reduced to
// the largest value and, among equal values, the smallest code index.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

extern "C" int unitok_cpu_has_avx512f() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }

#pragma GCC push_options
#pragma GCC target("avx512f,fma")

namespace {

constexpr int kLanes = 16;
constexpr int kTokens = 8;  // tokens scored against each block while its codes sit in registers

// Tokens [begin, end) of one sub-codebook. D > 0: the code width known at compile time (the block's
// coordinates stay in registers across the kTokens tokens); D == 0: the width d read at run time.
template <int D>
void search_rows(const float* z, const float* codes, int64_t d_run, int64_t n_blocks, int64_t begin,
                 int64_t end, int64_t* out) {
  const int64_t d = D > 0 ? D : d_run;
  for (int64_t s = begin; s < end; s += kTokens) {
    const float* zt[kTokens];
    for (int t = 0; t < kTokens; ++t) zt[t] = z + std::min(s + t, end - 1) * d;  // a short group repeats its last token
    __m512 best[kTokens];
    __m512i block_of_best[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      best[t] = _mm512_set1_ps(-INFINITY);
      block_of_best[t] = _mm512_setzero_si512();
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
      const float* c = codes + b * d * kLanes;
      const __m512i block = _mm512_set1_epi32(static_cast<int32_t>(b));
      for (int t = 0; t < kTokens; ++t) {
        __m512 acc = _mm512_mul_ps(_mm512_set1_ps(zt[t][0]), _mm512_loadu_ps(c));
        for (int64_t i = 1; i < d; ++i)
          acc = _mm512_fmadd_ps(_mm512_set1_ps(zt[t][i]), _mm512_loadu_ps(c + i * kLanes), acc);
        const __mmask16 greater = _mm512_cmp_ps_mask(acc, best[t], _CMP_GT_OQ);
        best[t] = _mm512_mask_mov_ps(best[t], greater, acc);
        block_of_best[t] = _mm512_mask_mov_epi32(block_of_best[t], greater, block);
      }
    }
    for (int t = 0; t < kTokens && s + t < end; ++t) {
      alignas(64) float value[kLanes];
      alignas(64) int32_t block[kLanes];
      _mm512_store_ps(value, best[t]);
      _mm512_store_si512(reinterpret_cast<__m512i*>(block), block_of_best[t]);
      float top = value[0];
      int64_t code = static_cast<int64_t>(block[0]) * kLanes;
      for (int l = 1; l < kLanes; ++l) {
        const int64_t j = static_cast<int64_t>(block[l]) * kLanes + l;
        if (value[l] > top || (value[l] == top && j < code)) {
          top = value[l];
          code = j;
        }
      }
      out[s + t] = code;
    }
  }
}

using SearchFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t*);

SearchFn pick(int64_t d) {
  switch (d) {
    case 4: return search_rows<4>;
    case 8: return search_rows<8>;
    case 16: return search_rows<16>;
    default: return search_rows<0>;
  }
}

}  // namespace

// Returns 0 on success, 1 if the CPU lacks AVX-512F, 2 on bad arguments, 3 if a thread failed.
extern "C" int unitok_nearest_code(const float* z, const float* codes, int64_t K, int64_t N, int64_t d,
                                   int64_t n_blocks, int64_t* out, int64_t n_threads) {
  if (!unitok_cpu_has_avx512f()) return 1;
  if (K < 0 || N < 0 || d < 1 || n_blocks < 1 || n_threads < 1) return 2;
  const SearchFn search = pick(d);
  // Work is the flat range of (k, i) rows, split into equal contiguous parts, one per thread; a part
  // may span two sub-codebooks.
  const int64_t rows = K * N;
  auto run = [&](int64_t lo, int64_t hi) {
    while (lo < hi) {
      const int64_t k = lo / N, i = lo - k * N;
      const int64_t stop = std::min(hi - k * N, N);
      search(z + k * N * d, codes + k * n_blocks * d * kLanes, d, n_blocks, i, stop, out + k * N);
      lo = k * N + stop;
    }
  };
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(n_threads, rows / kTokens));
  std::vector<std::thread> workers;
  int status = 0;
  try {
    workers.reserve(static_cast<size_t>(parts - 1));
    for (int64_t p = 1; p < parts; ++p)
      workers.emplace_back(run, rows * p / parts, rows * (p + 1) / parts);
  } catch (const std::exception&) {
    status = 3;  // the threads that did start still finish their parts and are joined below
  }
  if (status == 0) run(0, rows / parts);
  for (auto& w : workers) w.join();
  return status;
}

#pragma GCC pop_options
