// Exact nearest-code search on x86 (AVX-512, or AVX2 with FMA), fused: every similarity is computed,
// compared and dropped in registers. See unitok/native/__init__.py for why this is hand-written and how
// it is built and checked.
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
// Each of the 16 lanes of a block (one 512-bit register, or two 256-bit halves) follows its own subset
// of codes (lane l: codes 16b + l); it keeps the largest similarity seen so far and the block it came
// from, and replaces them only on a strictly greater value, so within a lane the first of equal maxima
// stays. The 16 lanes are then reduced to the largest value and, among equal values, the smallest code
// index. Both instruction sets compute the same chain per code, so they return the same codes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace {

constexpr int kLanes = 16;
constexpr int kTokens = 8;  // AVX-512: tokens scored against each block while its codes sit in registers

// The 16 lanes' best values and blocks -> the code with the largest value, the smallest index among
// equal values (lane l of block b is code 16b + l).
int64_t reduce_lanes(const float* value, const int32_t* block) {
  float top = value[0];
  int64_t code = static_cast<int64_t>(block[0]) * kLanes;
  for (int l = 1; l < kLanes; ++l) {
    const int64_t j = static_cast<int64_t>(block[l]) * kLanes + l;
    if (value[l] > top || (value[l] == top && j < code)) {
      top = value[l];
      code = j;
    }
  }
  return code;
}

using SearchFn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t*);

// The search compiled for code width d: one unrolled for 4, 8 or 16, else the one that reads d at run time.
template <SearchFn W4, SearchFn W8, SearchFn W16, SearchFn Any>
SearchFn for_width(int64_t d) {
  return d == 4 ? W4 : d == 8 ? W8 : d == 16 ? W16 : Any;
}

}  // namespace

extern "C" int unitok_cpu_has_avx512f() { return __builtin_cpu_supports("avx512f") ? 1 : 0; }
extern "C" int unitok_cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

#pragma GCC push_options
#pragma GCC target("avx512f,fma")

namespace {

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
      out[s + t] = reduce_lanes(value, block);
    }
  }
}

}  // namespace

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int kHalf = 8;              // lanes of a 256-bit register: a block is two halves
constexpr int kUnroll = 4;            // blocks scored at once: 8 independent FMA chains hide their latency
constexpr int64_t kChunk = 32;        // blocks per pass (a multiple of kUnroll): 16 KiB at d = 8, kept in L1
constexpr int64_t kGroup = 256;       // tokens whose running best values are kept between passes

// One token's running best values and blocks (two halves each), held in registers over a chunk.
struct Best {
  __m256 lo, hi, lo_block, hi_block;
};

// Scores blocks [b, b + U) for one token and folds them into `best` in increasing block order, so the
// strict comparison keeps the first of equal maxima as the one-block loop would.
template <int D, int U>
inline void scan_blocks(const float* zt, const float* codes, int64_t d_run, int64_t b, Best& best) {
  const int64_t d = D > 0 ? D : d_run;
  const float* c = codes + b * d * kLanes;
  __m256 lo[U], hi[U];
  const __m256 z0 = _mm256_set1_ps(zt[0]);
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    lo[u] = _mm256_mul_ps(z0, _mm256_loadu_ps(c + u * d * kLanes));
    hi[u] = _mm256_mul_ps(z0, _mm256_loadu_ps(c + u * d * kLanes + kHalf));
  }
  for (int64_t i = 1; i < d; ++i) {
    const __m256 zi = _mm256_set1_ps(zt[i]);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      lo[u] = _mm256_fmadd_ps(zi, _mm256_loadu_ps(c + u * d * kLanes + i * kLanes), lo[u]);
      hi[u] = _mm256_fmadd_ps(zi, _mm256_loadu_ps(c + u * d * kLanes + i * kLanes + kHalf), hi[u]);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    const __m256 block = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int32_t>(b + u)));
    const __m256 greater_lo = _mm256_cmp_ps(lo[u], best.lo, _CMP_GT_OQ);
    const __m256 greater_hi = _mm256_cmp_ps(hi[u], best.hi, _CMP_GT_OQ);
    best.lo = _mm256_blendv_ps(best.lo, lo[u], greater_lo);
    best.hi = _mm256_blendv_ps(best.hi, hi[u], greater_hi);
    best.lo_block = _mm256_blendv_ps(best.lo_block, block, greater_lo);
    best.hi_block = _mm256_blendv_ps(best.hi_block, block, greater_hi);
  }
}

