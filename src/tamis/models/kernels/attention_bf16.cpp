// Packed multi-head attention for bf16 inference on CPUs with AVX-512 BF16, one call for a whole packed batch
// (tamis/models/kernels/__init__.py builds this file on first use and checks the CPU first).
//
// Inputs are the packed layout of tamis.models.bert: q, k, v are [tokens, heads * D] (any row stride, e.g.
// column slices of the fused QKV output), `runs` lists (first row, sequences, length) of the runs of equal-length
// sequences. For each (sequence, head) the kernel computes softmax(q k^T * scale) v with the scores kept in a
// few KiB of cache instead of a [heads, n, n] tensor in memory: k and v of the head are repacked in the pair
// layout of vdpbf16ps (16 keys / 16 output columns per register, 2 bf16 per lane), a block of 256 / D query
// rows is scored against every key in float32, the softmax exp is a degree-3 polynomial of 2^x (its result is
// rounded to bf16 for the second product anyway), and the unnormalised probabilities times v are divided by the
// row sum at the end, as flash attention does. No bias, no mask: every sequence attends to itself only, which
// is what packing gives. Head sizes 32, 64 and 128. Threads (at::parallel_for, OpenMP) take (sequence, head)
// tasks balanced by their n^2 cost.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// 2^x for x <= 0: a degree-3 polynomial on the fraction (relative error 7.5e-5, against bf16's 3.9e-3), the
// exponent applied by vscalefps; below -126 the result flushes towards 0, which a softmax sum cannot notice.
inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 whole = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, whole);
  __m512 p = _mm512_set1_ps(0.07802254f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.22606564f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.69583646f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.99992467f));
  return _mm512_scalef_ps(p, whole);
}

inline __mmask16 first(int64_t count) {  // a mask of the first `count` lanes (none below 0, all above 16)
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1u);
}

inline __m512i pair_at(const uint16_t* p) {  // two bf16 at p, broadcast to every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// Scores of R query rows against NB blocks of 16 keys starting at key j0. kp: keys in pair layout [D/2][np][2];
// s: R rows of np floats.
template <int D, int R, int NB>
inline void score_block(const uint16_t* const* q, const uint16_t* kp, int64_t np, int64_t j0, float* s) {
  __m512 acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int d2 = 0; d2 < D / 2; ++d2) {
    __m512i kb[NB];
    for (int b = 0; b < NB; ++b) kb[b] = _mm512_loadu_si512(kp + 2 * (d2 * np + j0 + 16 * b));
    for (int r = 0; r < R; ++r) {
      const __m512i qa = pair_at(q[r] + 2 * d2);
      for (int b = 0; b < NB; ++b) acc[r][b] = dp(acc[r][b], qa, kb[b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < NB; ++b) _mm512_storeu_ps(s + r * np + j0 + 16 * b, acc[r][b]);
}

template <int D, int R>
inline void scores(const uint16_t* const* q, const uint16_t* kp, int64_t np, float* s) {
  constexpr int NB = R >= 16 ? 1 : 16 / R;  // R x NB = 16 accumulators
  int64_t j0 = 0;
  for (; j0 + 16 * NB <= np; j0 += 16 * NB) score_block<D, R, NB>(q, kp, np, j0, s);
  for (; j0 < np; j0 += 16) score_block<D, R, 1>(q, kp, np, j0, s);
}

// One row: p = bf16(2^((s - max) * c)) over the n real keys, zeros up to np; returns 1 / sum.
inline float exp_row(const float* s, int64_t n, int64_t np, float c, uint16_t* p) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) mx = _mm512_mask_max_ps(mx, first(n - j), mx, _mm512_loadu_ps(s + j));
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * c);
  const __m512 vc = _mm512_set1_ps(c);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < np; j += 16) {
    const __m512 e = _mm512_maskz_mov_ps(first(n - j),
                                         exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vc, shift)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// out rows = (p v) * inv for R rows; vp: values in pair layout [np/2][D][2].
template <int D, int R>
inline void weigh(const uint16_t* p, int64_t np, const uint16_t* vp, const float* inv, uint16_t* const* out) {
  constexpr int C = D / 16;
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j2 = 0; j2 < np / 2; ++j2) {
    __m512i vb[C];
    for (int c = 0; c < C; ++c) vb[c] = _mm512_loadu_si512(vp + 2 * (j2 * D + 16 * c));
    for (int r = 0; r < R; ++r) {
      const __m512i pa = pair_at(p + r * np + 2 * j2);
      for (int c = 0; c < C; ++c) acc[r][c] = dp(acc[r][c], pa, vb[c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 sc = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < C; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + 16 * c),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], sc)));
  }
}

