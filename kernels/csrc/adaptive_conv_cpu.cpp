// Fast CPU kernels of the adaptive (pixel-adaptive) convolution, compiled at first use by
// ``upcli/kernels/_cpu.py`` with ``torch.utils.cpp_extension.load``.
//
//   out[b, c, h, w] = sum_{i, j < k} weights[b, h, w, i, j] * xpad[b, c, h + i, w + j]
//
// ``xpad`` is ``x`` padded by r = k // 2 (zeros / reflect / replicate), or ``x`` itself ("valid": the
// caller padded it). Three ops are registered under ``torch.ops.upcli_adaptive_conv_cpu``:
//
//   forward(x, weights, pad_mode)            -> out        [B, C, H, W]
//   forward_resampled(x, weights, pad_mode, row/col tables) -> out [B, C, H, W]  (x [B, C, h, w], resized on the fly)
//   grad_input_padded(grad_out, weights)     -> grad_xpad  [B, C, H + k - 1, W + k - 1]  (a gather, no atomics)
//   grad_weights(grad_out, x, pad_mode, k)   -> grad_w     [B, H, W, k, k]
//
// Memory traffic: one read of x (or grad_out), one write of the result, the weights once; the arithmetic is
// 2 * B * C * H * W * k * k flops per op. How the work is laid out (the same idea in all three ops):
// * Tasks are (batch, block of rows); threads take tasks from an atomic counter inside one
//   ``at::parallel_for`` (so ``torch.set_num_threads`` is honoured and uneven tasks balance).
// * Rows are copied into small, 64-byte aligned per-thread scratch buffers, already padded and with a zero
//   tail: the padding mode is an index remap in ``load_padded_row`` only, so the hot loops have no borders,
//   no branches and no partial vectors. No temporary is larger than a few rows per thread.
// * Weights [W][k*k] are transposed per row to [k*k][W] so the hot loops run unit-stride over w (the forward
//   blocks them further, per chunk of L columns, so that a chunk's weights are one contiguous block).
// * Accumulators stay in registers: the forward (k <= 7) keeps a tile of 4 output rows x 6 channels, so each
//   shifted input vector is loaded once for all the output rows that read it (about 0.5 loads per FMA);
//   grad-input keeps NC channels x NV vectors of one row, grad-weights k taps x NV vectors summed over channels.
// * For k <= 7 the taps are unrolled at compile time. In grad-input and grad-weights, with AVX-512, the j-shifted
//   vectors are made with ``valignd`` from two aligned loads instead of unaligned loads that split cache lines
//   (about 1.7x faster on Zen 5). Other k use a runtime-k path with unaligned loads.
// * Forward outputs larger than the L3 cache (32 MiB) are written with non-temporal stores: no read-for-ownership.
// * Accumulation is in the tensor's dtype (float32 or float64).
// * Outputs of 8 MiB or more get a transparent-huge-page hint (``new_output``): on the 2-core VM this was
//   written on, first-touch page faults of a fresh 77 MB output cost ~25 ms with 4 KiB pages, ~3 ms with 2 MiB.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <cstring>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

// ---- SIMD layer ------------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr bool kAvx512 = true;

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using V = __m512;
  static constexpr int L = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  using I = int32_t;  // lane index type of permute2
  using Vi = __m512i;
  static Vi loadi(const I* p) { return _mm512_loadu_si512(p); }
  static Vi addi(Vi v, int n) { return _mm512_add_epi32(v, _mm512_set1_epi32(n)); }
  // Lane q = (lo, hi)[idx[q]], idx in [0, 2L).
  static V permute2(V lo, Vi idx, V hi) { return _mm512_permutex2var_ps(lo, idx, hi); }
  // Lanes [S, S + L) of the pair (lo, hi).
  template <int S>
  static V shift(V lo, V hi) {
    if constexpr (S == 0) return lo;
    else return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(hi), _mm512_castps_si512(lo), S));
  }
};