// AVX2 has 16 vector registers, too few to keep a block's codes and several tokens' state at once,
// so the loop order differs from the AVX-512 one: the codebook is streamed in L1-sized chunks, each
// token of a group scans a chunk kUnroll blocks at a time with its running best in registers, then
// parks it until the next chunk. Same chain, same comparisons, same order of blocks per lane.
template <int D>
void search_rows_avx2(const float* z, const float* codes, int64_t d_run, int64_t n_blocks, int64_t begin,
                      int64_t end, int64_t* out) {
  const int64_t d = D > 0 ? D : d_run;
  alignas(32) float value[kGroup][kLanes];
  alignas(32) int32_t block_of[kGroup][kLanes];
  for (int64_t g = begin; g < end; g += kGroup) {
    const int64_t n_tokens = std::min(kGroup, end - g);
    for (int64_t t = 0; t < n_tokens; ++t) {
      std::fill(value[t], value[t] + kLanes, -INFINITY);
      std::fill(block_of[t], block_of[t] + kLanes, 0);
    }
    for (int64_t b0 = 0; b0 < n_blocks; b0 += kChunk) {
      const int64_t b1 = std::min(n_blocks, b0 + kChunk);
      for (int64_t t = 0; t < n_tokens; ++t) {
        const float* zt = z + (g + t) * d;
        Best best{_mm256_load_ps(value[t]), _mm256_load_ps(value[t] + kHalf),
                  _mm256_load_ps(reinterpret_cast<const float*>(block_of[t])),
                  _mm256_load_ps(reinterpret_cast<const float*>(block_of[t] + kHalf))};
        int64_t b = b0;
        for (; b + kUnroll <= b1; b += kUnroll) scan_blocks<D, kUnroll>(zt, codes, d, b, best);
        for (; b < b1; ++b) scan_blocks<D, 1>(zt, codes, d, b, best);
        _mm256_store_ps(value[t], best.lo);
        _mm256_store_ps(value[t] + kHalf, best.hi);
        _mm256_store_ps(reinterpret_cast<float*>(block_of[t]), best.lo_block);
        _mm256_store_ps(reinterpret_cast<float*>(block_of[t] + kHalf), best.hi_block);
      }
    }
    for (int64_t t = 0; t < n_tokens; ++t) out[g + t] = reduce_lanes(value[t], block_of[t]);
  }
}

}  // namespace

#pragma GCC pop_options

// isa: 2 for AVX-512, 1 for AVX2 with FMA. Returns 0 on success, 1 if the CPU lacks that instruction
// set, 2 on bad arguments, 3 if a thread failed.
extern "C" int unitok_nearest_code(const float* z, const float* codes, int64_t K, int64_t N, int64_t d,
                                   int64_t n_blocks, int64_t* out, int64_t n_threads, int64_t isa) {
  if (isa != 1 && isa != 2) return 2;
  if (isa == 2 ? !unitok_cpu_has_avx512f() : !unitok_cpu_has_avx2()) return 1;
  if (K < 0 || N < 0 || d < 1 || n_blocks < 1 || n_threads < 1) return 2;
  const SearchFn search =
      isa == 2 ? for_width<search_rows<4>, search_rows<8>, search_rows<16>, search_rows<0>>(d)
               : for_width<search_rows_avx2<4>, search_rows_avx2<8>, search_rows_avx2<16>, search_rows_avx2<0>>(d);
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