struct Task {
  int64_t row;  // first token row of the sequence
  int64_t n;    // its length
  int64_t head;
};

struct Scratch {
  std::vector<uint16_t> kp, vp, p;
  std::vector<float> s;
};

// k of one head in pair layout: kp32[d2 * np + j] = the bf16 pair (k[j][2 d2], k[j][2 d2 + 1]), zero for j >= n.
template <int D>
void pack_keys(const uint16_t* k, int64_t ks, int64_t n, int64_t np, uint32_t* kp32) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t j = 0; j < np; j += 16) {
    const __mmask16 m = first(n - j);
    const __m512i rows = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(j))),
                                            _mm512_set1_epi32(static_cast<int>(ks * 2)));  // byte offsets
    for (int d2 = 0; d2 < D / 2; ++d2) {
      const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, rows, k + 2 * d2, 1);
      _mm512_storeu_si512(kp32 + d2 * np + j, g);
    }
  }
}

// v of one head in pair layout: vp[(j2 * D + d) * 2 + t] = v[2 j2 + t][d], zero for rows >= n.
template <int D>
void pack_values(const uint16_t* v, int64_t vs, int64_t n, int64_t np, uint16_t* vp) {
  __m512i lo_idx, hi_idx;
  {
    alignas(64) uint16_t lo[32], hi[32];
    for (int i = 0; i < 16; ++i) {
      lo[2 * i] = i, lo[2 * i + 1] = 32 + i;
      hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
    }
    lo_idx = _mm512_load_si512(lo);
    hi_idx = _mm512_load_si512(hi);
  }
  for (int64_t j = 0; j < np; j += 2) {
    for (int d = 0; d < D; d += 32) {
      const __m512i a = j < n ? _mm512_loadu_si512(v + j * vs + d) : _mm512_setzero_si512();
      const __m512i b = j + 1 < n ? _mm512_loadu_si512(v + (j + 1) * vs + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + (j / 2 * D + d) * 2, _mm512_permutex2var_epi16(a, lo_idx, b));
      _mm512_storeu_si512(vp + (j / 2 * D + d + 16) * 2, _mm512_permutex2var_epi16(a, hi_idx, b));
    }
  }
}

template <int D>
void attend(const Task& t, const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t qs, int64_t ks,
            int64_t vs, uint16_t* out, int64_t os, float c, Scratch& w) {
  constexpr int R = 256 / D;  // rows per block: R x D/16 = 16 accumulators in `weigh`, R x 16/R in `scores`
  const int64_t n = t.n, np = (n + 15) / 16 * 16, col = t.head * D;
  w.kp.resize(D * np);
  w.vp.resize(D * np);
  w.s.resize(R * np);
  w.p.resize(R * np);
  pack_keys<D>(k + t.row * ks + col, ks, n, np, reinterpret_cast<uint32_t*>(w.kp.data()));
  pack_values<D>(v + t.row * vs + col, vs, n, np, w.vp.data());
  for (int64_t i0 = 0; i0 < n; i0 += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, n - i0));
    const uint16_t* qr[R];
    uint16_t* orow[R];
    float inv[R];
    for (int r = 0; r < rows; ++r) {
      qr[r] = q + (t.row + i0 + r) * qs + col;
      orow[r] = out + (t.row + i0 + r) * os + col;
    }
    if (rows == R) {
      scores<D, R>(qr, w.kp.data(), np, w.s.data());
    } else {
      for (int r = 0; r < rows; ++r) scores<D, 1>(qr + r, w.kp.data(), np, w.s.data() + r * np);
    }
    for (int r = 0; r < rows; ++r) inv[r] = exp_row(w.s.data() + r * np, n, np, c, w.p.data() + r * np);
    if (rows == R) {
      weigh<D, R>(w.p.data(), np, w.vp.data(), inv, orow);
    } else {
      for (int r = 0; r < rows; ++r) weigh<D, 1>(w.p.data() + r * np, np, w.vp.data(), inv + r, orow + r);
    }
  }
}