template <>
struct Simd<double> {
  using V = __m512d;
  static constexpr int L = 8;
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_load_pd(p); }
  static V loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void storeu(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void stream(double* p, V v) { _mm512_stream_pd(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  using I = int64_t;
  using Vi = __m512i;
  static Vi loadi(const I* p) { return _mm512_loadu_si512(p); }
  static Vi addi(Vi v, int n) { return _mm512_add_epi64(v, _mm512_set1_epi64(n)); }
  static V permute2(V lo, Vi idx, V hi) { return _mm512_permutex2var_pd(lo, idx, hi); }
  template <int S>
  static V shift(V lo, V hi) {
    if constexpr (S == 0) return lo;
    else return _mm512_castsi512_pd(_mm512_alignr_epi64(_mm512_castpd_si512(hi), _mm512_castpd_si512(lo), S));
  }
};

#else
// Portable GCC/Clang vector extensions; -march decides the instructions (AVX2, NEON, SSE, ...).
constexpr bool kAvx512 = false;

template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int L = 32 / sizeof(T);
  static V zero() { return V{}; }
  static V load(const T* p) { return loadu(p); }
  static V loadu(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void storeu(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static void stream(T* p, V v) { storeu(p, v); }
  static V fma(V a, V b, V c) { return a * b + c; }
};
#endif

// NV vectors of a row from an aligned base, readable shifted right by S < L elements.
template <typename T, int NV>
struct Window {
  using S_ = Simd<T>;
  using V = typename S_::V;
#if defined(__AVX512F__)
  V a[NV + 1];
  inline void load(const T* p) {
    for (int n = 0; n <= NV; ++n) a[n] = S_::load(p + n * S_::L);
  }
  template <int S>
  inline V get(int n) const {
    static_assert(S < S_::L, "shift must be below the vector width");
    return S_::template shift<S>(a[n], a[n + 1]);
  }
#else
  const T* p;
  inline void load(const T* q) { p = q; }
  template <int S>
  inline V get(int n) const { return S_::loadu(p + n * S_::L + S); }
#endif
};

// Forces inlining of the unrolled lambdas (GCC otherwise outlines large bodies and spills the accumulators).
#define UPCLI_INLINE __attribute__((always_inline))

template <typename F, int... Is>
UPCLI_INLINE inline void unroll_impl(F&& f, std::integer_sequence<int, Is...>) {
  (f(std::integral_constant<int, Is>{}), ...);
}
// f(integral_constant<int, 0>), ..., f(integral_constant<int, N - 1>)
template <int N, typename F>
UPCLI_INLINE inline void unroll(F&& f) {
  unroll_impl(f, std::make_integer_sequence<int, N>{});
}

// Register blocking: forward / grad-input keep NC channels x NV vectors; grad-weights k taps x NVW vectors.
constexpr int kNC = kAvx512 ? 8 : 4;
constexpr int kNV = kAvx512 ? 1 : 2;
constexpr int kNVW = kAvx512 ? 2 : 1;
constexpr int kTileR = kAvx512 ? 4 : 2;  // forward tile: output rows x channels of accumulators (k <= 7)
constexpr int kTileC = kAvx512 ? 6 : 4;
constexpr int64_t kStreamBytes = int64_t(32) << 20;  // outputs this large (beyond L3) bypass the cache
constexpr int kJB = 7;   // taps per register block on the runtime-k grad-weights path
constexpr int kCG = 32;  // channels per scratch group in grad-weights (their rows stay in L2)
constexpr int64_t kRowBlock = 8;       // output rows per task in forward / grad-input (their weights stay in L2)
constexpr int64_t kRowBlockW = 16;     // in grad-weights (fewer re-reads of the k - 1 halo rows)

template <typename T>
constexpr int lanes() {
  return Simd<T>::L;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A 64-byte aligned scratch buffer (per thread).
template <typename T>
struct Buffer {
  T* p = nullptr;
  explicit Buffer(int64_t n) {
    void* q = nullptr;
    TORCH_CHECK(posix_memalign(&q, 64, std::max<int64_t>(n, 1) * sizeof(T)) == 0,
                "upcli adaptive_conv cpu: out of memory");
    p = static_cast<T*>(q);
    std::memset(p, 0, n * sizeof(T));
  }
  Buffer(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p(o.p) { o.p = nullptr; }
  ~Buffer() { std::free(p); }
  T* data() const { return p; }
};

// Output tensors: ask Linux for transparent huge pages on the 2 MiB-aligned interior of large outputs.
// Their first touch (page faults) otherwise costs as much as the kernel itself on some VMs. Only a hint.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE) && !defined(UPCLI_NO_THP)
  const uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), bytes = t.nbytes();
  if (bytes >= 4 * huge) {
    const uintptr_t b = (p + huge - 1) & ~(huge - 1), e = (p + bytes) & ~(huge - 1);
    if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
  }
#endif
  return t;
}

enum PadMode : int { kZeros = 0, kReflect = 1, kReplicate = 2, kValid = 3 };

// Index of padded position i (may be < 0 or >= n) in [0, n), or -1 for a zero.
inline int64_t remap(int64_t i, int64_t n, int mode) {
  if (i >= 0 && i < n) return i;
  if (mode == kReflect) return i < 0 ? -i : 2 * (n - 1) - i;
  if (mode == kReplicate) return i < 0 ? 0 : n - 1;
  return -1;
}

// dst[0, width) = padded row p of one channel plane (xpad[p, 0 .. W + 2r)), then zeros.
// plane is [H, W] for zeros/reflect/replicate, [H + 2r, W + 2r] for valid.
template <typename T>
void load_padded_row(T* dst, const T* plane, int64_t H, int64_t W, int64_t p, int r, int mode, int64_t width) {
  const int64_t n = W + 2 * r;
  if (mode == kValid) {
    std::memcpy(dst, plane + p * n, n * sizeof(T));
  } else {
    const int64_t sr = remap(p - r, H, mode);
    if (sr < 0) {
      std::fill(dst, dst + n, T(0));
    } else {
      const T* row = plane + sr * W;
      for (int q = 0; q < r; ++q) {
        const int64_t cl = remap(q - r, W, mode), cr = remap(W + q, W, mode);
        dst[q] = cl < 0 ? T(0) : row[cl];
        dst[r + W + q] = cr < 0 ? T(0) : row[cr];
      }
      std::memcpy(dst + r, row, W * sizeof(T));
    }
  }
  std::fill(dst + n, dst + width, T(0));
}

// ---- resizing inside the forward (adaptive_conv of a bicubic resize, never stored) ------------------------
//
// A resize by 4-tap tables (``bicubic_taps`` in adaptive_conv.py, torch's upsample_bicubic2d): high-res row P is
// sum_i wy[P][i] * low-res row clamp(fy[P] + i), and column Q sum_i wx[Q][i] * column fx[Q] + i of a low-res row
// padded by 2 replicated entries each side (fx in [-2, w - 2], as bicubic resizing of any ratio gives).

struct RowTaps {
  const int64_t* first;  // [H]
  const double* weight;  // [H][4]
};

// The column taps, prepared once per call. With AVX-512 each block of L columns whose taps lie in 2L consecutive
// entries of the padded row (any upsampling) takes 2 loads, 4 two-register permutes and 4 FMAs; others are scalar.
template <typename T>
struct ColumnTaps {
  int64_t W = 0;
  std::vector<int64_t> start;  // [W] fx[Q] + 2: the first tap in the padded row
  std::vector<T> wt;           // [4][W]
#if defined(__AVX512F__)
  using I = typename Simd<T>::I;
  std::vector<int64_t> base;   // per block of L columns: where its 2L-entry window starts, or -1 (scalar)
  std::vector<I> rel;          // [W] start - base of its block
#endif
  ColumnTaps(const int64_t* first, const double* weight, int64_t W_) : W(W_), start(W_), wt(4 * W_) {
    for (int64_t q = 0; q < W; ++q) {
      start[q] = first[q] + 2;
      for (int i = 0; i < 4; ++i) wt[i * W + q] = T(weight[q * 4 + i]);
    }
#if defined(__AVX512F__)
    constexpr int L = lanes<T>();
    rel.assign(W, 0);
    for (int64_t q0 = 0; q0 + L <= W; q0 += L) {
      int64_t lo = start[q0], hi = start[q0];
      for (int l = 1; l < L; ++l) lo = std::min(lo, start[q0 + l]), hi = std::max(hi, start[q0 + l]);
      base.push_back(hi + 3 < lo + 2 * L ? lo : -1);
      for (int l = 0; l < L; ++l) rel[q0 + l] = I(start[q0 + l] - lo);
    }
#endif
  }

  // out[Q] for Q < W from the padded low-res row (readable on [0, w + 4 + 2L)).
  void apply(const T* row, T* out) const {
    int64_t q = 0;
#if defined(__AVX512F__)
    using S = Simd<T>;
    constexpr int L = lanes<T>();
    for (; q + L <= W; q += L) {
      const int64_t b = base[q / L];
      if (b < 0) {
        for (int64_t e = q + L; q < e; ++q) out[q] = scalar(row, q);
        q -= L;
        continue;
      }
      const auto lo = S::loadu(row + b), hi = S::loadu(row + b + L);
      const auto idx = S::loadi(rel.data() + q);
      auto acc = S::zero();
      for (int i = 0; i < 4; ++i) acc = S::fma(S::loadu(wt.data() + i * W + q), S::permute2(lo, S::addi(idx, i), hi), acc);
      S::storeu(out + q, acc);
    }
#endif
    for (; q < W; ++q) out[q] = scalar(row, q);
  }

  T scalar(const T* row, int64_t q) const {
    const T* x = row + start[q];
    return wt[q] * x[0] + wt[W + q] * x[1] + wt[2 * W + q] * x[2] + wt[3 * W + q] * x[3];
  }
};

// load_padded_row of the resized plane: low-res plane [h, w] -> high-res [H, W] by (ry, cx). tmp: w + 4 + 2L.
template <typename T>
void load_padded_row_resampled(T* dst, const T* plane, int64_t h, int64_t w, int64_t H, int64_t W, const RowTaps& ry,
                               const ColumnTaps<T>& cx, int64_t p, int r, int mode, int64_t width, T* tmp) {
  const int64_t n = W + 2 * r;
  const int64_t sr = remap(p - r, H, mode);
  if (sr < 0) {
    std::fill(dst, dst + width, T(0));
    return;
  }
  const T* rows[4];
  T a[4];
  for (int i = 0; i < 4; ++i) {
    rows[i] = plane + std::clamp<int64_t>(ry.first[sr] + i, 0, h - 1) * w;
    a[i] = T(ry.weight[sr * 4 + i]);
  }
  T* t = tmp + 2;
  for (int64_t q = 0; q < w; ++q) t[q] = a[0] * rows[0][q] + a[1] * rows[1][q] + a[2] * rows[2][q] + a[3] * rows[3][q];
  tmp[0] = tmp[1] = t[0];
  t[w] = t[w + 1] = t[w - 1];
  T* out = dst + r;
  cx.apply(tmp, out);
  for (int q = 0; q < r; ++q) {
    const int64_t cl = remap(q - r, W, mode), cr = remap(W + q, W, mode);
    dst[q] = cl < 0 ? T(0) : out[cl];
    dst[r + W + q] = cr < 0 ? T(0) : out[cr];
  }
  std::fill(dst + n, dst + width, T(0));
}

// wT[t][s_t + w] = wrow[w * kk + t] for w < W, zeros elsewhere in [0, width); s_t = j (t = i * k + j) if
// shifted, else 0.
template <typename T>
void transpose_weight_row(T* wT, const T* wrow, int64_t W, int k, int64_t width, bool shifted) {
  const int kk = k * k;
  for (int t = 0; t < kk; ++t) {
    const int s = shifted ? t % k : 0;
    T* dst = wT + t * width;
    std::fill(dst, dst + s, T(0));
    std::fill(dst + s + W, dst + width, T(0));
  }
  constexpr int WB = 16;  // a few w at a time keeps the strided writes in cache lines
  for (int64_t w0 = 0; w0 < W; w0 += WB) {
    const int64_t w1 = std::min<int64_t>(W, w0 + WB);
    for (int t = 0; t < kk; ++t) {
      T* dst = wT + t * width + (shifted ? t % k : 0);
      for (int64_t w = w0; w < w1; ++w) dst[w] = wrow[w * kk + t];
    }
  }
}

// dst[0, valid) = v (all of it if valid >= L); a non-temporal store if `stream` (dst then 64-byte aligned).
template <typename T>
inline void store_vector(T* dst, typename Simd<T>::V v, int64_t valid, bool stream = false) {
  if (valid >= lanes<T>()) {
    if (stream) Simd<T>::stream(dst, v);
    else Simd<T>::storeu(dst, v);
  } else if (valid > 0) {
    alignas(64) T tmp[lanes<T>()];
    Simd<T>::storeu(tmp, v);
    std::memcpy(dst, tmp, valid * sizeof(T));
  }
}

// The weights of NR rows (wrows [NR][W][k*k], rows past `nrows` left as they are) blocked for forward_tile_k:
// wB[w / L][m][t][w % L] = wrows[m][w][t], zeros for w in [W, Wv).
template <typename T, int NR>
void block_weight_rows(T* wB, const T* wrows, int64_t nrows, int64_t W, int kk, int64_t Wv) {
  constexpr int L = lanes<T>();
  for (int64_t m = 0; m < nrows; ++m)
    for (int64_t w0 = 0; w0 < Wv; w0 += L) {
      T* dst = wB + (w0 * NR + m * L) * kk;
      const int64_t n = std::min<int64_t>(L, W - w0);
      for (int64_t l = 0; l < n; ++l)
        for (int t = 0; t < kk; ++t) dst[t * L + l] = wrows[(m * W + w0 + l) * kk + t];
      for (int64_t l = std::max<int64_t>(n, 0); l < L; ++l)
        for (int t = 0; t < kk; ++t) dst[t * L + l] = T(0);
    }
}

// Stores NC x NV accumulators at orow[cc] + w0, only the first `valid` elements of a partial chunk.
template <typename T, int NC, int NV>
inline void store_rows(const typename Simd<T>::V (&acc)[NC][NV], T* const* orow, int64_t w0, int64_t valid) {
  constexpr int L = lanes<T>();
  for (int cc = 0; cc < NC; ++cc)
    for (int n = 0; n < NV; ++n) store_vector<T>(orow[cc] + w0 + n * L, acc[cc][n], valid - n * L);
}

// Runs task(state, t) for t in [0, ntasks) on torch's intra-op threads, dynamically.
template <typename MakeState, typename Task>
void run_tasks(int64_t ntasks, const MakeState& make_state, const Task& task) {
  if (ntasks <= 0) return;
  const int64_t nthreads = std::min<int64_t>(at::get_num_threads(), ntasks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      auto state = make_state();
      for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) task(state, t);
    }
  });
}

