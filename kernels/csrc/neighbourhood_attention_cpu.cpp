// Cross-scale neighbourhood attention on the CPU, compiled at first use by ``upcli/kernels/_cpu.py``.
//
//   logits[n, t](y, x) = scale * <query[b, n, :, y, x], key[b, n, :, sy + ti, sx + tj]>   t = (ti, tj) < k x k
//   p_n = softmax over t;  p = mean over heads n of p_n
//   out[b, c, y, x] = sum_t p[t](y, x) * value[b, c, sy + ti, sx + tj]
//
// (sy, sx): the first cell of the window of pixel (y, x), from ``window_start`` (the same formula as
// ``neighbourhood_attention.window_starts``). Registered under ``torch.ops.upcli_neighbourhood_attention_cpu``:
//
//   forward(query, key, value, k, scale)                      -> out [B, C, H, W]
//   backward(grad_out, query, key, value, k, scale)           -> (grad_query, grad_key, grad_value)
//
// How the work is laid out:
// * Tasks are output rows (b, y). A row splits into segments of pixels that share one window (the same centre
//   column cell); every hot loop runs unit-stride over the segment's pixels x (contiguous in the query, the
//   output and the gradients), as small tile products whose left factor is read through window-offset tables.
// * Per segment and head: logits [k*k][n], a softmax per pixel over the taps, heads averaged into p [k*k][n];
//   then out[c][x] = sum_t p[t][x] * value[c, tap t] for every channel. Nothing per tap outlives its segment.
// * Backward recomputes p per segment. grad_value and grad_key (window cells shared by many rows) are summed
//   into per-thread buffers, reduced at the end; grad_query is written in place (each pixel has one owner).
//   The forward's threads take rows from a counter; the backward's take fixed blocks of rows, so its sums are
//   the same in every run (training resumes bit-exactly).
// * Accumulation is in the tensor's dtype (float32 or float64); the caller upcasts half types.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

// The grid cell whose centre is nearest to output position `pos` (of n_out) on an axis of n_in cells.
inline int64_t centre_cell(int64_t pos, int64_t n_out, int64_t n_in) {
  return std::min((2 * pos + 1) * n_in / (2 * n_out), n_in - 1);
}

// First cell of the k-cell window of output position `pos`: shifted inside the grid at the borders.
inline int64_t window_start(int64_t pos, int64_t n_out, int64_t n_in, int64_t k) {
  return std::min(std::max(centre_cell(pos, n_out, n_in) - k / 2, int64_t(0)), n_in - k);
}

// Column segments of a row: the pixels [first[s], first[s + 1]) have one centre cell, whose window starts at
// column start[s].
struct Segments {
  std::vector<int64_t> first, start;
  int64_t widest = 0;
  Segments(int64_t W, int64_t w, int64_t k) {
    for (int64_t x = 0, prev = -1; x < W; ++x) {
      const int64_t centre = centre_cell(x, W, w);
      if (centre != prev) first.push_back(x), start.push_back(window_start(x, W, w, k)), prev = centre;
    }
    first.push_back(W);
    for (size_t s = 0; s + 1 < first.size(); ++s) widest = std::max(widest, first[s + 1] - first[s]);
  }
  size_t size() const { return start.size(); }
};

// Runs task(state, t) for t in [0, ntasks) on torch's intra-op threads; returns the per-worker states. Dynamic:
// workers take tasks from a counter (balanced; for outputs that each task owns). Static: worker w takes the w-th
// contiguous block, in order, so what each worker's state sums up, and so the result, is the same in every run
// with this thread count (for per-worker partial sums, as the backward's window gradients).
template <typename State, typename MakeState, typename Task>
std::vector<State> run_tasks(int64_t ntasks, const MakeState& make_state, const Task& task, bool dynamic) {
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ntasks));
  std::vector<State> states(nthreads);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t worker = begin; worker < end; ++worker) {
      states[worker] = make_state();
      if (dynamic) {
        for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) task(states[worker], t);
      } else {
        for (int64_t t = worker * ntasks / nthreads; t < (worker + 1) * ntasks / nthreads; ++t) task(states[worker], t);
      }
    }
  });
  return states;
}