at::Tensor attention_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& runs,
                          int64_t n_heads, double scale) {
  for (const at::Tensor* x : {&q, &k, &v}) {
    TORCH_CHECK(x->device().is_cpu() && x->scalar_type() == at::kBFloat16 && x->dim() == 2 && x->stride(1) == 1,
                "attention_bf16: q, k, v must be [tokens, hidden] bf16 CPU tensors with unit column stride");
    TORCH_CHECK(x->sizes() == q.sizes(), "attention_bf16: q, k, v shapes differ");
  }
  TORCH_CHECK(runs.device().is_cpu() && runs.scalar_type() == at::kLong && runs.dim() == 2 && runs.size(1) == 3,
              "attention_bf16: runs must be an int64 [r, 3] CPU tensor of (row, sequences, length)");
  const int64_t hidden = q.size(1);
  TORCH_CHECK(n_heads > 0 && hidden % n_heads == 0, "attention_bf16: hidden size not divisible by heads");
  const int64_t d = hidden / n_heads;
  TORCH_CHECK(d == 32 || d == 64 || d == 128, "attention_bf16: head size must be 32, 64 or 128, not ", d);
  at::Tensor out = at::empty({q.size(0), hidden}, q.options().memory_format(at::MemoryFormat::Contiguous));

  const at::Tensor r = runs.contiguous();
  const int64_t* rp = r.data_ptr<int64_t>();
  std::vector<Task> tasks;
  for (int64_t i = 0; i < r.size(0); ++i) {
    const int64_t row = rp[3 * i], g = rp[3 * i + 1], n = rp[3 * i + 2];
    TORCH_CHECK(row >= 0 && g >= 0 && n >= 0 && row + g * n <= q.size(0), "attention_bf16: run ", i,
                " is outside the ", q.size(0), " rows");
    TORCH_CHECK(n * k.stride(0) * 2 < std::numeric_limits<int32_t>::max(),  // the key gathers' byte offsets
                "attention_bf16: sequences of ", n, " tokens are too long for this kernel");
    for (int64_t s = 0; s < g; ++s)
      for (int64_t h = 0; h < n_heads; ++h)
        if (n > 0) tasks.push_back({row + s * n, n, h});
  }
  if (tasks.empty()) return out;
  // Balance the threads by cost (n^2): longest first, each to the least loaded thread.
  const int threads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(tasks.size())));
  std::vector<std::vector<Task>> share(threads);
  std::vector<double> load(threads, 0.0);
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.n > b.n; });
  for (const Task& t : tasks) {
    const int i = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    share[i].push_back(t);
    load[i] += static_cast<double>(t.n) * (t.n + 16);
  }
  const auto* qd = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kd = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vd = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* od = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t qs = q.stride(0), ks = k.stride(0), vs = v.stride(0), os = out.stride(0);
  const float c = static_cast<float>(scale * 1.4426950408889634);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    Scratch w;
    for (int64_t i = b; i < e; ++i)
      for (const Task& t : share[i]) {
        if (d == 32) attend<32>(t, qd, kd, vd, qs, ks, vs, od, os, c, w);
        else if (d == 64) attend<64>(t, qd, kd, vd, qs, ks, vs, od, os, c, w);
        else attend<128>(t, qd, kd, vd, qs, ks, vs, od, os, c, w);
      }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tamis_attention, m) {
  m.def("attention_bf16(Tensor q, Tensor k, Tensor v, Tensor runs, int n_heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tamis_attention, CPU, m) {
  m.impl("attention_bf16", &attention_bf16);
}