// ---- forward -------------------------------------------------------------------------------------
//
// Software prefetch of the input rows the next channel group will copy, spread over the current group's tiles,
// so that reading x from memory overlaps the arithmetic instead of stalling each group's row copy.
// Up to 8 byte ranges (one per channel of the group), walked a few cache lines per step.
struct Prefetcher {
  const char* begin[8];
  const char* end[8];
  int n = 0, cur = 0;
  const char* p = nullptr;
  void add(const void* b, int64_t bytes) {
    if (bytes <= 0 || n == 8) return;
    begin[n] = static_cast<const char*>(b), end[n] = begin[n] + bytes;
    if (n++ == 0) p = begin[0];
  }
  inline void step(int lines) {
    for (; lines > 0 && cur < n; --lines) {
      __builtin_prefetch(p, 0, 2);  // read, into L2 (a group's rows are larger than L1)
      p += 64;
      if (p >= end[cur] && ++cur < n) p = begin[cur];
    }
  }
};

// A tile of NR output rows x NC channels, for compile-time K. wB: weights of the rows blocked by chunks of L columns,
// [Wv / L][NR][K*K][L] (each chunk's weights are one contiguous, L1-sized block); xs: the
// padded input rows of the first channel, row p (< NR + K - 1) at xs + p * Wr, channel cc at + cc * cstride
// (aligned, readable on [0, Wv + K - 1)); orow[m * NC + cc]: output row m of channel cc (W valid entries).
// Each input vector (row p, shift j) is loaded once and feeds every output row m = p - i of the tile, and each
// weight vector feeds NC channels: about 0.5 loads per FMA instead of 1 + 1 / NC for one row at a time.
template <typename T, int K, int NR, int NC>
void forward_tile_k(const T* __restrict wB, int64_t Wv, const T* __restrict xs, int64_t cstride, int64_t Wr,
                    T* const* orow, int64_t W, bool stream, Prefetcher& prefetch, int prefetch_lines) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = lanes<T>(), KK = K * K;
  for (int64_t w0 = 0; w0 < Wv; w0 += L) {
    const T* wc = wB + w0 * NR * KK;
    prefetch.step(prefetch_lines);
    V acc[NR][NC];
    unroll<NR>([&](auto M) UPCLI_INLINE { unroll<NC>([&](auto CC) UPCLI_INLINE { acc[M][CC] = S::zero(); }); });
    unroll<NR + K - 1>([&](auto P) UPCLI_INLINE {
      constexpr int p = decltype(P)::value;
      constexpr int mlo = p - K + 1 > 0 ? p - K + 1 : 0, mhi = p < NR - 1 ? p : NR - 1;  // the rows reading p
      unroll<K>([&](auto J) UPCLI_INLINE {
        constexpr int j = decltype(J)::value;
        V wv[NR];
        unroll<NR>([&](auto M) UPCLI_INLINE {
          constexpr int m = decltype(M)::value;
          if constexpr (m >= mlo && m <= mhi) wv[m] = S::load(wc + ((m * K + p - m) * K + j) * L);
        });
        unroll<NC>([&](auto CC) UPCLI_INLINE {
          constexpr int cc = decltype(CC)::value;
          const V xv = S::loadu(xs + cc * cstride + p * Wr + w0 + j);
          unroll<NR>([&](auto M) UPCLI_INLINE {
            constexpr int m = decltype(M)::value;
            if constexpr (m >= mlo && m <= mhi) acc[m][cc] = S::fma(wv[m], xv, acc[m][cc]);
          });
        });
      });
    });
    for (int m = 0; m < NR; ++m)
      for (int cc = 0; cc < NC; ++cc) store_vector<T>(orow[m * NC + cc] + w0, acc[m][cc], W - w0, stream);
  }
}