struct Shape {
  int64_t B, heads, d, H, W, h, w, C, k;
  int64_t taps() const { return k * k; }
};

// 64-byte vectors of T (GCC/Clang vector extensions; -march decides the instructions) and their loads/stores.
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(64)));
  static constexpr int L = 64 / sizeof(T);
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }
};

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// out[m * ldo + x] = sum_k A[rows[m] + cols[k]] * B[k * ldb + x] for m < M and x < n: a small matrix product
// whose left factor is read through offset tables (a window of cells, a channel stride). B is read on
// [0, round_up(n, L)) (zero-padded scratch). A tile of 6 rows x L columns stays in registers.
template <typename T>
void window_product(const T* A, const int64_t* rows, const int64_t* cols, int64_t M, int64_t K, const T* B,
                    int64_t ldb, T* out, int64_t ldo, int64_t n) {
  using S = Simd<T>;
  constexpr int NR = 6;
  for (int64_t x0 = 0; x0 < n; x0 += S::L) {
    const int64_t nx = std::min<int64_t>(S::L, n - x0);
    for (int64_t m0 = 0; m0 < M; m0 += NR) {
      const T* a[NR];
      for (int r = 0; r < NR; ++r) a[r] = A + rows[std::min<int64_t>(m0 + r, M - 1)];
      typename S::V acc[NR] = {};
      for (int64_t k = 0; k < K; ++k) {
        const typename S::V b = S::load(B + k * ldb + x0);
        const int64_t col = cols[k];
        for (int r = 0; r < NR; ++r) acc[r] += a[r][col] * b;
      }
      for (int r = 0; r < NR && m0 + r < M; ++r) {
        if (nx == S::L) {
          S::store(out + (m0 + r) * ldo + x0, acc[r]);
        } else {
          T tmp[S::L];
          S::store(tmp, acc[r]);
          std::copy(tmp, tmp + nx, out + (m0 + r) * ldo + x0);
        }
      }
    }
  }
}

// rows [rows][n] of src (stride `stride`) into dst [rows][np], zero-padded.
template <typename T>
inline void copy_padded(T* dst, const T* src, int64_t stride, int64_t rows, int64_t n, int64_t np) {
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(src + r * stride, src + r * stride + n, dst + r * np);
    std::fill(dst + r * np + n, dst + (r + 1) * np, T(0));
  }
}

template <typename T>
struct Scratch {
  int64_t np = 0;                 // the segment's pixels padded to whole vectors
  std::vector<T> qs, ph, p;       // queries [heads][d][np]; probabilities per head [heads][k*k][np] and averaged
  std::vector<T> top, sum;        // per-pixel softmax max and sum [np]
  std::vector<int64_t> cell, dim;  // window cell offsets [k*k]; channel (or query dim) i's offset i * h * w
  Scratch() = default;
  Scratch(const Shape& s, int64_t widest)
      : np(round_up(widest, Simd<T>::L)),
        qs(s.heads * s.d * np),
        ph(s.heads * s.taps() * np),
        p(s.taps() * np),
        top(np),
        sum(np),
        cell(s.taps()),
        dim(std::max(s.d, s.C)) {
    for (size_t i = 0; i < dim.size(); ++i) dim[i] = int64_t(i) * s.h * s.w;
  }
};