// Any k (runtime): one output row of kNC channels. wT [k*k][Wv] weights of the row; xr[cc * k + i] padded input
// row h + i of channel cc (readable on [0, Wv + max(L, k - 1))); orow[cc] output row (W valid entries).
template <typename T>
void forward_rows_any(const T* __restrict wT, int64_t Wv, const T* const* xr, T* const* orow, int64_t W, int k) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = lanes<T>(), CH = L * kNV;
  for (int64_t w0 = 0; w0 < Wv; w0 += CH) {
    V acc[kNC][kNV];
    for (int cc = 0; cc < kNC; ++cc)
      for (int n = 0; n < kNV; ++n) acc[cc][n] = S::zero();
    for (int i = 0; i < k; ++i) {
      const T* wi = wT + int64_t(i) * k * Wv + w0;
      for (int j = 0; j < k; ++j) {
        V wv[kNV];
        for (int n = 0; n < kNV; ++n) wv[n] = S::load(wi + j * Wv + n * L);
        for (int cc = 0; cc < kNC; ++cc)
          for (int n = 0; n < kNV; ++n)
            acc[cc][n] = S::fma(wv[n], S::loadu(xr[cc * k + i] + w0 + j + n * L), acc[cc][n]);
      }
    }
    store_rows<T, kNC, kNV>(acc, orow, w0, W - w0);
  }
}

// ry, cx: x is [B, C, h, w] and the op reads it resized to [H, W], made row by row (never stored).
// dst[0, n) = src[0, n) rounded to the nearest even 16-bit float, as torch's .to(half / bfloat16) rounds.
inline void round_row(at::Half* dst, const float* src, int64_t n) {
#if defined(__FLT16_MAX__)
  auto* d = reinterpret_cast<_Float16*>(dst);  // the same bits as at::Half; vectorised (vcvtps2ph with F16C)
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(src[i]);
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = at::Half(src[i]);
#endif
}

inline void round_row(at::BFloat16* dst, const float* src, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    d[i] = src[i] != src[i] ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

// O: the output's type. When it is not T (float32 accumulators, a float16 / bfloat16 output), each task's rows are
// computed into a scratch block and rounded into `out`: no T-sized output is made.
template <typename T, typename O = T>
void forward_impl(const T* x, const T* wts, O* out, int64_t B, int64_t C, int64_t H, int64_t W, int k, int mode,
                  const RowTaps* ry = nullptr, const ColumnTaps<T>* cx = nullptr, int64_t h = 0, int64_t w = 0) {
  constexpr bool rounds = !std::is_same_v<T, O>;
  const bool rs = ry != nullptr;
  constexpr int L = lanes<T>(), CH = L * kNV;
  const int r = k / 2, kk = k * k;
  const bool tiled = k <= 7;  // compile-time tiles for k = 1, 3, 5, 7; forward_rows_any otherwise
  const int G = tiled ? kTileC : kNC;  // channels per group
  const int64_t Wv = round_up(W, CH), Wr = round_up(Wv + std::max(L, k - 1), L);
  const int64_t Hs = rs ? h : mode == kValid ? H + k - 1 : H, Ws = rs ? w : mode == kValid ? W + k - 1 : W;
  const int64_t HB = kRowBlock, nhb = (H + HB - 1) / HB, RB = HB + k - 1;  // RB: padded rows per block
  const bool stream = !rounds && tiled && W % L == 0 && reinterpret_cast<uintptr_t>(out) % 64 == 0 &&
                      B * C * H * W * int64_t(sizeof(T)) >= kStreamBytes;
  static_assert(kRowBlock % kTileR == 0, "row blocks hold whole tiles");
  struct State {
    Buffer<T> wT, xs, dummy, tmp, staged;
  };
  run_tasks(
      B * nhb,
      [&] {
        return State{Buffer<T>(HB * kk * Wv), Buffer<T>(G * RB * Wr), Buffer<T>(Wv),
                     Buffer<T>(rs ? Ws + 4 + 2 * L : 0), Buffer<T>(rounds ? G * HB * Wv : 0)};
      },
      [&](State& s, int64_t task) {
        const int64_t b = task / nhb, h0 = task % nhb * HB, nh = std::min(HB, H - h0), nrows = nh + k - 1;
        for (int64_t hh = 0; hh < nh; hh += tiled ? kTileR : 1) {
          const T* wrows = wts + ((b * H + h0 + hh) * W) * kk;
          T* dst = s.wT.data() + hh * kk * Wv;
          if (tiled)
            block_weight_rows<T, kTileR>(dst, wrows, std::min<int64_t>(kTileR, nh - hh), W, kk, Wv);
          else
            transpose_weight_row(dst, wrows, W, k, Wv, false);
        }
        // the rows [src_first, src_last) of each source plane that this task reads
        int64_t src_first = Hs, src_last = 0;
        for (int64_t p = 0; p < nrows; ++p) {
          int64_t lo = h0 + p, hi = h0 + p;  // valid: padded row h0 + p
          if (mode != kValid) {
            const int64_t sr = remap(h0 + p - r, H, mode);
            if (sr < 0) continue;
            lo = hi = sr;
            if (rs) {  // the 4 low-res rows of its bicubic taps
              lo = std::clamp<int64_t>(ry->first[sr], 0, Hs - 1);
              hi = std::clamp<int64_t>(ry->first[sr] + 3, 0, Hs - 1);
            }
          }
          src_first = std::min(src_first, lo), src_last = std::max(src_last, hi + 1);
        }
        for (int64_t c0 = 0; c0 < C; c0 += G) {
          const int nc = int(std::min<int64_t>(G, C - c0));
          for (int cc = 0; cc < nc; ++cc) {
            const T* plane = x + (b * C + c0 + cc) * Hs * Ws;
            for (int64_t p = 0; p < nrows; ++p) {
              T* dst = s.xs.data() + (cc * RB + p) * Wr;
              if (rs)
                load_padded_row_resampled(dst, plane, Hs, Ws, H, W, *ry, *cx, h0 + p, r, mode, Wr, s.tmp.data());
              else
                load_padded_row(dst, plane, H, W, h0 + p, r, mode, Wr);
            }
          }
          // Rows and channels past the end (nh, nc) are computed from whatever the scratch holds, and dropped.
          auto out_row = [&](int64_t cc, int64_t hh) -> T* {
            if (cc >= nc || hh >= nh) return s.dummy.data();
            if constexpr (rounds) return s.staged.data() + (cc * HB + hh) * Wv;
            else return out + ((b * C + c0 + cc) * H + h0 + hh) * W;
          };
          if (tiled) {
            // the next group's source rows (row-contiguous in x), prefetched over this group's tiles
            Prefetcher pf;
            int64_t pf_bytes = 0;
            if (c0 + G < C) {
              for (int64_t cc = c0 + G; cc < std::min<int64_t>(C, c0 + 2 * G); ++cc) {
                pf.add(x + ((b * C + cc) * Hs + src_first) * Ws, (src_last - src_first) * Ws * int64_t(sizeof(T)));
                pf_bytes += (src_last - src_first) * Ws * int64_t(sizeof(T));
              }
            }
            const int64_t steps = (nh + kTileR - 1) / kTileR * (Wv / L);
            const int pfl = int((pf_bytes / 64 + steps) / std::max<int64_t>(steps, 1));  // lines per step
            for (int64_t hh = 0; hh < nh; hh += kTileR) {
              T* orow[kTileR * kTileC];
              for (int m = 0; m < kTileR; ++m)
                for (int cc = 0; cc < kTileC; ++cc) orow[m * kTileC + cc] = out_row(cc, hh + m);
              const T* wT = s.wT.data() + hh * kk * Wv;
              const T* xs = s.xs.data() + hh * Wr;
              switch (k) {
                case 1: forward_tile_k<T, 1, kTileR, kTileC>(wT, Wv, xs, RB * Wr, Wr, orow, W, stream, pf, pfl); break;
                case 3: forward_tile_k<T, 3, kTileR, kTileC>(wT, Wv, xs, RB * Wr, Wr, orow, W, stream, pf, pfl); break;
                case 5: forward_tile_k<T, 5, kTileR, kTileC>(wT, Wv, xs, RB * Wr, Wr, orow, W, stream, pf, pfl); break;
                default: forward_tile_k<T, 7, kTileR, kTileC>(wT, Wv, xs, RB * Wr, Wr, orow, W, stream, pf, pfl); break;
              }
            }
          } else {
            for (int64_t hh = 0; hh < nh; ++hh) {
              const T* xr[kNC * 64];
              T* orow[kNC];
              for (int cc = 0; cc < kNC; ++cc) {
                orow[cc] = out_row(cc, hh);
                for (int i = 0; i < k; ++i) xr[cc * k + i] = s.xs.data() + (cc * RB + hh + i) * Wr;
              }
              forward_rows_any<T>(s.wT.data() + hh * kk * Wv, Wv, xr, orow, W, k);
            }
          }
          if constexpr (rounds)
            for (int cc = 0; cc < nc; ++cc)
              for (int64_t hh = 0; hh < nh; ++hh)
                round_row(out + ((b * C + c0 + cc) * H + h0 + hh) * W, s.staged.data() + (cc * HB + hh) * Wv, W);
        }
#if defined(__AVX512F__)
        if (stream) _mm_sfence();  // the non-temporal stores are visible before the task ends
#endif
      });
}

// ---- grad input (padded frame), as a gather -------------------------------------------------------
//
// grad_xpad[p, q] = sum_{i, j} weights[p - i, q - j, i, j] * grad_out[p - i, q - j]  over valid (p - i, q - j).
// The weights of row h are stored pre-shifted, wS[t][q] = weights[h, q - j, t] (zero outside), so they are
// read aligned at q; grad_out rows are stored with k - 1 leading zeros, gpad[u] = grad_out[u - (k - 1)], and read
// at u = q + (k - 1 - j).
//
// One padded output row p of kNC channels: wrow[i] pre-shifted weights [k*k][Wq] of row h = p - i (valid for i in
// [ilo, ihi]); grow[cc * k + i] gpad row h = p - i of channel cc; orow[cc] output row (Wp valid entries).

template <typename T, int K>
void grad_input_rows_k(const T* const* wrow, int64_t Wq, const T* const* grow, T* const* orow, int ilo, int ihi,
                       int64_t Wp) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = lanes<T>(), CH = L * kNV;
  for (int64_t q0 = 0; q0 < Wq; q0 += CH) {
    V acc[kNC][kNV];
    for (int cc = 0; cc < kNC; ++cc)
      for (int n = 0; n < kNV; ++n) acc[cc][n] = S::zero();
    for (int i = ilo; i <= ihi; ++i) {
      Window<T, kNV> win[kNC];
      for (int cc = 0; cc < kNC; ++cc) win[cc].load(grow[cc * K + i] + q0);
      const T* wi = wrow[i] + int64_t(i) * K * Wq + q0;
      unroll<K>([&](auto J) {
        constexpr int j = decltype(J)::value;
        V wv[kNV];
        for (int n = 0; n < kNV; ++n) wv[n] = S::load(wi + j * Wq + n * L);
        for (int cc = 0; cc < kNC; ++cc)
          for (int n = 0; n < kNV; ++n)
            acc[cc][n] = S::fma(wv[n], win[cc].template get<K - 1 - j>(n), acc[cc][n]);
      });
    }
    store_rows<T, kNC, kNV>(acc, orow, q0, Wp - q0);
  }
}

template <typename T>
void grad_input_rows_any(const T* const* wrow, int64_t Wq, const T* const* grow, T* const* orow, int ilo, int ihi,
                         int64_t Wp, int k) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = lanes<T>(), CH = L * kNV;
  for (int64_t q0 = 0; q0 < Wq; q0 += CH) {
    V acc[kNC][kNV];
    for (int cc = 0; cc < kNC; ++cc)
      for (int n = 0; n < kNV; ++n) acc[cc][n] = S::zero();
    for (int i = ilo; i <= ihi; ++i) {
      const T* wi = wrow[i] + int64_t(i) * k * Wq + q0;
      for (int j = 0; j < k; ++j) {
        V wv[kNV];
        for (int n = 0; n < kNV; ++n) wv[n] = S::load(wi + j * Wq + n * L);
        for (int cc = 0; cc < kNC; ++cc)
          for (int n = 0; n < kNV; ++n)
            acc[cc][n] = S::fma(wv[n], S::loadu(grow[cc * k + i] + q0 + (k - 1 - j) + n * L), acc[cc][n]);
      }
    }
    store_rows<T, kNC, kNV>(acc, orow, q0, Wp - q0);
  }
}