// The probabilities of one segment (pixels x0 .. x0 + n of row y, window from cell (sy, sx)): per head in sc.ph,
// averaged over heads in sc.p; the segment's queries in sc.qs, the window's cell offsets in sc.cell.
template <typename T>
void segment_probabilities(Scratch<T>& sc, const T* query, const T* key, const Shape& s, int64_t b, int64_t y,
                           int64_t x0, int64_t n, int64_t sy, int64_t sx, T scale) {
  const int64_t taps = s.taps(), plane = s.H * s.W, cells = s.h * s.w, np = sc.np;
  for (int64_t ti = 0; ti < s.k; ++ti)
    for (int64_t tj = 0; tj < s.k; ++tj) sc.cell[ti * s.k + tj] = (sy + ti) * s.w + sx + tj;
  T* __restrict p = sc.p.data();
  std::fill(p, p + taps * np, T(0));
  const T inv_heads = T(1) / T(s.heads);
  for (int64_t hd = 0; hd < s.heads; ++hd) {
    T* qs = sc.qs.data() + hd * s.d * np;
    T* __restrict ph = sc.ph.data() + hd * taps * np;
    copy_padded(qs, query + (b * s.heads + hd) * s.d * plane + y * s.W + x0, plane, s.d, n, np);
    // logits[t][x] = <key[:, cell t], query[:, x]>, then softmax over t per pixel
    window_product(key + (b * s.heads + hd) * s.d * cells, sc.cell.data(), sc.dim.data(), taps, s.d, qs, np, ph, np,
                   np);
    T* __restrict top = sc.top.data();
    T* __restrict sum = sc.sum.data();
    for (int64_t i = 0; i < taps * np; ++i) ph[i] *= scale;
    std::copy(ph, ph + np, top);
    for (int64_t t = 1; t < taps; ++t)
      for (int64_t x = 0; x < np; ++x) top[x] = std::max(top[x], ph[t * np + x]);
    std::fill(sum, sum + np, T(0));
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t x = 0; x < np; ++x) sum[x] += (ph[t * np + x] = std::exp(ph[t * np + x] - top[x]));
    for (int64_t x = 0; x < np; ++x) sum[x] = T(1) / sum[x];
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t x = 0; x < np; ++x) {
        ph[t * np + x] *= sum[x];
        p[t * np + x] += ph[t * np + x] * inv_heads;
      }
  }
}

template <typename T>
void forward_impl(const T* query, const T* key, const T* value, T* out, const Shape& s, T scale) {
  const Segments seg(s.W, s.w, s.k);
  const int64_t taps = s.taps(), cells = s.h * s.w, plane = s.H * s.W;
  run_tasks<Scratch<T>>(
      s.B * s.H, [&] { return Scratch<T>(s, seg.widest); },
      [&](Scratch<T>& sc, int64_t task) {
        const int64_t b = task / s.H, y = task % s.H, sy = window_start(y, s.H, s.h, s.k);
        for (size_t g = 0; g < seg.size(); ++g) {
          const int64_t x0 = seg.first[g], n = seg.first[g + 1] - x0, np = sc.np;
          segment_probabilities(sc, query, key, s, b, y, x0, n, sy, seg.start[g], scale);
          // out[c][x] = sum_t value[c, cell t] * p[t][x]
          window_product(value + b * s.C * cells, sc.dim.data(), sc.cell.data(), s.C, taps, sc.p.data(), np,
                         out + b * s.C * plane + y * s.W + x0, plane, n);
        }
      }, /*dynamic=*/true);
}

template <typename T>
struct BackwardScratch : Scratch<T> {
  // grad_out of the segment [C][np]; dp [k*k][np]; a probability matrix transposed [np][tp] (tp: k*k padded to
  // whole vectors); window gradients before their scatter [max(C, d)][tp]; per-thread grad_key [B, heads, d, h, w]
  // and grad_value [B, C, h, w]
  int64_t tp = 0;
  std::vector<T> gs, dp, pt, wgrad, gk, gv;
  std::vector<int64_t> rows, pixels;  // row i of a [.][np] matrix at i * np; pixel x at x
  BackwardScratch() = default;
  BackwardScratch(const Shape& s, int64_t widest)
      : Scratch<T>(s, widest),
        tp(round_up(s.taps(), Simd<T>::L)),
        gs(s.C * this->np),
        dp(s.taps() * this->np),
        pt(this->np * tp),
        wgrad(std::max(s.C, s.d) * tp),
        gk(s.B * s.heads * s.d * s.h * s.w),
        gv(s.B * s.C * s.h * s.w),
        rows(std::max(s.C, s.d)),
        pixels(this->np) {
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = int64_t(i) * this->np;
    for (size_t x = 0; x < pixels.size(); ++x) pixels[x] = int64_t(x);
  }