template <typename T>
void grad_input_impl(const T* gout, const T* wts, T* gx, int64_t B, int64_t C, int64_t H, int64_t W, int k) {
  constexpr int L = lanes<T>(), CH = L * kNV;
  const int kk = k * k;
  const int64_t Hp = H + k - 1, Wp = W + k - 1;
  const int64_t Wq = round_up(Wp, CH), Wg = round_up(Wq + std::max(L, k - 1), L);
  const int64_t PB = kRowBlock, npb = (Hp + PB - 1) / PB, RB = PB + k - 1;  // RB: grad_out rows per block
  struct State {
    Buffer<T> wS, gs, dummy;
  };
  run_tasks(
      B * npb,
      [&] { return State{Buffer<T>(RB * kk * Wq), Buffer<T>(kNC * RB * Wg), Buffer<T>(Wq)}; },
      [&](State& s, int64_t task) {
        const int64_t b = task / npb, p0 = task % npb * PB, np = std::min(PB, Hp - p0);
        const int64_t hlo = std::max<int64_t>(0, p0 - (k - 1)), hhi = std::min<int64_t>(H, p0 + np);
        for (int64_t h = hlo; h < hhi; ++h)
          transpose_weight_row(s.wS.data() + (h - hlo) * kk * Wq, wts + ((b * H + h) * W) * kk, W, k, Wq, true);
        for (int64_t c0 = 0; c0 < C; c0 += kNC) {
          const int nc = int(std::min<int64_t>(kNC, C - c0));
          for (int cc = 0; cc < nc; ++cc) {
            for (int64_t h = hlo; h < hhi; ++h) {
              T* dst = s.gs.data() + (cc * RB + h - hlo) * Wg;
              std::fill(dst, dst + k - 1, T(0));
              std::memcpy(dst + k - 1, gout + ((b * C + c0 + cc) * H + h) * W, W * sizeof(T));
              std::fill(dst + k - 1 + W, dst + Wg, T(0));
            }
          }
          for (int64_t p = p0; p < p0 + np; ++p) {
            const int ilo = int(std::max<int64_t>(0, p - (H - 1))), ihi = int(std::min<int64_t>(k - 1, p));
            const T* wrow[64];
            const T* grow[kNC * 64];
            T* orow[kNC];
            for (int i = ilo; i <= ihi; ++i) wrow[i] = s.wS.data() + (p - i - hlo) * kk * Wq;
            for (int cc = 0; cc < kNC; ++cc) {
              const int src = cc < nc ? cc : 0;
              orow[cc] = cc < nc ? gx + ((b * C + c0 + cc) * Hp + p) * Wp : s.dummy.data();
              for (int i = ilo; i <= ihi; ++i) grow[cc * k + i] = s.gs.data() + (src * RB + p - i - hlo) * Wg;
            }
            switch (k) {
              case 1: grad_input_rows_k<T, 1>(wrow, Wq, grow, orow, ilo, ihi, Wp); break;
              case 3: grad_input_rows_k<T, 3>(wrow, Wq, grow, orow, ilo, ihi, Wp); break;
              case 5: grad_input_rows_k<T, 5>(wrow, Wq, grow, orow, ilo, ihi, Wp); break;
              case 7: grad_input_rows_k<T, 7>(wrow, Wq, grow, orow, ilo, ihi, Wp); break;
              default: grad_input_rows_any<T>(wrow, Wq, grow, orow, ilo, ihi, Wp, k); break;
            }
          }
        }
      });
}

// ---- grad weights -----------------------------------------------------------------------------------
//
// grad_w[h, w, i, j] = sum_c grad_out[c, h, w] * xpad[c, h + i, w + j]. Per (row h, w-chunk, tap row i) the
// k x NVW accumulators stay in registers over a group of channels; partial sums of successive groups go through
// an L2-resident [row][k*k][Wv] buffer, transposed to [w][k*k] at the end of the task.
//
// acc_mem: buffer for taps (i, 0..) at w0 (row stride Wv); xs: padded row h + i of the group's first channel at
// w0 (channel stride xstride); gs: grad_out row h of that channel at w0 (channel stride gstride).

template <typename T, int K>
void grad_weights_block_k(T* acc_mem, int64_t Wv, bool first, const T* xs, int64_t xstride, const T* gs,
                          int64_t gstride, int nc) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = lanes<T>();
  V acc[K][kNVW];
  for (int j = 0; j < K; ++j)
    for (int n = 0; n < kNVW; ++n) acc[j][n] = first ? S::zero() : S::load(acc_mem + j * Wv + n * L);
  for (int c = 0; c < nc; ++c) {
    V g[kNVW];
    for (int n = 0; n < kNVW; ++n) g[n] = S::load(gs + c * gstride + n * L);
    Window<T, kNVW> win;
    win.load(xs + c * xstride);
    unroll<K>([&](auto J) {
      constexpr int j = decltype(J)::value;
      for (int n = 0; n < kNVW; ++n) acc[j][n] = S::fma(g[n], win.template get<j>(n), acc[j][n]);
    });
  }
  for (int j = 0; j < K; ++j)
    for (int n = 0; n < kNVW; ++n) Simd<T>::storeu(acc_mem + j * Wv + n * L, acc[j][n]);
}

// Runtime-k path: JB (<= kJB) taps from j0 = the caller's offset of xs / acc_mem.
template <typename T, int JB>
void grad_weights_block_any(T* acc_mem, int64_t Wv, bool first, const T* xs, int64_t xstride, const T* gs,
                            int64_t gstride, int nc) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int L = lanes<T>();
  V acc[JB][kNVW];
  for (int j = 0; j < JB; ++j)
    for (int n = 0; n < kNVW; ++n) acc[j][n] = first ? S::zero() : S::load(acc_mem + j * Wv + n * L);
  for (int c = 0; c < nc; ++c) {
    V g[kNVW];
    for (int n = 0; n < kNVW; ++n) g[n] = S::load(gs + c * gstride + n * L);
    const T* xp = xs + c * xstride;
    for (int j = 0; j < JB; ++j)
      for (int n = 0; n < kNVW; ++n) acc[j][n] = S::fma(g[n], S::loadu(xp + j + n * L), acc[j][n]);
  }
  for (int j = 0; j < JB; ++j)
    for (int n = 0; n < kNVW; ++n) Simd<T>::storeu(acc_mem + j * Wv + n * L, acc[j][n]);
}