  // window[i, cell t] += sum_x a[i][x] * p[t][x] for i < m, t < k*k: the product as a [np] x [tp] tile product
  // (p transposed first), then scattered to the window's cells.
  void add_window_product(T* window, int64_t cells, const T* a, int64_t m, const T* p, const Shape& s) {
    const int64_t taps = s.taps(), np = this->np;
    std::fill(pt.begin(), pt.end(), T(0));
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t x = 0; x < np; ++x) pt[x * tp + t] = p[t * np + x];
    window_product(a, rows.data(), pixels.data(), m, np, pt.data(), tp, wgrad.data(), tp, taps);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t t = 0; t < taps; ++t) window[i * cells + this->cell[t]] += wgrad[i * tp + t];
  }
};

template <typename T>
void backward_impl(const T* grad, const T* query, const T* key, const T* value, T* gq, T* gk, T* gv, const Shape& s,
                   T scale) {
  const Segments seg(s.W, s.w, s.k);
  const int64_t taps = s.taps(), cells = s.h * s.w, plane = s.H * s.W;
  const T inv_heads = T(1) / T(s.heads);
  auto states = run_tasks<BackwardScratch<T>>(
      s.B * s.H, [&] { return BackwardScratch<T>(s, seg.widest); },
      [&](BackwardScratch<T>& sc, int64_t task) {
        const int64_t b = task / s.H, y = task % s.H, sy = window_start(y, s.H, s.h, s.k);
        for (size_t g = 0; g < seg.size(); ++g) {
          const int64_t x0 = seg.first[g], n = seg.first[g + 1] - x0, np = sc.np;
          segment_probabilities(sc, query, key, s, b, y, x0, n, sy, seg.start[g], scale);
          copy_padded(sc.gs.data(), grad + b * s.C * plane + y * s.W + x0, plane, s.C, n, np);
          // dp[t][x] = sum_c value[c, cell t] * g[c][x] / heads
          T* __restrict dp = sc.dp.data();
          window_product(value + b * s.C * cells, sc.cell.data(), sc.dim.data(), taps, s.C, sc.gs.data(), np, dp,
                         np, np);
          for (int64_t i = 0; i < taps * np; ++i) dp[i] *= inv_heads;
          // grad_value[c, cell t] += sum_x p[t][x] * g[c][x]
          sc.add_window_product(sc.gv.data() + b * s.C * cells, cells, sc.gs.data(), s.C, sc.p.data(), s);
          for (int64_t hd = 0; hd < s.heads; ++hd) {
            // dl = p_n * (dp - sum_t p_n dp) * scale, in place of p_n (zero on the padding: dp is)
            T* __restrict ph = sc.ph.data() + hd * taps * np;
            T* __restrict sums = sc.sum.data();
            std::fill(sums, sums + np, T(0));
            for (int64_t t = 0; t < taps; ++t)
              for (int64_t x = 0; x < np; ++x) sums[x] += ph[t * np + x] * dp[t * np + x];
            for (int64_t t = 0; t < taps; ++t)
              for (int64_t x = 0; x < np; ++x) ph[t * np + x] *= (dp[t * np + x] - sums[x]) * scale;
            // grad_query[j][x] = sum_t key[j, cell t] * dl[t][x]; grad_key[j, cell t] += sum_x dl[t][x] * query[j][x]
            const int64_t offset = (b * s.heads + hd) * s.d;
            window_product(key + offset * cells, sc.dim.data(), sc.cell.data(), s.d, taps, ph, np,
                           gq + offset * plane + y * s.W + x0, plane, n);
            sc.add_window_product(sc.gk.data() + offset * cells, cells, sc.qs.data() + hd * s.d * np, s.d, ph, s);
          }
        }
      }, /*dynamic=*/false);
  // reduce the per-thread window gradients
  const int64_t nk = s.B * s.heads * s.d * cells, nv = s.B * s.C * cells;
  at::parallel_for(0, nk + nv, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      T sum = 0;
      for (const auto& st : states) sum += i < nk ? st.gk[i] : st.gv[i - nk];
      (i < nk ? gk[i] : gv[i - nk]) = sum;
    }
  });
}