template <typename T>
void grad_weights_impl(const T* gout, const T* x, T* gw, int64_t B, int64_t C, int64_t H, int64_t W, int k, int mode) {
  constexpr int L = lanes<T>(), CH = L * kNVW;
  const int r = k / 2, kk = k * k;
  const int64_t Wv = round_up(W, CH), Wr = round_up(Wv + std::max(L, k - 1), L);
  const int64_t Hs = mode == kValid ? H + k - 1 : H, Ws = mode == kValid ? W + k - 1 : W;
  const int64_t HB = kRowBlockW, nhb = (H + HB - 1) / HB, RB = HB + k - 1;
  const int64_t CG = std::min<int64_t>(kCG, C);
  struct State {
    Buffer<T> acc, xs, gs;
  };
  run_tasks(
      B * nhb,
      [&] { return State{Buffer<T>(HB * kk * Wv), Buffer<T>(CG * RB * Wr), Buffer<T>(CG * HB * Wv)}; },
      [&](State& s, int64_t task) {
        const int64_t b = task / nhb, h0 = task % nhb * HB, nh = std::min(HB, H - h0), nrows = nh + k - 1;
        for (int64_t c0 = 0; c0 < C; c0 += CG) {
          const int nc = int(std::min<int64_t>(CG, C - c0));
          for (int c = 0; c < nc; ++c) {
            const T* plane = x + (b * C + c0 + c) * Hs * Ws;
            for (int64_t p = 0; p < nrows; ++p)
              load_padded_row(s.xs.data() + (c * RB + p) * Wr, plane, H, W, h0 + p, r, mode, Wr);
            for (int64_t hh = 0; hh < nh; ++hh) {
              T* dst = s.gs.data() + (c * HB + hh) * Wv;
              std::memcpy(dst, gout + ((b * C + c0 + c) * H + h0 + hh) * W, W * sizeof(T));
              std::fill(dst + W, dst + Wv, T(0));
            }
          }
          const bool first = c0 == 0;
          const int64_t xstride = RB * Wr, gstride = HB * Wv;
          for (int64_t hh = 0; hh < nh; ++hh) {
            for (int64_t w0 = 0; w0 < Wv; w0 += CH) {
              const T* gs = s.gs.data() + hh * Wv + w0;
              for (int i = 0; i < k; ++i) {
                const T* xrow = s.xs.data() + (hh + i) * Wr + w0;
                T* arow = s.acc.data() + (hh * kk + i * k) * Wv + w0;
                switch (k) {
                  case 1: grad_weights_block_k<T, 1>(arow, Wv, first, xrow, xstride, gs, gstride, nc); continue;
                  case 3: grad_weights_block_k<T, 3>(arow, Wv, first, xrow, xstride, gs, gstride, nc); continue;
                  case 5: grad_weights_block_k<T, 5>(arow, Wv, first, xrow, xstride, gs, gstride, nc); continue;
                  case 7: grad_weights_block_k<T, 7>(arow, Wv, first, xrow, xstride, gs, gstride, nc); continue;
                  default: break;
                }
                for (int j0 = 0; j0 < k; j0 += kJB) {
                  T* am = arow + j0 * Wv;
                  const T* xp = xrow + j0;
                  switch (std::min(kJB, k - j0)) {
                    case 7: grad_weights_block_any<T, 7>(am, Wv, first, xp, xstride, gs, gstride, nc); break;
                    case 6: grad_weights_block_any<T, 6>(am, Wv, first, xp, xstride, gs, gstride, nc); break;
                    case 5: grad_weights_block_any<T, 5>(am, Wv, first, xp, xstride, gs, gstride, nc); break;
                    case 4: grad_weights_block_any<T, 4>(am, Wv, first, xp, xstride, gs, gstride, nc); break;
                    case 3: grad_weights_block_any<T, 3>(am, Wv, first, xp, xstride, gs, gstride, nc); break;
                    case 2: grad_weights_block_any<T, 2>(am, Wv, first, xp, xstride, gs, gstride, nc); break;
                    default: grad_weights_block_any<T, 1>(am, Wv, first, xp, xstride, gs, gstride, nc); break;
                  }
                }
              }
            }
          }
        }
        // acc [hh][t][w] -> grad_w [b, h0 + hh, w, t]
        for (int64_t hh = 0; hh < nh; ++hh) {
          const T* a = s.acc.data() + hh * kk * Wv;
          T* dst = gw + ((b * H + h0 + hh) * W) * kk;
          constexpr int WB = 16;
          for (int64_t w0 = 0; w0 < W; w0 += WB) {
            const int64_t w1 = std::min<int64_t>(W, w0 + WB);
            for (int t = 0; t < kk; ++t)
              for (int64_t w = w0; w < w1; ++w) dst[w * kk + t] = a[t * Wv + w];
          }
        }
      });
}

// ---- ops ----------------------------------------------------------------------------------------------

constexpr int64_t kMaxK = 63;  // row-pointer arrays are sized for k <= 64

// Error messages are built from strings only: streaming integers into TORCH_CHECK segfaulted with torch 2.11
// built by g++ 12 (seen on the GPU machine); strings and C strings were fine.
std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + ")";
}

std::string dtype_str(const at::Tensor& t) { return c10::toString(t.scalar_type()); }

void check_common(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "upcli adaptive_conv cpu: ", name, " must be on the CPU, got ", t.device().str());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "upcli adaptive_conv cpu: ", name, " must be float32 or float64, got ", dtype_str(t));
  TORCH_CHECK(t.is_contiguous(), "upcli adaptive_conv cpu: ", name, " must be contiguous");
}

void check_mode(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 3, "upcli adaptive_conv cpu: pad_mode must be 0..3, got ", std::to_string(mode));
}

int64_t check_weights(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 5 && w.size(3) == w.size(4) && w.size(3) % 2 == 1,
              "upcli adaptive_conv cpu: weights must be (B, H, W, k, k) with k odd, got ", shape_str(w));
  TORCH_CHECK(w.size(3) <= kMaxK, "upcli adaptive_conv cpu: k must be <= ", std::to_string(kMaxK), ", got ",
              std::to_string(w.size(3)));
  return w.size(3);
}

// Checks x against (B, H, W, k, mode) and the reflect constraint.
void check_x(const at::Tensor& x, int64_t B, int64_t H, int64_t W, int64_t k, int64_t mode) {
  const int64_t extra = mode == kValid ? k - 1 : 0;
  TORCH_CHECK(x.dim() == 4 && x.size(0) == B && x.size(2) == H + extra && x.size(3) == W + extra,
              "upcli adaptive_conv cpu: x ", shape_str(x), " does not match (B, H, W) = (", std::to_string(B), ", ",
              std::to_string(H), ", ", std::to_string(W), "), k = ", std::to_string(k), ", pad_mode = ", std::to_string(mode));
  TORCH_CHECK(mode != kReflect || H == 0 || W == 0 || (k / 2 < H && k / 2 < W),
              "upcli adaptive_conv cpu: reflect padding needs k // 2 < H and W, got k = ", std::to_string(k), ", ",
              std::to_string(H), "x", std::to_string(W));
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& weights, int64_t pad_mode) {
  check_common(x, "x");
  check_common(weights, "weights");
  check_mode(pad_mode);
  TORCH_CHECK(x.scalar_type() == weights.scalar_type(), "upcli adaptive_conv cpu: x is ", dtype_str(x), ", weights ",
              dtype_str(weights));
  const int64_t k = check_weights(weights);
  const int64_t B = weights.size(0), H = weights.size(1), W = weights.size(2);
  check_x(x, B, H, W, k, pad_mode);
  const int64_t C = x.size(1);
  at::Tensor out = new_output({B, C, H, W}, x.options());
  if (out.numel() == 0) return out;
  if (x.scalar_type() == at::kFloat)
    forward_impl<float>(x.const_data_ptr<float>(), weights.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                        B, C, H, W, int(k), int(pad_mode));
  else
    forward_impl<double>(x.const_data_ptr<double>(), weights.const_data_ptr<double>(),
                         out.mutable_data_ptr<double>(), B, C, H, W, int(k), int(pad_mode));
  return out;
}

void check_taps(const at::Tensor& first, const at::Tensor& weight, int64_t n, int64_t in_len, const char* name) {
  TORCH_CHECK(first.scalar_type() == at::kLong && weight.scalar_type() == at::kDouble && first.is_contiguous() &&
                  weight.is_contiguous() && first.dim() == 1 && weight.dim() == 2 && first.size(0) == n &&
                  weight.size(0) == n && weight.size(1) == 4,
              "upcli adaptive_conv cpu: ", name, " taps must be contiguous int64 (", std::to_string(n),
              ") and float64 (", std::to_string(n), ", 4)");
  const int64_t* p = first.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] >= -2 && p[i] <= in_len - 2, "upcli adaptive_conv cpu: ", name, " taps out of range");
}