std::string shape_str(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + ")";
}

void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "upcli neighbourhood_attention cpu: ", name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "upcli neighbourhood_attention cpu: ", name, " must be float32 or float64");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "upcli neighbourhood_attention cpu: ", name,
              " must have the dtype of the query");
  TORCH_CHECK(t.is_contiguous(), "upcli neighbourhood_attention cpu: ", name, " must be contiguous");
}

Shape check_shapes(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t k) {
  check_tensor(query, query, "query");
  check_tensor(key, query, "key");
  check_tensor(value, query, "value");
  TORCH_CHECK(query.dim() == 5 && key.dim() == 5 && value.dim() == 4 && query.size(0) == key.size(0) &&
                  query.size(1) == key.size(1) && query.size(2) == key.size(2) && value.size(0) == key.size(0) &&
                  value.size(2) == key.size(3) && value.size(3) == key.size(4),
              "upcli neighbourhood_attention cpu: query ", shape_str(query), ", key ", shape_str(key), " and value ",
              shape_str(value), " do not match");
  TORCH_CHECK(k >= 1 && k <= std::min(key.size(3), key.size(4)),
              "upcli neighbourhood_attention cpu: k must be in 1 .. min(h, w), got ", std::to_string(k));
  return {query.size(0), query.size(1), query.size(2), query.size(3), query.size(4),
          key.size(3),   key.size(4),   value.size(1), k};
}

at::Tensor forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t k, double scale) {
  const Shape s = check_shapes(query, key, value, k);
  at::Tensor out = at::empty({s.B, s.C, s.H, s.W}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "neighbourhood_attention_forward", [&] {
    forward_impl<scalar_t>(query.const_data_ptr<scalar_t>(), key.const_data_ptr<scalar_t>(),
                           value.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), s, scalar_t(scale));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& query,
                                                        const at::Tensor& key, const at::Tensor& value, int64_t k,
                                                        double scale) {
  const Shape s = check_shapes(query, key, value, k);
  check_tensor(grad_out, query, "grad_out");
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.B && grad_out.size(1) == s.C && grad_out.size(2) == s.H &&
                  grad_out.size(3) == s.W,
              "upcli neighbourhood_attention cpu: grad_out ", shape_str(grad_out), " does not match the output");
  if (query.numel() == 0 || value.numel() == 0)
    return {at::zeros(query.sizes(), query.options()), at::zeros(key.sizes(), key.options()),
            at::zeros(value.sizes(), value.options())};
  at::Tensor gq = at::empty(query.sizes(), query.options()), gk = at::empty(key.sizes(), key.options()),
             gv = at::empty(value.sizes(), value.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "neighbourhood_attention_backward", [&] {
    backward_impl<scalar_t>(grad_out.const_data_ptr<scalar_t>(), query.const_data_ptr<scalar_t>(),
                            key.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
                            gq.mutable_data_ptr<scalar_t>(), gk.mutable_data_ptr<scalar_t>(),
                            gv.mutable_data_ptr<scalar_t>(), s, scalar_t(scale));
  });
  return {gq, gk, gv};
}

}  // namespace

TORCH_LIBRARY(upcli_neighbourhood_attention_cpu, m) {
  m.def("forward(Tensor query, Tensor key, Tensor value, int k, float scale) -> Tensor");
  m.def("backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, int k, float scale) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(upcli_neighbourhood_attention_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