// forward(x resized to the weights' size by 4-tap tables, weights): x [B, C, h, w], weights [B, H, W, k, k];
// the resized tensor is never made.
at::Tensor forward_resampled(const at::Tensor& x, const at::Tensor& weights, int64_t pad_mode,
                             const at::Tensor& row_first, const at::Tensor& row_weight, const at::Tensor& col_first,
                             const at::Tensor& col_weight, std::optional<at::ScalarType> out_dtype) {
  check_common(x, "x");
  check_common(weights, "weights");
  check_mode(pad_mode);
  TORCH_CHECK(pad_mode != kValid, "upcli adaptive_conv cpu: forward_resampled pads the resized input itself");
  TORCH_CHECK(x.scalar_type() == weights.scalar_type(), "upcli adaptive_conv cpu: x is ", dtype_str(x), ", weights ",
              dtype_str(weights));
  const int64_t k = check_weights(weights);
  const int64_t B = weights.size(0), H = weights.size(1), W = weights.size(2);
  TORCH_CHECK(x.dim() == 4 && x.size(0) == B && x.size(2) > 0 && x.size(3) > 0,
              "upcli adaptive_conv cpu: x ", shape_str(x), " does not fit weights ", shape_str(weights));
  const int64_t h = x.size(2), w = x.size(3);
  check_taps(row_first, row_weight, H, h, "row");
  check_taps(col_first, col_weight, W, w, "column");
  TORCH_CHECK(pad_mode != kReflect || (k / 2 < H && k / 2 < W), "upcli adaptive_conv cpu: reflect padding needs ",
              "k // 2 < H and W, got k = ", std::to_string(k), ", ", std::to_string(H), "x", std::to_string(W));
  const int64_t C = x.size(1);
  const at::ScalarType odt = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(odt == x.scalar_type() || (x.scalar_type() == at::kFloat && (odt == at::kHalf || odt == at::kBFloat16)),
              "upcli adaptive_conv cpu: out_dtype ", c10::toString(odt), " from ", dtype_str(x), " (float32 gives ",
              "float16 or bfloat16 too)");
  at::Tensor out = new_output({B, C, H, W}, x.options().dtype(odt));
  if (out.numel() == 0) return out;
  const RowTaps ry{row_first.const_data_ptr<int64_t>(), row_weight.const_data_ptr<double>()};
  if (x.scalar_type() == at::kFloat) {
    const ColumnTaps<float> cx(col_first.const_data_ptr<int64_t>(), col_weight.const_data_ptr<double>(), W);
    const float *xp = x.const_data_ptr<float>(), *wp = weights.const_data_ptr<float>();
    if (odt == at::kHalf)
      forward_impl(xp, wp, out.mutable_data_ptr<at::Half>(), B, C, H, W, int(k), int(pad_mode), &ry, &cx, h, w);
    else if (odt == at::kBFloat16)
      forward_impl(xp, wp, out.mutable_data_ptr<at::BFloat16>(), B, C, H, W, int(k), int(pad_mode), &ry, &cx, h, w);
    else
      forward_impl(xp, wp, out.mutable_data_ptr<float>(), B, C, H, W, int(k), int(pad_mode), &ry, &cx, h, w);
  } else {
    const ColumnTaps<double> cx(col_first.const_data_ptr<int64_t>(), col_weight.const_data_ptr<double>(), W);
    forward_impl<double>(x.const_data_ptr<double>(), weights.const_data_ptr<double>(),
                         out.mutable_data_ptr<double>(), B, C, H, W, int(k), int(pad_mode), &ry, &cx, h, w);
  }
  return out;
}

at::Tensor grad_input_padded(const at::Tensor& grad_out, const at::Tensor& weights) {
  check_common(grad_out, "grad_out");
  check_common(weights, "weights");
  TORCH_CHECK(grad_out.scalar_type() == weights.scalar_type(), "upcli adaptive_conv cpu: grad_out is ",
              dtype_str(grad_out), ", weights ", dtype_str(weights));
  const int64_t k = check_weights(weights);
  const int64_t B = weights.size(0), H = weights.size(1), W = weights.size(2);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(2) == H && grad_out.size(3) == W,
              "upcli adaptive_conv cpu: grad_out ", shape_str(grad_out), " does not match weights ", shape_str(weights));
  const int64_t C = grad_out.size(1);
  if (B * C * H * W == 0) return at::zeros({B, C, H + k - 1, W + k - 1}, grad_out.options());
  at::Tensor gx = new_output({B, C, H + k - 1, W + k - 1}, grad_out.options());
  if (gx.scalar_type() == at::kFloat)
    grad_input_impl<float>(grad_out.const_data_ptr<float>(), weights.const_data_ptr<float>(),
                           gx.mutable_data_ptr<float>(), B, C, H, W, int(k));
  else
    grad_input_impl<double>(grad_out.const_data_ptr<double>(), weights.const_data_ptr<double>(),
                            gx.mutable_data_ptr<double>(), B, C, H, W, int(k));
  return gx;
}

at::Tensor grad_weights(const at::Tensor& grad_out, const at::Tensor& x, int64_t pad_mode, int64_t k) {
  check_common(grad_out, "grad_out");
  check_common(x, "x");
  check_mode(pad_mode);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "upcli adaptive_conv cpu: grad_out is ",
              dtype_str(grad_out), ", x ", dtype_str(x));
  TORCH_CHECK(k >= 1 && k % 2 == 1 && k <= kMaxK, "upcli adaptive_conv cpu: k must be odd in [1, ",
              std::to_string(kMaxK), "], got ", std::to_string(k));
  TORCH_CHECK(grad_out.dim() == 4, "upcli adaptive_conv cpu: grad_out must be (B, C, H, W), got ", shape_str(grad_out));
  const int64_t B = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  check_x(x, B, H, W, k, pad_mode);
  TORCH_CHECK(x.size(1) == C, "upcli adaptive_conv cpu: x ", shape_str(x), " and grad_out ", shape_str(grad_out),
              " have different channel counts");
  if (B * C * H * W == 0) return at::zeros({B, H, W, k, k}, grad_out.options());
  at::Tensor gw = new_output({B, H, W, k, k}, grad_out.options());
  if (gw.scalar_type() == at::kFloat)
    grad_weights_impl<float>(grad_out.const_data_ptr<float>(), x.const_data_ptr<float>(),
                             gw.mutable_data_ptr<float>(), B, C, H, W, int(k), int(pad_mode));
  else
    grad_weights_impl<double>(grad_out.const_data_ptr<double>(), x.const_data_ptr<double>(),
                              gw.mutable_data_ptr<double>(), B, C, H, W, int(k), int(pad_mode));
  return gw;
}

}  // namespace

TORCH_LIBRARY(upcli_adaptive_conv_cpu, m) {
  m.def("forward(Tensor x, Tensor weights, int pad_mode) -> Tensor");
  m.def("forward_resampled(Tensor x, Tensor weights, int pad_mode, Tensor row_first, Tensor row_weight, "
        "Tensor col_first, Tensor col_weight, ScalarType? out_dtype=None) -> Tensor");
  m.def("grad_input_padded(Tensor grad_out, Tensor weights) -> Tensor");
  m.def("grad_weights(Tensor grad_out, Tensor x, int pad_mode, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(upcli_adaptive_conv_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("forward_resampled", &forward_resampled);
  m.impl("grad_input_padded", &grad_input_padded);
  m.impl("grad_weights", &grad_weights);
}
