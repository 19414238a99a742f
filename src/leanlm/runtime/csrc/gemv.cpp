// Fused batch-1 GEMV kernels for the leanlm runtime (int4 groups, int8 per channel), dequantizing in
// registers. The activation row is quantized to int8 per block of 32 (scale = max|x| / 127, as llama.cpp's
// Q8_0), and the weight codes are multiplied by integer dot products (AVX-512 VNNI vpdpbusd, or AVX2
// vpmaddubsw), then scaled per block and per group in float32. The path is chosen at run time from the
// CPU's flags; a portable scalar loop computes the same sums where neither exists.
//
// int4 layout ("tile16"): [N/16][K/8][64 bytes]; in each 64-byte chunk byte r*4+j holds rows nb*16+r's
// codes k0+j (low nibble) and k0+4+j (high nibble), k0 = 8 * chunk. Codes are unsigned (0..15), the weight is
// (u - 8) * scale + zero with scale/zero read from PyTorch's own [K/G, N, 2] bfloat16 table (one 32-bit word
// per row and group: scale in the low half, zero in the high half).
// int8 layout: PyTorch's own row-major [N, K] int8 codes with a bfloat16 scale per row.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <chrono>
#include <bit>
#include <cstring>

namespace {

constexpr int QB = 32;  // activation quantization block

// x [K] (float32 or bfloat16) -> xq int8 [K], xs float [K/32] (scale), xsum_f [K/32] = xs * sum(xq),
// xsum_i int32 [K/32] = sum(xq)
void quantize_row(const at::Tensor& x, int K, int8_t* xq, float* xs, float* xsum_f, int32_t* xsum_i) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "leanlm gemv: x must be a contiguous float32 or bfloat16 row");
  float buf[QB];
  const bool bf = x.scalar_type() == at::kBFloat16;
  const float* pf = bf ? nullptr : x.data_ptr<float>();
  const at::BFloat16* pb = bf ? x.data_ptr<at::BFloat16>() : nullptr;
  for (int b = 0; b < K / QB; ++b) {
    float amax = 0.f;
    for (int k = 0; k < QB; ++k) {
      buf[k] = bf ? (float)pb[b * QB + k] : pf[b * QB + k];
      amax = std::max(amax, std::fabs(buf[k]));
    }
    float s = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int k = 0; k < QB; ++k) {
      int v = (int)std::nearbyint(buf[k] * inv);
      xq[b * QB + k] = (int8_t)v;
      sum += v;
    }
    xs[b] = s;
    xsum_i[b] = sum;
    xsum_f[b] = s * (float)sum;
  }
}

// float results -> a new [N] tensor in x's dtype
at::Tensor finish(const std::vector<float>& yf, const at::Tensor& x) {
  const int64_t N = (int64_t)yf.size();
  at::Tensor y = at::empty({N}, x.options());
  if (x.scalar_type() == at::kFloat) {
    std::memcpy(y.data_ptr<float>(), yf.data(), N * sizeof(float));
  } else {
    at::BFloat16* o = y.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < N; ++i) o[i] = at::BFloat16(yf[i]);
  }
  return y;
}

inline float bf16_lo(uint32_t w) { uint32_t v = w << 16; float f; std::memcpy(&f, &v, 4); return f; }
inline float bf16_hi(uint32_t w) { uint32_t v = w & 0xFFFF0000u; float f; std::memcpy(&f, &v, 4); return f; }
inline float bf16f(uint16_t h) { uint32_t v = (uint32_t)h << 16; float f; std::memcpy(&f, &v, 4); return f; }

// ------------------------------------------------------------------------------------------ int4
struct I4Args {
  const uint8_t* w; const uint32_t* sz; const int8_t* xq; const float* xs; const float* xsum; float* y;
  int N, K, G;
};

void i4_scalar(const I4Args& a, int nb0, int nb1) {
  for (int nb = nb0; nb < nb1; ++nb) {
    float out[16] = {0};
    const uint8_t* wp = a.w + (size_t)nb * (a.K / 8) * 64;
    for (int g = 0; g < a.K / a.G; ++g) {
      float G1[16] = {0}, G0 = 0.f;
      for (int b = g * a.G / QB; b < (g + 1) * a.G / QB; ++b) {
        int32_t acc[16] = {0};
        for (int c = b * 4; c < b * 4 + 4; ++c) {
          const uint8_t* ch = wp + (size_t)c * 64;
          for (int r = 0; r < 16; ++r)
            for (int j = 0; j < 4; ++j) {
              uint8_t v = ch[r * 4 + j];
              acc[r] += (v & 15) * a.xq[c * 8 + j] + (v >> 4) * a.xq[c * 8 + 4 + j];
            }
        }
        for (int r = 0; r < 16; ++r) G1[r] += a.xs[b] * (float)acc[r];
        G0 += a.xsum[b];
      }
      const uint32_t* s = a.sz + (size_t)g * a.N + nb * 16;
      for (int r = 0; r < 16; ++r) out[r] += bf16_lo(s[r]) * (G1[r] - 8.f * G0) + bf16_hi(s[r]) * G0;
    }
    std::memcpy(a.y + nb * 16, out, sizeof(out));
  }
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
void i4_avx512(const I4Args& a, int nb0, int nb1) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
  const int nblk = a.G / QB;
  for (int nb = nb0; nb < nb1; ++nb) {
    __m512 out = _mm512_setzero_ps();
    const uint8_t* wp = a.w + (size_t)nb * (a.K / 8) * 64;
    for (int g = 0; g < a.K / a.G; ++g) {
      __m512 G1 = _mm512_setzero_ps();
      float G0 = 0.f;
      for (int bi = 0; bi < nblk; ++bi) {
        const int b = g * nblk + bi;
        const uint8_t* ch = wp + (size_t)b * 4 * 64;
        const int8_t* xb = a.xq + b * QB;
        __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          __m512i v = _mm512_loadu_si512(ch + c * 64);
          int32_t xa, xc;
          std::memcpy(&xa, xb + c * 8, 4);
          std::memcpy(&xc, xb + c * 8 + 4, 4);
          acc0 = _mm512_dpbusd_epi32(acc0, _mm512_and_si512(v, m4), _mm512_set1_epi32(xa));
          acc1 = _mm512_dpbusd_epi32(acc1, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_set1_epi32(xc));
        }
        G1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc0, acc1)), _mm512_set1_ps(a.xs[b]), G1);
        G0 += a.xsum[b];
      }
      __m512i s = _mm512_loadu_si512(a.sz + (size_t)g * a.N + nb * 16);
      __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(s, 16));
      __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(s, hi16));
      __m512 g0 = _mm512_set1_ps(G0);
      out = _mm512_fmadd_ps(sc, _mm512_fnmadd_ps(_mm512_set1_ps(8.f), g0, G1), out);
      out = _mm512_fmadd_ps(ze, g0, out);
    }
    _mm512_storeu_ps(a.y + nb * 16, out);
  }
}

__attribute__((target("avx2,fma")))
void i4_avx2(const I4Args& a, int nb0, int nb1) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
  const int nblk = a.G / QB;
  for (int nb = nb0; nb < nb1; ++nb) {
    __m256 out0 = _mm256_setzero_ps(), out1 = _mm256_setzero_ps();
    const uint8_t* wp = a.w + (size_t)nb * (a.K / 8) * 64;
    for (int g = 0; g < a.K / a.G; ++g) {
      __m256 G1a = _mm256_setzero_ps(), G1b = _mm256_setzero_ps();
      float G0 = 0.f;
      for (int bi = 0; bi < nblk; ++bi) {
        const int b = g * nblk + bi;
        const uint8_t* ch = wp + (size_t)b * 4 * 64;
        const int8_t* xb = a.xq + b * QB;
        __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          int32_t xa, xc;
          std::memcpy(&xa, xb + c * 8, 4);
          std::memcpy(&xc, xb + c * 8 + 4, 4);
          __m256i va = _mm256_set1_epi32(xa), vc = _mm256_set1_epi32(xc);
          __m256i v0 = _mm256_loadu_si256((const __m256i*)(ch + c * 64));
          __m256i v1 = _mm256_loadu_si256((const __m256i*)(ch + c * 64 + 32));
          __m256i p0 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v0, m4), va),
                                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), vc));
          __m256i p1 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v1, m4), va),
                                        _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), vc));
          acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p0, ones));
          acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
        }
        __m256 xsb = _mm256_set1_ps(a.xs[b]);
        G1a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc0), xsb, G1a);
        G1b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc1), xsb, G1b);
        G0 += a.xsum[b];
      }
      const uint32_t* sp = a.sz + (size_t)g * a.N + nb * 16;
      __m256 g0 = _mm256_set1_ps(G0), e8 = _mm256_set1_ps(8.f);
      __m256i s0 = _mm256_loadu_si256((const __m256i*)sp), s1 = _mm256_loadu_si256((const __m256i*)(sp + 8));
      out0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(s0, 16)), _mm256_fnmadd_ps(e8, g0, G1a), out0);
      out0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(s0, hi16)), g0, out0);
      out1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(s1, 16)), _mm256_fnmadd_ps(e8, g0, G1b), out1);
      out1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(s1, hi16)), g0, out1);
    }
    _mm256_storeu_ps(a.y + nb * 16, out0);
    _mm256_storeu_ps(a.y + nb * 16 + 8, out1);
  }
}

// ------------------------------------------------------------------------------------------ int8
struct I8Args {
  const int8_t* w; const uint16_t* scale; const int8_t* xq; const float* xs; const int32_t* xsum; float* y;
  int N, K;
};

void i8_scalar(const I8Args& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    const int8_t* wr = a.w + (size_t)n * a.K;
    float s = 0.f;
    for (int b = 0; b < a.K / QB; ++b) {
      int32_t acc = 0;
      for (int k = b * QB; k < (b + 1) * QB; ++k) acc += (int32_t)wr[k] * a.xq[k];
      s += a.xs[b] * (float)acc;
    }
    a.y[n] = s * bf16f(a.scale[n]);
  }
}

// Row-major: one 64-byte load covers 64 k of a row (two activation blocks: lanes 0-7 and 8-15). The signed
// codes become unsigned by flipping the sign bit (w + 128); 128 * sum(xq) per 4 k is subtracted up front.
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void i8_avx512(const I8Args& a, int n0, int n1, const int32_t* negcorr, const float* xsv) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const int nc = a.K / 64;
  for (int n = n0; n < n1; n += 4) {
    const int rows = std::min(4, n1 - n);
    __m512 f[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int c = 0; c < nc; ++c) {
      __m512i xv = _mm512_loadu_si512(a.xq + c * 64);
      __m512i nc0 = _mm512_loadu_si512(negcorr + c * 16);
      __m512 sv = _mm512_loadu_ps(xsv + c * 16);
      for (int r = 0; r < rows; ++r) {
        __m512i v = _mm512_xor_si512(_mm512_loadu_si512(a.w + (size_t)(n + r) * a.K + c * 64), flip);
        __m512i acc = _mm512_dpbusd_epi32(nc0, v, xv);
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), sv, f[r]);
      }
    }
    for (int r = 0; r < rows; ++r) a.y[n + r] = _mm512_reduce_add_ps(f[r]) * bf16f(a.scale[n + r]);
  }
}

__attribute__((target("avx2,fma")))
void i8_avx2(const I8Args& a, int n0, int n1) {
  // sign trick of vpmaddubsw: |w| (unsigned) times sign(w) * x (signed); products summed in int16 pairs
  const __m256i ones = _mm256_set1_epi16(1);
  const int nc = a.K / 32;
  for (int n = n0; n < n1; ++n) {
    const int8_t* wr = a.w + (size_t)n * a.K;
    __m256 f = _mm256_setzero_ps();
    for (int c = 0; c < nc; ++c) {
      __m256i w = _mm256_loadu_si256((const __m256i*)(wr + c * 32));
      __m256i x = _mm256_loadu_si256((const __m256i*)(a.xq + c * 32));
      __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)), ones);
      f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(a.xs[c]), f);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
    s = _mm_hadd_ps(s, s); s = _mm_hadd_ps(s, s);
    a.y[n] = _mm_cvtss_f32(s) * bf16f(a.scale[n]);
  }
}

int g_path = -1;  // 2: avx512-vnni, 1: avx2, 0: scalar; -1: not chosen yet
int path() {
  if (g_path < 0) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")) g_path = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) g_path = 1;
    else g_path = 0;
  }
  return g_path;
}

}  // namespace

// x [K] or [1, K] (float32/bfloat16); w tile16 uint8 [N/16, K*8]; sz bfloat16 [K/G, N, 2] -> [N] in x's dtype
at::Tensor int4_gemv_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group, int64_t N) {
  const int K = (int)x.numel(), G = (int)group;
  TORCH_CHECK(K % QB == 0 && G % QB == 0 && K % G == 0 && N % 16 == 0, "int4_gemv_q8: K and group must be multiples of 32, N of 16");
  TORCH_CHECK(w.is_contiguous() && sz.is_contiguous() && sz.scalar_type() == at::kBFloat16, "int4_gemv_q8: bad layout");
  std::vector<int8_t> xq(K); std::vector<float> xs(K / QB), xsum(K / QB); std::vector<int32_t> xsi(K / QB);
  quantize_row(x, K, xq.data(), xs.data(), xsum.data(), xsi.data());
  std::vector<float> yf(N);
  I4Args a{w.data_ptr<uint8_t>(), (const uint32_t*)sz.data_ptr(), xq.data(), xs.data(), xsum.data(), yf.data(), (int)N, K, G};
  const int p = path();
  at::parallel_for(0, N / 16, 16, [&](int64_t b0, int64_t b1) {
    if (p == 2) i4_avx512(a, (int)b0, (int)b1);
    else if (p == 1) i4_avx2(a, (int)b0, (int)b1);
    else i4_scalar(a, (int)b0, (int)b1);
  });
  return finish(yf, x);
}

// x [K] or [1, K]; w int8 [N, K]; scale bfloat16 [N] -> [N] in x's dtype
at::Tensor int8_gemv_q8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int K = (int)x.numel(), N = (int)w.size(0);
  TORCH_CHECK(K % QB == 0 && w.size(1) == K && w.is_contiguous() && scale.scalar_type() == at::kBFloat16, "int8_gemv_q8: bad layout");
  std::vector<int8_t> xq(K); std::vector<float> xs(K / QB), xsum(K / QB); std::vector<int32_t> xsi(K / QB);
  quantize_row(x, K, xq.data(), xs.data(), xsum.data(), xsi.data());
  std::vector<float> yf(N);
  I8Args a{w.data_ptr<int8_t>(), (const uint16_t*)scale.data_ptr(), xq.data(), xs.data(), xsi.data(), yf.data(), N, K};
  int p = path();
  if (p == 2 && K % 64 != 0) p = 1;
  std::vector<int32_t> negcorr; std::vector<float> xsv;
  if (p == 2) {   // per 4-k lane: -128 * sum of its 4 xq; per lane: its block's scale
    negcorr.resize(K / 4); xsv.resize(K / 4);
    for (int l = 0; l < K / 4; ++l) {
      int32_t s = 0;
      for (int j = 0; j < 4; ++j) s += xq[l * 4 + j];
      negcorr[l] = -128 * s;
      xsv[l] = xs[l * 4 / QB];
    }
  }
  at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
    if (p == 2) i8_avx512(a, (int)n0, (int)n1, negcorr.data(), xsv.data());
    else if (p == 1) i8_avx2(a, (int)n0, (int)n1);
    else i8_scalar(a, (int)n0, (int)n1);
  });
  return finish(yf, x);
}


// ================================================================================================
// Float-activation kernels (the default). They reproduce the reference layouts' arithmetic: the activation
// row is rounded to bfloat16 as the reference casts it, the weight is dequantized exactly in registers,
// products are accumulated in float32 and each output is rounded to bfloat16 as the reference returns it.
// They differ from PyTorch's kernels only by the order of float32 additions.
namespace {

inline uint16_t f2bf(float f) {   // round to nearest even, as at::BFloat16
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float rbf(float f) { return bf16f(f2bf(f)); }

int g_fpath = -1;  // 2: avx512-bf16 (int4) / avx512f (int8), 1: avx2, 0: scalar
int fpath() {
  if (g_fpath < 0) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16")) g_fpath = 2;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) g_fpath = 1;
    else g_fpath = 0;
  }
  return g_fpath;
}

// One prepared activation row: bf16-rounded values, their bf16 bits in the int4 kernel's pair order, group sums.
struct Prep {
  std::vector<float> xb; std::vector<uint32_t> xp; std::vector<float> gs;
  void make(const float* x, int K, int G, bool pairs) {
    xb.resize(K);
    for (int k = 0; k < K; ++k) xb[k] = rbf(x[k]);
    if (G > 0) {
      gs.assign(K / G, 0.f);
      for (int g = 0; g < K / G; ++g) { float s = 0.f; for (int k = g * G; k < (g + 1) * G; ++k) s += xb[k]; gs[g] = s; }
    }
    if (pairs) {   // per 8 k: (k0, k0+2), (k0+1, k0+3), (k0+4, k0+6), (k0+5, k0+7)
      xp.resize(K / 2);
      static const int lo[4] = {0, 1, 4, 5};
      for (int c = 0; c < K / 8; ++c)
        for (int i = 0; i < 4; ++i)
          xp[c * 4 + i] = (uint32_t)f2bf(xb[c * 8 + lo[i]]) | ((uint32_t)f2bf(xb[c * 8 + lo[i] + 2]) << 16);
    }
  }
};

// Software prefetch: a thread's tile16 codes are one linear stream, but the scale/zero table is read as K/G
// strided streams (64 bytes of each group's row per block), more than the hardware prefetcher follows. Each block
// prefetches the codes PF_BLOCKS blocks ahead and its groups' scales one block ahead: 1.46 -> 1.17 ms for a
// Gemma-3-like set of 72 matrices read cold (48 GB/s, against 48 GB/s for torch.sum over buffers of that size).
constexpr int PF_BLOCKS = 2, PF_SZ = 1;
struct F4 { const uint8_t* w; const uint32_t* sz; const Prep* p; float* y; int N, K, G; };

void f4_scalar(const F4& a, int nb0, int nb1) {
  for (int nb = nb0; nb < nb1; ++nb) {
    float out[16] = {0};
    const uint8_t* wp = a.w + (size_t)nb * (a.K / 8) * 64;
    for (int g = 0; g < a.K / a.G; ++g) {
      float acc[16] = {0};
      for (int c = g * a.G / 8; c < (g + 1) * a.G / 8; ++c) {
        const uint8_t* ch = wp + (size_t)c * 64;
        const float* xc = a.p->xb.data() + c * 8;
        for (int r = 0; r < 16; ++r)
          for (int j = 0; j < 4; ++j) {
            uint8_t v = ch[r * 4 + j];
            acc[r] += (float)((int)(v & 15) - 8) * xc[j] + (float)((int)(v >> 4) - 8) * xc[4 + j];
          }
      }
      const uint32_t* s = a.sz + (size_t)g * a.N + nb * 16;
      for (int r = 0; r < 16; ++r) out[r] += acc[r] * bf16_lo(s[r]) + bf16_hi(s[r]) * a.p->gs[g];
    }
    std::memcpy(a.y + nb * 16, out, sizeof(out));
  }
}


// AVX2: codes to float32 in registers (shift, mask, convert), FMA with the broadcast activation; sum(u * x)
// per group, then (sum(u * x) - 8 * sum(x)) * scale + zero * sum(x).
__attribute__((target("avx2,fma")))
void f4_avx2(const F4& a, int nb0, int nb1) {
  const __m256i m = _mm256_set1_epi32(15);
  const __m256i hi16 = _mm256_set1_epi32((int)0xFFFF0000u);
  const int cpg = a.G / 8;
  const float* xb = a.p->xb.data();
  const size_t ahead = (size_t)PF_BLOCKS * (a.K / 8) * 64;
#define LEANLM_F4_STEP(J)                                                                                   \
  {                                                                                                         \
    const __m256 xa = _mm256_broadcast_ss(xc + J), xh = _mm256_broadcast_ss(xc + 4 + J);                    \
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v0, 8 * J), m)), xa, acc0);     \
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v1, 8 * J), m)), xa, acc1);     \
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v0, 8 * J + 4), m)), xh, acc0); \
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v1, 8 * J + 4), m)), xh, acc1); \
  }
  for (int nb = nb0; nb < nb1; ++nb) {
    __m256 out0 = _mm256_setzero_ps(), out1 = _mm256_setzero_ps();
    const uint8_t* wp = a.w + (size_t)nb * (a.K / 8) * 64;
    for (int g = 0; g < a.K / a.G; ++g) {
      __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
      for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
        _mm_prefetch((const char*)(wp + ahead + (size_t)c * 64), _MM_HINT_T0);
        const __m256i v0 = _mm256_loadu_si256((const __m256i*)(wp + (size_t)c * 64));
        const __m256i v1 = _mm256_loadu_si256((const __m256i*)(wp + (size_t)c * 64 + 32));
        const float* xc = xb + c * 8;
        LEANLM_F4_STEP(0) LEANLM_F4_STEP(1) LEANLM_F4_STEP(2) LEANLM_F4_STEP(3)
      }
      const uint32_t* sp = a.sz + (size_t)g * a.N + nb * 16;
      _mm_prefetch((const char*)(sp + PF_SZ * 16), _MM_HINT_T0);
      const __m256 gs = _mm256_set1_ps(a.p->gs[g]), e8 = _mm256_set1_ps(8.f);
      const __m256i s0 = _mm256_loadu_si256((const __m256i*)sp), s1 = _mm256_loadu_si256((const __m256i*)(sp + 8));
      out0 = _mm256_fmadd_ps(_mm256_fnmadd_ps(e8, gs, acc0), _mm256_castsi256_ps(_mm256_slli_epi32(s0, 16)), out0);
      out0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(s0, hi16)), gs, out0);
      out1 = _mm256_fmadd_ps(_mm256_fnmadd_ps(e8, gs, acc1), _mm256_castsi256_ps(_mm256_slli_epi32(s1, 16)), out1);
      out1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(s1, hi16)), gs, out1);
    }
#undef LEANLM_F4_STEP
    _mm256_storeu_ps(a.y + nb * 16, out0);
    _mm256_storeu_ps(a.y + nb * 16 + 8, out1);
  }
}

// AVX-512 BF16: each 32-bit lane is one row's 4 bytes; (v >> s) & 0x000F000F puts two codes in the two 16-bit
// halves, vpermw maps each code u to bfloat16(u - 8) (exact), and vdpbf16ps multiplies the pair by the
// activation pair (bfloat16, exact products) into float32. M activation rows at once (M = 1: a one-row call): each
// 64-byte chunk's codes are widened once and multiplied into every row's own accumulators, each row's in the same
// dpbf16 sequence whatever M is, so every row's outputs are the bits of a one-row call; the widening, the kernel's
// main cost after the read, is paid once for all rows.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void f4_avx512_rows(const F4* a, int nb0, int nb1) {
  alignas(64) uint16_t tab[32];
  for (int i = 0; i < 32; ++i) tab[i] = f2bf((float)((i & 15) - 8));
  const __m512i T = _mm512_load_si512(tab);
  const __m512i m = _mm512_set1_epi32(0x000F000F);
  const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
  const int K = a[0].K, G = a[0].G, N = a[0].N, cpg = G / 8;
  const uint32_t* xp[M];
  for (int r = 0; r < M; ++r) xp[r] = a[r].p->xp.data();
  const size_t ahead = (size_t)PF_BLOCKS * (K / 8) * 64;
  for (int nb = nb0; nb < nb1; ++nb) {
    __m512 out[M];
    for (int r = 0; r < M; ++r) out[r] = _mm512_setzero_ps();
    const uint8_t* wp = a[0].w + (size_t)nb * (K / 8) * 64;
    for (int g = 0; g < K / G; ++g) {
      __m512 acc0[M], acc1[M];
      for (int r = 0; r < M; ++r) { acc0[r] = _mm512_setzero_ps(); acc1[r] = _mm512_setzero_ps(); }
      for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
        _mm_prefetch((const char*)(wp + ahead + (size_t)c * 64), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wp + (size_t)c * 64);
        const __m512bh d0 = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, m), T);
        const __m512bh d1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi32(v, 8), m), T);
        const __m512bh d2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi32(v, 4), m), T);
        const __m512bh d3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srli_epi32(v, 12), m), T);
        for (int r = 0; r < M; ++r) {
          const uint32_t* xc = xp[r] + c * 4;
          acc0[r] = _mm512_dpbf16_ps(acc0[r], d0, (__m512bh)_mm512_set1_epi32((int)xc[0]));
          acc1[r] = _mm512_dpbf16_ps(acc1[r], d1, (__m512bh)_mm512_set1_epi32((int)xc[1]));
          acc0[r] = _mm512_dpbf16_ps(acc0[r], d2, (__m512bh)_mm512_set1_epi32((int)xc[2]));
          acc1[r] = _mm512_dpbf16_ps(acc1[r], d3, (__m512bh)_mm512_set1_epi32((int)xc[3]));
        }
      }
      const __m512i sv = _mm512_loadu_si512(a[0].sz + (size_t)g * N + nb * 16);
      _mm_prefetch((const char*)(a[0].sz + (size_t)g * N + (nb + PF_SZ) * 16), _MM_HINT_T0);
      const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(sv, 16)), zr = _mm512_castsi512_ps(_mm512_and_si512(sv, hi16));
      for (int r = 0; r < M; ++r) {
        out[r] = _mm512_fmadd_ps(_mm512_add_ps(acc0[r], acc1[r]), sc, out[r]);
        out[r] = _mm512_fmadd_ps(zr, _mm512_set1_ps(a[r].p->gs[g]), out[r]);
      }
    }
    for (int r = 0; r < M; ++r) _mm512_storeu_ps(a[r].y + nb * 16, out[r]);
  }
}

// Row-major int8 rows are read a few at a time, each only K bytes long: too short for the hardware prefetcher to
// follow, so a pass prefetches the rows that follow it (twice the speed on a matrix that does not fit in cache,
// Gemma-3's 262144 x 640 head).
struct F8 { const int8_t* w; const uint16_t* scale; const float* xb; float* y; int N, K; };

void f8_scalar(const F8& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n) {
    const int8_t* wr = a.w + (size_t)n * a.K;
    float s = 0.f;
    for (int k = 0; k < a.K; ++k) s += (float)wr[k] * a.xb[k];
    a.y[n] = s * bf16f(a.scale[n]);
  }
}


// int8 codes sign-extended and converted to float32 in registers, 4 weight rows per pass sharing the activation
// loads; M activation rows at once (M = 1: a one-row call): each weight row's 16 codes are converted once and
// multiplied into every activation row's own accumulator in the same order whatever M is, so each output is the bits
// of a one-row call.
template <int M>
__attribute__((target("avx512f,avx512bw")))
void f8_avx512_rows(const F8* a, int n0, int n1) {
  const int K = a[0].K, K16 = K / 16 * 16;
  for (int n = n0; n < n1; n += 4) {
    const int rows = std::min(4, n1 - n);
    __m512 f[M][4];
    for (int j = 0; j < M; ++j) for (int r = 0; r < 4; ++r) f[j][r] = _mm512_setzero_ps();
    const int8_t* wr[4];
    for (int r = 0; r < 4; ++r) wr[r] = a[0].w + (size_t)(n + std::min(r, rows - 1)) * K;
    const char* ahead = (const char*)(a[0].w + (size_t)(n + 4) * K);
    for (int k = 0; k < K16; k += 16) {
      if ((k & 63) == 0)
        for (int r = 0; r < 4; ++r) _mm_prefetch(ahead + (size_t)r * K + k, _MM_HINT_T0);
      __m512 wv[4];
      for (int r = 0; r < 4; ++r) wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(wr[r] + k))));
      for (int j = 0; j < M; ++j) {
        const __m512 xv = _mm512_loadu_ps(a[j].xb + k);
        for (int r = 0; r < 4; ++r) f[j][r] = _mm512_fmadd_ps(wv[r], xv, f[j][r]);
      }
    }
    for (int j = 0; j < M; ++j)
      for (int r = 0; r < rows; ++r) {
        float s = _mm512_reduce_add_ps(f[j][r]);
        for (int k = K16; k < K; ++k) s += (float)wr[r][k] * a[j].xb[k];
        a[j].y[n + r] = s * bf16f(a[j].scale[n + r]);
      }
  }
}

__attribute__((target("avx2,fma")))
void f8_avx2(const F8& a, int n0, int n1) {
  const int K8 = a.K / 8 * 8;
  for (int n = n0; n < n1; n += 2) {
    const int rows = std::min(2, n1 - n);
    const int8_t* w0 = a.w + (size_t)n * a.K;
    const int8_t* w1 = a.w + (size_t)(n + rows - 1) * a.K;
    const char* ahead = (const char*)(a.w + (size_t)(n + 4) * a.K);
    __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
    for (int k = 0; k < K8; k += 8) {
      if ((k & 63) == 0) { _mm_prefetch(ahead + k, _MM_HINT_T0); _mm_prefetch(ahead + a.K + k, _MM_HINT_T0); }
      const __m256 xv = _mm256_loadu_ps(a.xb + k);
      f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w0 + k)))), xv, f0);
      f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w1 + k)))), xv, f1);
    }
    __m256 fs[2] = {f0, f1};
    const int8_t* ws[2] = {w0, w1};
    for (int r = 0; r < rows; ++r) {
      __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(fs[r]), _mm256_extractf128_ps(fs[r], 1));
      s4 = _mm_hadd_ps(s4, s4); s4 = _mm_hadd_ps(s4, s4);
      float s = _mm_cvtss_f32(s4);
      for (int k = K8; k < a.K; ++k) s += (float)ws[r][k] * a.xb[k];
      a.y[n + r] = s * bf16f(a.scale[n + r]);
    }
  }
}

// int8 "tile16" layout (kind 9): uint8/int8 [N/16][K/4][64]; byte j*16 + r of chunk c holds code (row nb*16 + r,
// k = 4c + j). As int4's tile16, each thread reads one linear stream: row-major codes read 4 rows a pass ran a third
// slower per byte than the int4 kernel where each core draws ~15-20 GB/s (bench/results/gemv_bytes.md). Lane r of
// the sums is row r; per block, four sums (k = 4c + j for j = 0..3), folded (s0 + s1) + (s2 + s3), times the row's
// scale.
inline void f8t_scalar(const F8& a, int nb0, int nb1) {
  for (int nb = nb0; nb < nb1; ++nb) {
    float acc[4][16] = {};
    const int8_t* wp = a.w + (size_t)nb * a.K * 16;
    for (int c = 0; c < a.K / 4; ++c)
      for (int j = 0; j < 4; ++j)
        for (int r = 0; r < 16; ++r) acc[j][r] += (float)wp[(size_t)c * 64 + j * 16 + r] * a.xb[4 * c + j];
    for (int r = 0; r < 16; ++r)
      a.y[nb * 16 + r] = ((acc[0][r] + acc[1][r]) + (acc[2][r] + acc[3][r])) * bf16f(a.scale[nb * 16 + r]);
  }
}

__attribute__((target("avx512f,avx512bw")))
inline __m512 f8t_scales(const uint16_t* s) {   // 16 bfloat16 scales -> float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)s)), 16));
}


// M activation rows at once (M = 1: a one-row call): each chunk's codes converted once, every row's sums formed in
// the same order whatever M is
template <int M>
__attribute__((target("avx512f,avx512bw")))
void f8t_avx512_rows(const F8* a, int nb0, int nb1) {
  const size_t blk = (size_t)a[0].K * 16, ahead = PF_BLOCKS * blk;
  const int K = a[0].K;
  for (int nb = nb0; nb < nb1; ++nb) {
    const int8_t* wp = a[0].w + nb * blk;
    __m512 s[M][4];
    for (int m = 0; m < M; ++m) for (int j = 0; j < 4; ++j) s[m][j] = _mm512_setzero_ps();
    for (int c = 0; c < K / 4; ++c) {
      const int8_t* ch = wp + (size_t)c * 64;
      _mm_prefetch((const char*)(ch + ahead), _MM_HINT_T0);
      __m512 w[4];
      for (int j = 0; j < 4; ++j) w[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(ch + 16 * j))));
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j) s[m][j] = _mm512_fmadd_ps(w[j], _mm512_set1_ps(a[m].xb[4 * c + j]), s[m][j]);
    }
    const __m512 sc = f8t_scales(a[0].scale + nb * 16);
    for (int m = 0; m < M; ++m)
      _mm512_storeu_ps(a[m].y + nb * 16, _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(s[m][0], s[m][1]), _mm512_add_ps(s[m][2], s[m][3])), sc));
  }
}

__attribute__((target("avx2,fma")))
void f8t_avx2(const F8& a, int nb0, int nb1) {
  const size_t blk = (size_t)a.K * 16, ahead = PF_BLOCKS * blk;
  for (int nb = nb0; nb < nb1; ++nb) {
    const int8_t* wp = a.w + nb * blk;
    __m256 lo[4], hi[4];
    for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
    for (int c = 0; c < a.K / 4; ++c) {
      const int8_t* ch = wp + (size_t)c * 64;
      _mm_prefetch((const char*)(ch + ahead), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(ch + 16 * j));
        const __m256 xj = _mm256_set1_ps(a.xb[4 * c + j]);
        lo[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), xj, lo[j]);
        hi[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))), xj, hi[j]);
      }
    }
    const __m256 l = _mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3]));
    const __m256 h = _mm256_add_ps(_mm256_add_ps(hi[0], hi[1]), _mm256_add_ps(hi[2], hi[3]));
    alignas(32) float ls[8], hs[8];
    _mm256_store_ps(ls, l); _mm256_store_ps(hs, h);
    for (int r = 0; r < 8; ++r) {
      a.y[nb * 16 + r] = ls[r] * bf16f(a.scale[nb * 16 + r]);
      a.y[nb * 16 + 8 + r] = hs[r] * bf16f(a.scale[nb * 16 + 8 + r]);
    }
  }
}

// A packed matrix as the step sees it: kind 4 (tile16 codes + [K/G, N, 2] bf16 scale/zero) or 8 (int8 [N, K]
// codes + bf16 [N] scale).
// kind 9: int8 tile16 codes (f8t) + the same scales.
struct Mat { int kind = 0; const uint8_t* a = nullptr; const uint16_t* b = nullptr; int G = 0, N = 0, K = 0; };

// One thread's share of one row: int4 blocks b0..b1 (16 outputs each) or int8 outputs n0..n1, on the CPU's path, each
// output rounded to bfloat16 by the thread that computed it (a serial pass over Gemma-3's 262144 logits costs 0.1 ms).
void run4(int path, const F4& a, int64_t b0, int64_t b1) {
  if (path == 2) f4_avx512_rows<1>(&a, (int)b0, (int)b1);
  else if (path == 1) f4_avx2(a, (int)b0, (int)b1);
  else f4_scalar(a, (int)b0, (int)b1);
  for (int64_t n = b0 * 16; n < b1 * 16; ++n) a.y[n] = rbf(a.y[n]);
}
void run8(int path, const F8& a, int64_t n0, int64_t n1) {
  if (path == 2) f8_avx512_rows<1>(&a, (int)n0, (int)n1);
  else if (path == 1) f8_avx2(a, (int)n0, (int)n1);
  else f8_scalar(a, (int)n0, (int)n1);
  for (int64_t n = n0; n < n1; ++n) a.y[n] = rbf(a.y[n]);
}

// Up to 4 rows over the same blocks / outputs: on AVX-512 one pass shares the weight's widening (f4/f8_avx512_rows),
// elsewhere one one-row call per row; either way each row gets a one-row call's bits.
template <int M> void run4_m(const F4* a, int64_t b0, int64_t b1) {
  f4_avx512_rows<M>(a, (int)b0, (int)b1);
  for (int r = 0; r < M; ++r) for (int64_t n = b0 * 16; n < b1 * 16; ++n) a[r].y[n] = rbf(a[r].y[n]);
}
void run8t(int path, const F8& a, int64_t b0, int64_t b1) {   // int8 tile16 blocks b0..b1
  if (path == 2) f8t_avx512_rows<1>(&a, (int)b0, (int)b1);
  else if (path == 1) f8t_avx2(a, (int)b0, (int)b1);
  else f8t_scalar(a, (int)b0, (int)b1);
  for (int64_t n = b0 * 16; n < b1 * 16; ++n) a.y[n] = rbf(a.y[n]);
}
template <int M> void run8t_m(const F8* a, int64_t b0, int64_t b1) {
  f8t_avx512_rows<M>(a, (int)b0, (int)b1);
  for (int r = 0; r < M; ++r) for (int64_t n = b0 * 16; n < b1 * 16; ++n) a[r].y[n] = rbf(a[r].y[n]);
}
void run8t_tile(int path, const F8* a, int M, int64_t b0, int64_t b1) {
  if (path != 2) { for (int r = 0; r < M; ++r) run8t(path, a[r], b0, b1); return; }
  if (M == 1) run8t_m<1>(a, b0, b1); else if (M == 2) run8t_m<2>(a, b0, b1); else if (M == 3) run8t_m<3>(a, b0, b1); else run8t_m<4>(a, b0, b1);
}
template <int M> void run8_m(const F8* a, int64_t n0, int64_t n1) {
  f8_avx512_rows<M>(a, (int)n0, (int)n1);
  for (int r = 0; r < M; ++r) for (int64_t n = n0; n < n1; ++n) a[r].y[n] = rbf(a[r].y[n]);
}
void run4_tile(int path, const F4* a, int M, int64_t b0, int64_t b1) {
  if (path != 2) { for (int r = 0; r < M; ++r) run4(path, a[r], b0, b1); return; }
  if (M == 1) run4_m<1>(a, b0, b1); else if (M == 2) run4_m<2>(a, b0, b1); else if (M == 3) run4_m<3>(a, b0, b1); else run4_m<4>(a, b0, b1);
}
void run8_tile(int path, const F8* a, int M, int64_t n0, int64_t n1) {
  if (path != 2) { for (int r = 0; r < M; ++r) run8(path, a[r], n0, n1); return; }
  if (M == 1) run8_m<1>(a, n0, n1); else if (M == 2) run8_m<2>(a, n0, n1); else if (M == 3) run8_m<3>(a, n0, n1); else run8_m<4>(a, n0, n1);
}
constexpr int ROW_TILE = 4;

// y[N] = bf16(x[K] @ W.T): the one entry point of the float kernels.
void gemv(const Mat& m, const float* x, float* y, Prep& p) {
  const int path = fpath();
  if (m.kind == 4) {
    p.make(x, m.K, m.G, path == 2);
    F4 a{m.a, (const uint32_t*)m.b, &p, y, m.N, m.K, m.G};
    at::parallel_for(0, m.N / 16, 8, [&](int64_t b0, int64_t b1) { run4(path, a, b0, b1); });
  } else if (m.kind == 9) {
    p.make(x, m.K, 0, false);
    F8 a{(const int8_t*)m.a, m.b, p.xb.data(), y, m.N, m.K};
    at::parallel_for(0, m.N / 16, 8, [&](int64_t b0, int64_t b1) { run8t(path, a, b0, b1); });
  } else {
    p.make(x, m.K, 0, false);
    F8 a{(const int8_t*)m.a, m.b, p.xb.data(), y, m.N, m.K};
    at::parallel_for(0, m.N, 256, [&](int64_t n0, int64_t n1) { run8(path, a, n0, n1); });
  }
}

// y[M, N] = bf16(x[M, K] @ W.T) for a few rows (a speculative verification, a small decode batch), each row through
// the one-row kernel, so every row's sums are exactly those of a one-row call. Each thread walks its share of the
// output in chunks of about CHUNK_BYTES of weight and runs every row over a chunk while it is in cache: the weight
// is read from memory once for all M rows instead of M times.
constexpr size_t CHUNK_BYTES = 64 * 1024;
void gemm_rows(const Mat& m, const float* x, int M, float* y, std::vector<Prep>& ps) {
  const int path = fpath();
  if ((int)ps.size() < M) ps.resize(M);
  if (m.kind == 4) {
    std::vector<F4> fs;
    for (int r = 0; r < M; ++r) ps[r].make(x + (size_t)r * m.K, m.K, m.G, path == 2);
    for (int r = 0; r < M; ++r) fs.push_back(F4{m.a, (const uint32_t*)m.b, &ps[r], y + (size_t)r * m.N, m.N, m.K, m.G});
    const int64_t chunk = std::max<int64_t>(1, (int64_t)(CHUNK_BYTES / ((size_t)m.K * 8)));   // a block: 16 rows, K * 8 bytes
    at::parallel_for(0, m.N / 16, 8, [&](int64_t b0, int64_t b1) {
      for (int64_t c0 = b0; c0 < b1; c0 += chunk) {
        const int64_t c1 = std::min(b1, c0 + chunk);
        for (int r = 0; r < M; r += ROW_TILE) run4_tile(path, fs.data() + r, std::min(ROW_TILE, M - r), c0, c1);
      }
    });
  } else if (m.kind == 9) {
    std::vector<F8> fs;
    for (int r = 0; r < M; ++r) ps[r].make(x + (size_t)r * m.K, m.K, 0, false);
    for (int r = 0; r < M; ++r) fs.push_back(F8{(const int8_t*)m.a, m.b, ps[r].xb.data(), y + (size_t)r * m.N, m.N, m.K});
    const int64_t chunk = std::max<int64_t>(1, (int64_t)(CHUNK_BYTES / ((size_t)m.K * 16)));   // a block: 16 rows, K * 16 bytes
    at::parallel_for(0, m.N / 16, 8, [&](int64_t b0, int64_t b1) {
      for (int64_t c0 = b0; c0 < b1; c0 += chunk) {
        const int64_t c1 = std::min(b1, c0 + chunk);
        for (int r = 0; r < M; r += ROW_TILE) run8t_tile(path, fs.data() + r, std::min(ROW_TILE, M - r), c0, c1);
      }
    });
  } else {
    std::vector<F8> fs;
    for (int r = 0; r < M; ++r) ps[r].make(x + (size_t)r * m.K, m.K, 0, false);
    for (int r = 0; r < M; ++r) fs.push_back(F8{(const int8_t*)m.a, m.b, ps[r].xb.data(), y + (size_t)r * m.N, m.N, m.K});
    const int64_t chunk = std::max<int64_t>(4, (int64_t)(CHUNK_BYTES / (size_t)m.K) / 4 * 4);   // weight rows (4 per pass)
    at::parallel_for(0, m.N, 256, [&](int64_t n0, int64_t n1) {
      for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
        const int64_t c1 = std::min(n1, c0 + chunk);
        for (int r = 0; r < M; r += ROW_TILE) run8_tile(path, fs.data() + r, std::min(ROW_TILE, M - r), c0, c1);
      }
    });
  }
}

// ------------------------------------------------------------------------------------------ float32
// y[M, N] = x[M, K] @ W[N, K].T in float32 for a few rows (decode steps and speculative verifications of a float32
// model). Each output is one row's dot product summed in the same order whatever M is (16 or 8 lanes over k, a
// fixed lane reduction, the tail last), so a T-token verification gives exactly the logits of T one-token steps.
// A pass takes 2 weight rows x up to 8 activation rows (AVX-512; 1 x 4 on AVX2), so each weight row is read from
// memory once for all M rows; MKL's GEMM for M > 1 repacks the weight each call (38 ms against 27 for one row on SmolLM2).
struct FF { const float* w; const float* x; float* y; int M, N, K; };

void ff_scalar(const FF& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n)
    for (int m = 0; m < a.M; ++m) {
      float lane[16] = {0};
      const float* wr = a.w + (size_t)n * a.K; const float* xr = a.x + (size_t)m * a.K;
      const int K16 = a.K / 16 * 16;
      for (int k = 0; k < K16; ++k) lane[k & 15] += wr[k] * xr[k];
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += lane[i];
      for (int k = K16; k < a.K; ++k) s += wr[k] * xr[k];
      a.y[(size_t)m * a.N + n] = s;
    }
}

// Two weight rows x MB activation rows per pass (MB <= 8: 16 accumulators), the rows of a pass summed in registers.
template <int MB>
__attribute__((target("avx512f")))
void ff512_pass(const FF& a, int n, int rn, int m) {
  const int K16 = a.K / 16 * 16;
  const float* wr[2] = {a.w + (size_t)n * a.K, a.w + (size_t)(n + rn - 1) * a.K};
  const float* xr[MB];
  for (int j = 0; j < MB; ++j) xr[j] = a.x + (size_t)(m + j) * a.K;
  __m512 acc[2][MB];
  for (int r = 0; r < 2; ++r) for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int k = 0; k < K16; k += 16) {
    const __m512 w0 = _mm512_loadu_ps(wr[0] + k), w1 = _mm512_loadu_ps(wr[1] + k);
    for (int j = 0; j < MB; ++j) {
      const __m512 xv = _mm512_loadu_ps(xr[j] + k);
      acc[0][j] = _mm512_fmadd_ps(w0, xv, acc[0][j]);
      acc[1][j] = _mm512_fmadd_ps(w1, xv, acc[1][j]);
    }
  }
  for (int r = 0; r < rn; ++r)
    for (int j = 0; j < MB; ++j) {
      alignas(64) float lane[16];
      _mm512_store_ps(lane, acc[r][j]);
      float s = 0.f;
      for (int i = 0; i < 16; ++i) s += lane[i];
      for (int k = K16; k < a.K; ++k) s += wr[r][k] * xr[j][k];
      a.y[(size_t)(m + j) * a.N + n + r] = s;
    }
}

__attribute__((target("avx512f")))
void ff_avx512(const FF& a, int n0, int n1) {
  for (int n = n0; n < n1; n += 2) {
    const int rn = std::min(2, n1 - n);
    for (int m = 0; m < a.M; m += 8) {
      switch (std::min(8, a.M - m)) {
        case 1: ff512_pass<1>(a, n, rn, m); break;
        case 2: ff512_pass<2>(a, n, rn, m); break;
        case 3: ff512_pass<3>(a, n, rn, m); break;
        case 4: ff512_pass<4>(a, n, rn, m); break;
        case 5: ff512_pass<5>(a, n, rn, m); break;
        case 6: ff512_pass<6>(a, n, rn, m); break;
        case 7: ff512_pass<7>(a, n, rn, m); break;
        default: ff512_pass<8>(a, n, rn, m); break;
      }
    }
  }
}

// One weight row x MB activation rows per pass (MB <= 4), each sum in two 8-lane halves of the same 16-lane order.
template <int MB>
__attribute__((target("avx2,fma")))
void ff256_pass(const FF& a, int n, int m) {
  const int K16 = a.K / 16 * 16;
  const float* wr = a.w + (size_t)n * a.K;
  const float* xr[MB];
  for (int j = 0; j < MB; ++j) xr[j] = a.x + (size_t)(m + j) * a.K;
  __m256 lo[MB], hi[MB];
  for (int j = 0; j < MB; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  for (int k = 0; k < K16; k += 16) {
    const __m256 w0 = _mm256_loadu_ps(wr + k), w1 = _mm256_loadu_ps(wr + k + 8);
    for (int j = 0; j < MB; ++j) {
      lo[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr[j] + k), lo[j]);
      hi[j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr[j] + k + 8), hi[j]);
    }
  }
  for (int j = 0; j < MB; ++j) {
    alignas(32) float lane[16];
    _mm256_store_ps(lane, lo[j]); _mm256_store_ps(lane + 8, hi[j]);
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += lane[i];
    for (int k = K16; k < a.K; ++k) s += wr[k] * xr[j][k];
    a.y[(size_t)(m + j) * a.N + n] = s;
  }
}

__attribute__((target("avx2,fma")))
void ff_avx2(const FF& a, int n0, int n1) {
  for (int n = n0; n < n1; ++n)
    for (int m = 0; m < a.M; m += 4) {
      switch (std::min(4, a.M - m)) {
        case 1: ff256_pass<1>(a, n, m); break;
        case 2: ff256_pass<2>(a, n, m); break;
        case 3: ff256_pass<3>(a, n, m); break;
        default: ff256_pass<4>(a, n, m); break;
      }
    }
}

// x [K] or [M, K] float32, w [N, K] float32 -> [N] or [M, N] float32
at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "f32_gemv: x and w must be float32, w contiguous [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.numel() > 0 && x.size(-1) == K, "f32_gemv: the activation rows have ", x.size(-1), " values, the weight ", K, " inputs");
  const int64_t M = x.numel() / K;
  at::Tensor xf = x.reshape({M, K}).contiguous();
  at::Tensor y = M == 1 && x.dim() == 1 ? at::empty({N}, xf.options()) : at::empty({M, N}, xf.options());
  FF a{w.data_ptr<float>(), xf.data_ptr<float>(), y.data_ptr<float>(), (int)M, (int)N, (int)K};
  const int path = fpath();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {   // blocks of 4 weight rows
    const int n0 = (int)(b0 * 4), n1 = (int)std::min<int64_t>(N, b1 * 4);
    if (path == 2) ff_avx512(a, n0, n1);
    else if (path == 1) ff_avx2(a, n0, n1);
    else ff_scalar(a, n0, n1);
  });
  return y;
}

Mat mat4(const at::Tensor& w, const at::Tensor& sz, int64_t G, int64_t N, int64_t K) {
  TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kByte && w.numel() == N * K / 2, "int4 gemv: the codes must be the tile16 layout uint8 [N/16, K*8]");
  TORCH_CHECK(sz.is_contiguous() && sz.scalar_type() == at::kBFloat16 && sz.numel() == 2 * N * (K / G), "int4 gemv: scales_zeros must be bfloat16 [K/G, N, 2]");
  TORCH_CHECK(G % 8 == 0 && K % G == 0 && N % 16 == 0, "int4 gemv: the group must divide K (multiple of 8), N a multiple of 16");
  return Mat{4, w.data_ptr<uint8_t>(), (const uint16_t*)sz.data_ptr(), (int)G, (int)N, (int)K};
}

// codes int8 [N, K] (row-major, kind 8) or the tile16 layout int8 [N/16, K/4, 64] (kind 9)
Mat mat8(const at::Tensor& w, const at::Tensor& scale) {
  if (w.dim() == 3) {
    TORCH_CHECK(w.is_contiguous() && w.scalar_type() == at::kChar && w.size(2) == 64, "int8 gemv: tiled codes must be int8 [N/16, K/4, 64]");
    TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kBFloat16 && scale.numel() == w.size(0) * 16, "int8 gemv: the scale must be bfloat16 [N]");
    return Mat{9, (const uint8_t*)w.data_ptr(), (const uint16_t*)scale.data_ptr(), 0, (int)w.size(0) * 16, (int)w.size(1) * 4};
  }
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar, "int8 gemv: the codes must be int8 [N, K]");
  TORCH_CHECK(scale.is_contiguous() && scale.scalar_type() == at::kBFloat16 && scale.numel() == w.size(0), "int8 gemv: the scale must be bfloat16 [N]");
  return Mat{8, (const uint8_t*)w.data_ptr(), (const uint16_t*)scale.data_ptr(), 0, (int)w.size(0), (int)w.size(1)};
}

// x [K] or [1, K] -> [N]; x [M, K] (M > 1) -> [M, N] (gemm_rows); in x's dtype
at::Tensor run_op(const Mat& m, const at::Tensor& x) {
  TORCH_CHECK(x.numel() > 0 && x.size(-1) == m.K, "gemv: the activation rows have ", x.size(-1), " values, the weight ", m.K, " inputs");
  const int64_t M = x.numel() / m.K;
  at::Tensor xf = x.reshape({M, m.K}).to(at::kFloat).contiguous();
  at::Tensor y;
  if (M == 1) {
    y = at::empty({m.N}, xf.options());
    thread_local Prep p;
    gemv(m, xf.data_ptr<float>(), y.data_ptr<float>(), p);
  } else {
    y = at::empty({M, m.N}, xf.options());
    thread_local std::vector<Prep> ps;
    gemm_rows(m, xf.data_ptr<float>(), (int)M, y.data_ptr<float>(), ps);
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// exp(x) for x <= 0 within a few ulp (Cody-Waite reduction and Cephes' expf polynomial), written as plain arithmetic
// so that a loop over it vectorizes: std::exp is one libm call per element
inline float exp_le0(float x) {
  x = std::max(x, -87.f);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: std::floor kept the loops over this function scalar
  const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  return y * std::bit_cast<float>(bits);   // not memcpy: a copy through memory kept the loops scalar
}

// SiLU and GELU-tanh through exp_le0 (a loop over them vectorizes; std::exp / std::tanh are libm calls, 0.4-0.7 ms
// per step on SmolLM2 / Gemma-3): sigmoid(a) from e = exp(-|a|), tanh(u) = sign(u) (1 - e) / (1 + e) with e = exp(-2|u|).
inline float silu(float a) {
  const float e = exp_le0(-std::fabs(a));
  return a * (a >= 0.f ? 1.f / (1.f + e) : e / (1.f + e));
}
inline float gelu_tanh(float a) {
  const float u = 0.7978845608028654f * (a + 0.044715f * a * a * a);
  const float e = exp_le0(-2.f * std::fabs(u));
  const float t = std::copysign((1.f - e) / (1.f + e), u);
  return 0.5f * a * (1.f + t);
}

// ------------------------------------------------------------------------------------------ the decode step
// sum of a[i] * b[i] in sixteen partial sums (one or two vector registers once the compiler vectorizes the inner
// loop: a single running sum is a chain of dependent adds that no compiler reorders), folded pairwise. With AVX-512
// and n a multiple of 16 the same sums are written with intrinsics: the compiler folded the 16 partial sums through
// the stack (a chain of store-forwarded scalar adds), which made a paged-attention score cost ~100 cycles per key.
inline float dot(const float* a, const float* b, int n) {
#ifdef __AVX512F__
  if (n % 16 == 0) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int i = 0;
    for (; i + 32 <= n; i += 32) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    }
    if (i < n) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
#endif
  float acc[16] = {};
  int i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  for (int w = 8; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return acc[0];
}

inline void rms(const float* x, const float* w, float* out, int n, float eps) {
  const float ss = dot(x, x, n);
  const float r = 1.f / std::sqrt(ss / (float)n + eps);
  for (int i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

// o[D] = sum over t of (p[t] / sum) * v[keys[t]], in key order. With AVX-512 and D a multiple of 16 (up to 256) the
// output stays in registers across the keys (the plain loop stored and reloaded it for every key).
inline void weighted_sum(const float* p, float sum, const float* v, const int* keys, int n, int D, float* o) {
#ifdef __AVX512F__
  if (D % 16 == 0 && D <= 256) {
    __m512 acc[16];
    const int nv = D / 16;
    for (int i = 0; i < nv; ++i) acc[i] = _mm512_setzero_ps();
    for (int t = 0; t < n; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t] / sum);
      const float* vt = v + (size_t)keys[t] * D;
      for (int i = 0; i < nv; ++i) acc[i] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(vt + 16 * i), acc[i]);
    }
    for (int i = 0; i < nv; ++i) _mm512_storeu_ps(o + 16 * i, acc[i]);
    return;
  }
#endif
  std::fill(o, o + D, 0.f);
  for (int t = 0; t < n; ++t) {
    const float pt = p[t] / sum;
    const float* vt = v + (size_t)keys[t] * D;
    for (int e = 0; e < D; ++e) o[e] = std::fma(pt, vt[e], o[e]);
  }
}

inline const float* fptr(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// A whole batch-1 decode step of a packed decoder (every matmul int4 tile16 or int8, no biases) in one call:
// per layer RMSNorm, qkv GEMV, optional q/k RMSNorm, RoPE, KV-cache write, grouped-query attention over the
// cache, o GEMV, residual (or Gemma's sandwich norms), gate/up GEMV, SiLU or GELU-tanh times up, down GEMV,
// residual; then the final norm, the head GEMV and the optional soft-cap. Rounds to bfloat16 where the
// reference path's tensors are bfloat16 (matmul inputs and outputs, the activation product).
// `rows` runs T <= 16 tokens at once (a speculative verification, a draft tree) through the same code: every row's
// matmuls are exactly one-row calls (gemm_rows), and its attention sums over its keys in slot order as a one-token
// step over the same keys does, so a verification gives the bits of T one-token steps (greedy output identical).
struct Step : torch::CustomClassHolder {
  struct L { Mat m[4]; const float* n[6]; float* kc; float* vc; int win, rope; };
  std::vector<L> layers; Mat head; const float* norm; const float* cs[2][2];
  std::vector<at::Tensor> keep;
  int H, Hkv, D, R, I, act, ffn_norms, qk, hidden, S;
  float eps, scale, softcap;
  std::vector<float> h, qkv, att, o, gu, hh, dn, sc;
  std::vector<int> keys;   // per row: the cache slots it attends to, ascending (kv_len entries a row)
  Prep p; std::vector<Prep> ps;
  double t_gemv = 0, t_att = 0, t_all = 0; int64_t n_steps = 0;   // where the steps' time went (timings())
  using clk = std::chrono::steady_clock;
  static double since(clk::time_point t) { return std::chrono::duration<double>(clk::now() - t).count(); }
  void mv(const Mat& m, const float* x, int T, float* y) {
    auto t = clk::now();
    if (T == 1) gemv(m, x, y, p); else gemm_rows(m, x, T, y, ps);
    t_gemv += since(t);
  }

  // [seconds in the weight GEMVs, in attention (scores, softmax, weighted sum), in whole steps, steps]; reset=True zeroes them
  std::vector<double> timings(bool reset) {
    std::vector<double> r{t_gemv, t_att, t_all, (double)n_steps};
    if (reset) { t_gemv = t_att = t_all = 0; n_steps = 0; }
    return r;
  }

  // t: per layer [qkv_a, qkv_b, o_a, o_b, gu_a, gu_b, down_a, down_b, ln1, ln2, ln3, ln4, qn, kn, k_cache, v_cache],
  // then [head_a, head_b, norm, cos0, sin0, cos1, sin1]; ints: [layers, H, Hkv, D, R, I, act, ffn_norms, qk, hidden,
  // head_group] then per layer [group qkv, o, gu, down (0: int8), window (0: none), rope table]; floats: eps, attn scale, soft-cap.
  Step(std::vector<at::Tensor> t, std::vector<int64_t> ii, std::vector<double> ff) : keep(t) {
    const int n = (int)ii[0];
    H = ii[1]; Hkv = ii[2]; D = ii[3]; R = ii[4]; I = ii[5]; act = ii[6]; ffn_norms = ii[7]; qk = ii[8]; hidden = ii[9];
    eps = ff[0]; scale = ff[1]; softcap = ff[2];
    const int q_dim = H * D, kv_dim = Hkv * D;
    const int ins[4] = {hidden, q_dim, hidden, I}, outs[4] = {q_dim + 2 * kv_dim, hidden, 2 * I, hidden};
    for (int l = 0; l < n; ++l) {
      L x;
      const at::Tensor* tl = t.data() + l * 16;
      const int64_t* il = ii.data() + 11 + l * 6;
      for (int j = 0; j < 4; ++j)
        x.m[j] = il[j] ? mat4(tl[2 * j], tl[2 * j + 1], il[j], outs[j], ins[j]) : mat8(tl[2 * j], tl[2 * j + 1]);
      for (int j = 0; j < 4; ++j) TORCH_CHECK(x.m[j].N == outs[j] && x.m[j].K == ins[j], "Step: layer ", l, " matrix ", j, " has the wrong shape");
      for (int j = 0; j < 6; ++j) x.n[j] = fptr(tl[8 + j]);
      TORCH_CHECK(tl[14].is_contiguous() && tl[14].size(1) == Hkv && tl[14].size(3) == D, "Step: bad KV cache");
      x.kc = tl[14].data_ptr<float>(); x.vc = tl[15].data_ptr<float>();
      S = (int)tl[14].size(2);
      x.win = (int)il[4]; x.rope = (int)il[5];
      layers.push_back(x);
    }
    const at::Tensor* tg = t.data() + n * 16;
    head = ii[10] ? mat4(tg[0], tg[1], ii[10], tg[1].size(1), hidden) : mat8(tg[0], tg[1]);
    norm = fptr(tg[2]);
    for (int w = 0; w < 2; ++w) { cs[w][0] = fptr(tg[3 + 2 * w]); cs[w][1] = fptr(tg[4 + 2 * w]); }
    buffers(1);
  }

  void buffers(int T) {   // scratch for T rows
    const size_t q_dim = (size_t)H * D, kv_dim = (size_t)Hkv * D;
    if (o.size() >= (size_t)T * hidden) return;
    h.resize((size_t)T * std::max(hidden, I)); qkv.resize(T * (q_dim + 2 * kv_dim)); att.resize(T * q_dim);
    o.resize((size_t)T * hidden); gu.resize((size_t)T * 2 * I); hh.resize((size_t)T * I); dn.resize((size_t)T * hidden);
    sc.resize((size_t)T * H * S); keys.resize((size_t)T * S);
  }

  void rope(float* v, const float* c, const float* s) const {
    const int half = R / 2;
    float tmp[1024];
    std::memcpy(tmp, v, R * sizeof(float));
    for (int i = 0; i < R; ++i) v[i] = tmp[i] * c[i] + tmp[(i + half) % R] * s[i];
  }

  at::Tensor step(at::Tensor xt, int64_t pos64) {
    TORCH_CHECK(xt.is_contiguous() && xt.scalar_type() == at::kFloat && xt.numel() == hidden, "Step: x must be float32 [hidden]");
    const int64_t pos = pos64;
    TORCH_CHECK(pos >= 0 && pos < S, "Step: position ", pos, " outside the cache of ", S);
    at::Tensor logits = at::empty({head.N}, xt.options());
    run(xt.data_ptr<float>(), 1, &pos, &pos, nullptr, 0, (int)pos + 1, std::vector<int>{0}, logits.data_ptr<float>(), nullptr);
    return logits;
  }

  // x [T, hidden] float32 (overwritten), slots [T] (cache slots written), rope_pos [T], mask: bool [kinds, T, kv_len] (kind 1:
  // sliding-window layers) or empty (causal: slot j <= the row's slot, inside the window), rows [R] (the rows whose
  // logits come back; empty: all) -> [logits [R, V], the final norm's output [R, hidden] (with want_hidden)]
  std::vector<at::Tensor> rows(at::Tensor xt, at::Tensor slots, at::Tensor rpos, at::Tensor mask, int64_t kv_len,
                               at::Tensor rows, bool want_hidden) {
    TORCH_CHECK(xt.is_contiguous() && xt.scalar_type() == at::kFloat && xt.dim() == 2 && xt.size(1) == hidden,
                "Step.rows: x must be float32 [T, hidden]");
    const int T = (int)xt.size(0);
    TORCH_CHECK(T >= 1 && T <= 16, "Step.rows: 1..16 rows, got ", T);
    TORCH_CHECK(kv_len >= 1 && kv_len <= S, "Step.rows: kv_len ", kv_len, " outside the cache of ", S);
    slots = slots.to(at::kLong).contiguous(); rpos = rpos.to(at::kLong).contiguous();
    TORCH_CHECK(slots.numel() == T && rpos.numel() == T, "Step.rows: one slot and one position per row");
    const int64_t* sl = slots.data_ptr<int64_t>(); const int64_t* rp = rpos.data_ptr<int64_t>();
    for (int r = 0; r < T; ++r)
      TORCH_CHECK(sl[r] >= 0 && sl[r] < kv_len && rp[r] >= 0 && rp[r] < S, "Step.rows: row ", r, " slot/position out of range");
    const bool* mk = nullptr; int kinds = 0;
    if (mask.defined() && mask.numel()) {
      mask = mask.to(at::kBool).contiguous();
      TORCH_CHECK(mask.dim() == 3 && mask.size(1) == T && mask.size(2) == kv_len, "Step.rows: mask must be [kinds, T, kv_len]");
      mk = mask.data_ptr<bool>(); kinds = (int)mask.size(0);
    }
    std::vector<int> out;
    if (rows.defined() && rows.numel()) {
      rows = rows.to(at::kLong).contiguous();
      for (int64_t i = 0; i < rows.numel(); ++i) {
        const int64_t r = rows.data_ptr<int64_t>()[i];
        TORCH_CHECK(r >= 0 && r < T, "Step.rows: row ", r, " outside 0..", T - 1);
        out.push_back((int)r);
      }
    } else {
      for (int r = 0; r < T; ++r) out.push_back(r);
    }
    at::Tensor logits = at::empty({(int64_t)out.size(), head.N}, xt.options());
    at::Tensor hid = want_hidden ? at::empty({(int64_t)out.size(), hidden}, xt.options()) : at::Tensor();
    run(xt.data_ptr<float>(), T, sl, rp, mk, kinds, (int)kv_len, out, logits.data_ptr<float>(), want_hidden ? hid.data_ptr<float>() : nullptr);
    return want_hidden ? std::vector<at::Tensor>{logits, hid} : std::vector<at::Tensor>{logits};
  }

  void run(float* x, int T, const int64_t* sl, const int64_t* rp, const bool* mk, int kinds, int kv_len,
           const std::vector<int>& out, float* y, float* hid_out) {
    const auto t_step = clk::now();
    buffers(T);
    const int q_dim = H * D, kv_dim = Hkv * D, g = H / Hkv, qkv_n = q_dim + 2 * kv_dim;
    std::vector<int> nk(T);
    for (const L& l : layers) {
      for (int r = 0; r < T; ++r) rms(x + (size_t)r * hidden, l.n[0], h.data() + (size_t)r * hidden, hidden, eps);
      mv(l.m[0], h.data(), T, qkv.data());
      for (int r = 0; r < T; ++r) {
        float* q = qkv.data() + (size_t)r * qkv_n; float* k = q + q_dim; float* v = k + kv_dim;
        const float* c = cs[l.rope][0] + (size_t)rp[r] * R; const float* s = cs[l.rope][1] + (size_t)rp[r] * R;
        for (int i = 0; i < H; ++i) { if (qk) rms(q + i * D, l.n[4], q + i * D, D, eps); rope(q + i * D, c, s); }
        for (int i = 0; i < Hkv; ++i) {
          if (qk) rms(k + i * D, l.n[5], k + i * D, D, eps);
          rope(k + i * D, c, s);
          std::memcpy(l.kc + ((size_t)i * S + sl[r]) * D, k + i * D, D * sizeof(float));
          std::memcpy(l.vc + ((size_t)i * S + sl[r]) * D, v + i * D, D * sizeof(float));
        }
        // the row's keys: the mask's marks, or every slot up to its own inside the window
        int* kr = keys.data() + (size_t)r * S; int n = 0;
        if (mk) {
          const bool* m = mk + ((size_t)std::min(l.rope, kinds - 1) * T + r) * kv_len;
          for (int j = 0; j < kv_len; ++j) if (m[j]) kr[n++] = j;
        } else {
          const int t0 = l.win ? std::max<int>(0, (int)sl[r] - l.win + 1) : 0;
          for (int j = t0; j <= (int)sl[r]; ++j) kr[n++] = j;
        }
        nk[r] = n;
      }
      const auto t_a = clk::now();
      int64_t work = 0;
      for (int r = 0; r < T; ++r) work += nk[r];
      // (row, head) pairs split over the threads once there is more work than a parallel region costs (SmolLM2 at
      // 200 tokens: 0.43 -> 0.27 ms of attention per step; the other thread would otherwise wait), KV head major: the
      // g * T pairs that read one KV head's keys and values run one after another while those are in cache
      at::parallel_for(0, (int64_t)T * H, work * D * H >= 16384 ? 1 : (int64_t)T * H, [&](int64_t a0, int64_t a1) {
        for (int64_t a = a0; a < a1; ++a) {
          const int kvh = (int)(a / ((int64_t)T * g)), rem = (int)(a % ((int64_t)T * g));
          const int r = rem / g, hd = kvh * g + rem % g;
          const float* qh = qkv.data() + (size_t)r * qkv_n + hd * D;
          const float* kh = l.kc + (size_t)(hd / g) * S * D;
          const float* vh = l.vc + (size_t)(hd / g) * S * D;
          const int* kr = keys.data() + (size_t)r * S; const int n = nk[r];
          float* sh = sc.data() + ((size_t)r * H + hd) * S;
          float mx = -INFINITY;
          for (int t = 0; t < n; ++t) {
            sh[t] = dot(qh, kh + (size_t)kr[t] * D, D) * scale;
            mx = std::max(mx, sh[t]);
          }
          for (int t = 0; t < n; ++t) sh[t] = exp_le0(sh[t] - mx);   // apart from the sum: this loop vectorizes
          float sum = 0.f;
          for (int t = 0; t < n; ++t) sum += sh[t];
          float* oh = att.data() + (size_t)r * q_dim + hd * D;
          weighted_sum(sh, sum, vh, kr, n, D, oh);
        }
      });
      t_att += since(t_a);
      mv(l.m[1], att.data(), T, o.data());
      for (int r = 0; r < T; ++r) {
        float* xr = x + (size_t)r * hidden; float* orow = o.data() + (size_t)r * hidden; float* hr = h.data() + (size_t)r * hidden;
        if (ffn_norms) {
          float* dr = dn.data() + (size_t)r * hidden;
          rms(orow, l.n[1], dr, hidden, eps);
          for (int i = 0; i < hidden; ++i) xr[i] += dr[i];
          rms(xr, l.n[2], hr, hidden, eps);
        } else {
          for (int i = 0; i < hidden; ++i) xr[i] += orow[i];
          rms(xr, l.n[1], hr, hidden, eps);
        }
      }
      mv(l.m[2], h.data(), T, gu.data());
      for (int r = 0; r < T; ++r) {
        const float* gr = gu.data() + (size_t)r * 2 * I; float* hr = hh.data() + (size_t)r * I;
        for (int i = 0; i < I; ++i) {
          const float a = gr[i];
          const float f = act == 0 ? silu(a) : gelu_tanh(a);
          hr[i] = rbf(rbf(f) * gr[I + i]);
        }
      }
      mv(l.m[3], hh.data(), T, dn.data());
      for (int r = 0; r < T; ++r) {
        float* xr = x + (size_t)r * hidden; float* dr = dn.data() + (size_t)r * hidden;
        if (ffn_norms) {
          float* orow = o.data() + (size_t)r * hidden;
          rms(dr, l.n[3], orow, hidden, eps);
          for (int i = 0; i < hidden; ++i) xr[i] += orow[i];
        } else {
          for (int i = 0; i < hidden; ++i) xr[i] += dr[i];
        }
      }
    }
    const int M = (int)out.size();
    for (int i = 0; i < M; ++i) rms(x + (size_t)out[i] * hidden, norm, h.data() + (size_t)i * hidden, hidden, eps);
    if (hid_out) std::memcpy(hid_out, h.data(), (size_t)M * hidden * sizeof(float));
    mv(head, h.data(), M, y);
    if (softcap > 0)
      for (size_t i = 0; i < (size_t)M * head.N; ++i) y[i] = std::tanh(y[i] / softcap) * softcap;
    t_all += since(t_step); n_steps += T;
  }
};

}  // namespace

// x [K] or [1, K] (float32/bfloat16); w tile16 uint8 [N/16, K*8]; sz bfloat16 [K/G, N, 2] -> [N] in x's dtype
// (x [M, K]: [M, N], each row as a one-row call computes it)
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group, int64_t N) {
  return run_op(mat4(w, sz, group, N, x.size(-1)), x);
}

// x [K] or [1, K]; w int8 [N, K]; scale bfloat16 [N] -> [N] in x's dtype (x [M, K]: [M, N])
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return run_op(mat8(w, scale), x);
}

// Decode attention of a continuous batch straight from paged KV pools, without gathering them: q [S, H, D] float32
// (one new token per sequence); k, v [Hkv, slots, D] float32 or bfloat16, or int8 with float32 scales ks, vs [Hkv, slots] (one
// per token and head) (slot = block * block_size + offset); tables int64 [S, blocks] (each sequence's block ids);
// pos int64 [S] (its new token's position: it attends to keys 0..pos, or the last `window` of them) -> [S, H * D].
// One task per (sequence, KV head) reads each key row once for the head's whole query group; scores, softmax and
// the weighted sum in float32, as the batched-matmul path computes them up to the order of additions.

// a key or value row as float32: a float32 pool row is used in place, an int8 one is converted once into `buf`
// (not once per query head of the group)
inline const float* row_f32(const float* r, float*, int) { return r; }
template <typename T>
inline const float* row_f32(const T* r, float* buf, int n) {   // int8 codes, bfloat16
  for (int i = 0; i < n; ++i) buf[i] = (float)r[i];
  return buf;
}

// The keys of one (sequence, KV head) task in order: row pointers into the pools and each row's factor (the key's
// int8 scale times the softmax scale; the value's int8 scale), from one walk of the block table; padded to a multiple
// of 4 rows (repeating the last row, factor 0) for the 4-key score loop.
template <typename T>
struct TaskRows {
  std::vector<const T*> k, v;
  std::vector<float> kf, vf;
  int64_t n = 0;   // rows (keys t0..p)
  explicit TaskRows(int64_t cap) : k(cap), v(cap), kf(cap), vf(cap) {}

  void fill(const T* kd, const T* vd, const float* ksd, const float* vsd, const int64_t* row, int64_t base0, int64_t t0,
            int64_t p, int64_t bs, int D, float sc) {
    int64_t t = 0;
    for (int64_t b = t0 / bs; b <= p / bs; ++b) {   // block by block: no division per key
      const int64_t base = base0 + row[b] * bs;
      const int64_t o0 = b == t0 / bs ? t0 % bs : 0, o1 = b == p / bs ? p % bs + 1 : bs;
      for (int64_t o = o0; o < o1; ++o, ++t) {
        k[t] = kd + (base + o) * D;
        v[t] = vd + (base + o) * D;
        kf[t] = ksd ? ksd[base + o] * sc : sc;
        vf[t] = vsd ? vsd[base + o] : 1.f;
      }
    }
    n = t;
    for (; t % 4; ++t) { k[t] = k[t - 1]; v[t] = v[t - 1]; kf[t] = vf[t] = 0.f; }
  }
};

// Each pool block is a separate bs * D run at its own place in the pool (once requests come and go), too short for
// the hardware prefetcher, so a task's reads are a chain of cache misses. `Ahead` prefetches the rows of the NEXT
// task (keys and values, into L2) spread over the current task's score loop, so that the misses overlap the current
// task's arithmetic; the score loop also prefetches its own keys one block ahead into L1.
template <typename T>
struct Ahead {
  const TaskRows<T>* r = nullptr;
  int64_t i = 0;
  int lines = 0;
  void start(const TaskRows<T>* rows, int D) { r = rows; i = 0; lines = (int)((D * sizeof(T) + 63) / 64); }
  void step(int64_t rows) {   // prefetch the next `rows` rows
    if (!r) return;
    for (const int64_t e = std::min(r->n, i + rows); i < e; ++i)
      for (int l = 0; l < lines; ++l) {
        _mm_prefetch((const char*)r->k[i] + 64 * l, _MM_HINT_T1);
        _mm_prefetch((const char*)r->v[i] + 64 * l, _MM_HINT_T1);
      }
  }
  int64_t per(int64_t steps) const { return r ? (r->n + steps - 1) / std::max<int64_t>(steps, 1) : 0; }
};

template <typename T>
inline void prefetch_keys(const TaskRows<T>& r, int64_t t, int64_t n, int D) {
  for (int64_t i = t + 16; i < std::min(t + 16 + n, r.n); ++i)
    for (size_t off = 0; off < D * sizeof(T); off += 64) _mm_prefetch((const char*)r.k[i] + off, _MM_HINT_T0);
}

// softmax of each of g score rows (stride ldw), each then multiplied by its value row's factor, so that the value pass
// is a plain weighted sum
inline void softmax_rows(float* w, int g, int64_t T_, int64_t ldw, const float* vf) {
  for (int j = 0; j < g; ++j) {
    float* wj = w + j * ldw;
    float mx[16];
    std::fill(mx, mx + 16, -INFINITY);
    int64_t t = 0;
    for (; t + 16 <= T_; t += 16)
      for (int e = 0; e < 16; ++e) mx[e] = std::max(mx[e], wj[t + e]);
    for (; t < T_; ++t) mx[0] = std::max(mx[0], wj[t]);
    float m = mx[0];
    for (int e = 1; e < 16; ++e) m = std::max(m, mx[e]);
    for (t = 0; t < T_; ++t) wj[t] = exp_le0(wj[t] - m);
    float acc[16] = {};
    for (t = 0; t + 16 <= T_; t += 16)
      for (int e = 0; e < 16; ++e) acc[e] += wj[t + e];
    for (; t < T_; ++t) acc[0] += wj[t];
    float sum = 0.f;
    for (int e = 0; e < 16; ++e) sum += acc[e];
    const float inv = 1.f / sum;
    for (t = 0; t < T_; ++t) wj[t] *= inv * vf[t];
  }
}

// portable task: any g and D
template <typename T>
void pa_task(const float* qs, const TaskRows<T>& r, Ahead<T>& ahead, int g, int D, float* w, int64_t ldw, float* o, float* buf) {
  const int64_t T_ = r.n, per = ahead.per(T_);
  for (int64_t t = 0; t < T_; ++t) {
    prefetch_keys(r, t, 1, D);
    ahead.step(per);
    const float* kr = row_f32(r.k[t], buf, D);
    for (int j = 0; j < g; ++j) w[j * ldw + t] = dot(qs + (size_t)j * D, kr, D) * r.kf[t];
  }
  softmax_rows(w, g, T_, ldw, r.vf.data());
  std::fill(o, o + (size_t)g * D, 0.f);
  for (int64_t t = 0; t < T_; ++t) {
    const float* vr = row_f32(r.v[t], buf, D);
    for (int j = 0; j < g; ++j) {
      const float pt = w[j * ldw + t];
      float* oj = o + (size_t)j * D;
      for (int e = 0; e < D; ++e) oj[e] += pt * vr[e];
    }
  }
}

#ifdef __AVX512F__
// AVX-512 task for D % 16 == 0 and G <= 6 query heads per KV head: scores of 4 keys at a time for all G heads, the
// 4 x G accumulators in registers and the 4 horizontal sums of each head folded together (`hsum4`); the value pass
// keeps one 16-float slice of every head's output in registers. One layer of 64 SmolLM2 sequences (~145 keys each,
// cache-resident, 2 threads): float32 342 -> 200 us, int8 444 -> 163 us (the portable loop's per-key horizontal sums
// and its outputs accumulated through memory dominated; int8 rows were converted once per query head).
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline __m512 ld16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// [sum of a's lanes, b's, c's, d's]
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));   // 128-bit block i: vector i's partial sums
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
  u = _mm512_add_ps(u, _mm512_permute_ps(u, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), u));
}

template <typename T, int G>
void pa_task_avx512(const float* qs, const TaskRows<T>& r, Ahead<T>& ahead, int D, float* w, int64_t ldw, float* o) {
  const int64_t T_ = r.n, per = ahead.per((T_ + 3) / 4);
  for (int64_t t = 0; t < T_; t += 4) {
    prefetch_keys(r, t, 4, D);
    ahead.step(per);
    __m512 acc[G][4];
    for (int j = 0; j < G; ++j)
      for (int i = 0; i < 4; ++i) acc[j][i] = _mm512_setzero_ps();
    for (int c = 0; c < D; c += 16) {
      const __m512 k0 = ld16(r.k[t] + c), k1 = ld16(r.k[t + 1] + c), k2 = ld16(r.k[t + 2] + c), k3 = ld16(r.k[t + 3] + c);
      for (int j = 0; j < G; ++j) {
        const __m512 q = _mm512_loadu_ps(qs + (size_t)j * D + c);
        acc[j][0] = _mm512_fmadd_ps(q, k0, acc[j][0]);
        acc[j][1] = _mm512_fmadd_ps(q, k1, acc[j][1]);
        acc[j][2] = _mm512_fmadd_ps(q, k2, acc[j][2]);
        acc[j][3] = _mm512_fmadd_ps(q, k3, acc[j][3]);
      }
    }
    const __m128 f = _mm_loadu_ps(r.kf.data() + t);
    for (int j = 0; j < G; ++j) _mm_storeu_ps(w + j * ldw + t, _mm_mul_ps(hsum4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]), f));
  }
  softmax_rows(w, G, T_, ldw, r.vf.data());
  for (int c = 0; c < D; c += 16) {
    __m512 acc[G];
    for (int j = 0; j < G; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T_; ++t) {
      const __m512 v = ld16(r.v[t] + c);
      for (int j = 0; j < G; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(w[j * ldw + t]), v, acc[j]);
    }
    for (int j = 0; j < G; ++j) _mm512_storeu_ps(o + (size_t)j * D + c, acc[j]);
  }
}

template <typename T>
bool pa_avx512(int g, const float* qs, const TaskRows<T>& r, Ahead<T>& ahead, int D, float* w, int64_t ldw, float* o) {
  switch (g) {
    case 1: pa_task_avx512<T, 1>(qs, r, ahead, D, w, ldw, o); return true;
    case 2: pa_task_avx512<T, 2>(qs, r, ahead, D, w, ldw, o); return true;
    case 3: pa_task_avx512<T, 3>(qs, r, ahead, D, w, ldw, o); return true;
    case 4: pa_task_avx512<T, 4>(qs, r, ahead, D, w, ldw, o); return true;
    case 5: pa_task_avx512<T, 5>(qs, r, ahead, D, w, ldw, o); return true;
    case 6: pa_task_avx512<T, 6>(qs, r, ahead, D, w, ldw, o); return true;
    default: return false;
  }
}
#endif

// scd: scratch of S * Hkv * g rows of ldw floats (maxT rounded up to a multiple of 4)
template <typename T>
void paged_attention_impl(const float* qd, const T* kd, const T* vd, const float* ksd, const float* vsd, const int64_t* tab,
                          const int64_t* ps, float* od, float* scd, int S, int H, int D, int Hkv, int64_t slots, int64_t nb,
                          int64_t bs, int64_t window, int64_t ldw, float sc) {
  const int g = H / Hkv;
#ifdef __AVX512F__
  const bool simd = path() == 2 && D % 16 == 0;
#else
  const bool simd = false;
#endif
  const auto fill = [&](TaskRows<T>& r, int64_t it) {
    const int s = (int)(it / Hkv), kh = (int)(it % Hkv);
    const int64_t p = ps[s], t0 = window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
    r.fill(kd, vd, ksd, vsd, tab + (size_t)s * nb, (int64_t)kh * slots, t0, p, bs, D, sc);
  };
  at::parallel_for(0, (int64_t)S * Hkv, 1, [&](int64_t i0, int64_t i1) {
    TaskRows<T> cur(ldw), nxt(ldw);
    std::vector<float> buf(D);
    Ahead<T> first;   // the first task's rows: nothing computes while they arrive
    fill(cur, i0);
    first.start(&cur, D);
    first.step(cur.n);
    for (int64_t it = i0; it < i1; ++it) {
      Ahead<T> ahead;
      if (it + 1 < i1) {
        fill(nxt, it + 1);
        ahead.start(&nxt, D);
      }
      const int s = (int)(it / Hkv), kh = (int)(it % Hkv);
      const float* qs = qd + ((size_t)s * H + (size_t)kh * g) * D;
      float* w = scd + (size_t)it * g * ldw;
      float* o = od + ((size_t)s * H + (size_t)kh * g) * D;
#ifdef __AVX512F__
      if (!(simd && pa_avx512(g, qs, cur, ahead, D, w, ldw, o)))
#endif
        pa_task(qs, cur, ahead, g, D, w, ldw, o, buf.data());
      std::swap(cur, nxt);
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& ks,
                           const c10::optional<at::Tensor>& vs, const at::Tensor& tables, const at::Tensor& pos,
                           int64_t block_size, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "paged_attention: q must be contiguous float32 [S, H, D]");
  const auto kt = k.scalar_type();
  const bool i8 = kt == at::kChar;
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && (i8 || kt == at::kFloat || kt == at::kBFloat16) && v.scalar_type() == kt &&
              k.is_contiguous() && v.is_contiguous(), "paged_attention: k and v must be contiguous float32, bfloat16 or int8 [Hkv, slots, D]");
  TORCH_CHECK(i8 == (ks.has_value() && vs.has_value()), "paged_attention: int8 pools need their scales ks, vs (and other pools none)");
  if (i8)
    TORCH_CHECK(ks->scalar_type() == at::kFloat && vs->scalar_type() == at::kFloat && ks->is_contiguous() && vs->is_contiguous() &&
                ks->numel() == k.size(0) * k.size(1) && vs->numel() == ks->numel(), "paged_attention: scales must be contiguous float32 [Hkv, slots]");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kLong && tables.is_contiguous() && tables.size(0) == q.size(0),
              "paged_attention: tables must be contiguous int64 [S, blocks]");
  TORCH_CHECK(pos.dim() == 1 && pos.scalar_type() == at::kLong && pos.is_contiguous() && pos.size(0) == q.size(0),
              "paged_attention: pos must be contiguous int64 [S]");
  const int S = (int)q.size(0), H = (int)q.size(1), D = (int)q.size(2), Hkv = (int)k.size(0);
  const int64_t slots = k.size(1), nb = tables.size(1), bs = block_size;
  TORCH_CHECK(k.size(2) == D && Hkv > 0 && H % Hkv == 0 && bs > 0, "paged_attention: shapes do not match");
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  int64_t maxT = 1;
  for (int s = 0; s < S; ++s) {   // every key a sequence reads lies in its table and in the pools
    TORCH_CHECK(ps[s] >= 0 && ps[s] / bs < nb, "paged_attention: position ", ps[s], " outside the block table");
    for (int64_t b = 0; b <= ps[s] / bs; ++b)
      TORCH_CHECK(tab[s * nb + b] >= 0 && (tab[s * nb + b] + 1) * bs <= slots, "paged_attention: block ", tab[s * nb + b], " outside the pools");
    maxT = std::max(maxT, ps[s] + 1);
  }
  at::Tensor out = at::empty({S, H * D}, q.options());
  const int64_t ldw = (maxT + 3) / 4 * 4;
  at::Tensor scratch = at::empty({(int64_t)S * Hkv, H / Hkv, ldw}, q.options());
  float* od = out.data_ptr<float>();
  float* scd = scratch.data_ptr<float>();
  const float* qd = q.data_ptr<float>();
  if (i8)
    paged_attention_impl<int8_t>(qd, k.data_ptr<int8_t>(), v.data_ptr<int8_t>(), ks->data_ptr<float>(), vs->data_ptr<float>(),
                                 tab, ps, od, scd, S, H, D, Hkv, slots, nb, bs, window, ldw, (float)scale);
  else if (kt == at::kBFloat16)
    paged_attention_impl<at::BFloat16>(qd, k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), nullptr, nullptr,
                                       tab, ps, od, scd, S, H, D, Hkv, slots, nb, bs, window, ldw, (float)scale);
  else
    paged_attention_impl<float>(qd, k.data_ptr<float>(), v.data_ptr<float>(), nullptr, nullptr,
                                tab, ps, od, scd, S, H, D, Hkv, slots, nb, bs, window, ldw, (float)scale);
  return out;
}

// ------------------------------------------------------------------------------------------ weight round to nearest
// quantization/algorithms.py `round_to_nearest`: a float32 weight [N, K] in cells of G consecutive values of a row
// (G = K: per channel), each cell's range, its scale (and zero point) and dequantize(quantize(w)) in one pass while
// the cell is in cache, instead of a dozen whole-tensor passes. The same float32 operations on every value as
// `weight_qparams` + `fake_quantize` (IEEE division, round half to even, the same clamps), so the same values.
enum { RTN_SYM_MAX = 0, RTN_SYM_FULL = 1, RTN_ASYM = 2, RTN_E4M3 = 3 };

// float32 -> the nearest float8 e4m3fn value (|v| <= 448 already), as formats.round_minifloat computes it: the step
// of v's binade (its exponent bits alone; 2**-6 for e4m3's subnormals) times 2**-3, round half to even.
inline float round_e4m3(float v) {
  const float a = std::fabs(v);
  float step = std::bit_cast<float>(std::bit_cast<uint32_t>(a) & 0x7F800000u);
  step = std::max(step, 0x1p-6f) * 0x1p-3f;
  return std::copysign(std::nearbyint(a / step) * step, v);
}

std::vector<at::Tensor> round_to_nearest(at::Tensor w, int64_t kind, int64_t group, int64_t bits) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              "leanlm round_to_nearest: w must be a contiguous 2-D float32 CPU tensor");
  const int64_t N = w.size(0), K = w.size(1), G = group;
  TORCH_CHECK(G > 0 && K % G == 0, "leanlm round_to_nearest: group ", G, " does not divide ", K);
  TORCH_CHECK(kind >= RTN_SYM_MAX && kind <= RTN_E4M3, "leanlm round_to_nearest: unknown kind ", kind);
  const int64_t C = K / G;
  at::Tensor out = at::empty_like(w), scale = at::empty({N, C}, w.options());
  at::Tensor zero = at::empty({kind == RTN_ASYM ? N : 0, C}, w.options());
  const float* x0 = w.data_ptr<float>();
  float* y0 = out.data_ptr<float>();
  float* s0 = scale.data_ptr<float>();
  float* z0 = kind == RTN_ASYM ? zero.data_ptr<float>() : nullptr;
  // int grids: symmetric [-2**(b-1), 2**(b-1) - 1] (qmax 2**(b-1) - 1), asymmetric [0, 2**b - 1]
  const float qmax = kind == RTN_ASYM ? (float)((1 << bits) - 1) : (float)((1 << (bits - 1)) - 1);
  const float lo = kind == RTN_ASYM ? 0.f : -(float)(1 << (bits - 1)), hi = qmax;
  at::parallel_for(0, N * C, std::max<int64_t>(1, 16384 / G), [&](int64_t b, int64_t e) {
    for (int64_t cell = b; cell < e; ++cell) {
      const float* x = x0 + cell * G;
      float* y = y0 + cell * G;
      float mx[16], mn[16];
      for (int j = 0; j < 16; ++j) { mx[j] = -INFINITY; mn[j] = INFINITY; }
      int64_t i = 0;
      for (; i + 16 <= G; i += 16)
        for (int j = 0; j < 16; ++j) { mx[j] = std::max(mx[j], x[i + j]); mn[j] = std::min(mn[j], x[i + j]); }
      for (; i < G; ++i) { mx[0] = std::max(mx[0], x[i]); mn[0] = std::min(mn[0], x[i]); }
      for (int j = 1; j < 16; ++j) { mx[0] = std::max(mx[0], mx[j]); mn[0] = std::min(mn[0], mn[j]); }
      const float pos = mx[0], neg = -mn[0];
      float s;
      if (kind == RTN_ASYM) {
        const float l = std::min(mn[0], 0.f), h = std::max(mx[0], 0.f);
        s = (h - l) / qmax;
        if (s == 0.f) s = 1.f;
        const float z = std::min(std::max(std::nearbyint(-l / s), 0.f), qmax);
        z0[cell] = z;
        for (i = 0; i < G; ++i) y[i] = (std::min(std::max(std::nearbyint(x[i] / s) + z, lo), hi) - z) * s;
      } else if (kind == RTN_E4M3) {
        s = std::max(pos, neg) / 448.f;
        if (s == 0.f) s = 1.f;
        i = 0;
#ifdef __AVX512F__
        // round_e4m3 sixteen values at a time (the compiler left the scalar function unvectorized: 3x slower); the
        // division by the power-of-two step is a multiplication by its exact inverse (exponent bits 254 - e)
        const __m512 vs = _mm512_set1_ps(s), vmax = _mm512_set1_ps(448.f), vmin = _mm512_set1_ps(-448.f);
        const __m512 smallest = _mm512_set1_ps(0x1p-6f), eighth = _mm512_set1_ps(0x1p-3f);
        const __m512i expo = _mm512_set1_epi32(0x7F800000), sign = _mm512_set1_epi32((int)0x80000000u);
        const __m512i inv_bits = _mm512_set1_epi32(0x7F000000);
        for (; i + 16 <= G; i += 16) {
          const __m512 v = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), vs), vmin), vmax);
          const __m512 a = _mm512_abs_ps(v);
          const __m512 step = _mm512_mul_ps(_mm512_max_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), expo)), smallest), eighth);
          const __m512 inv = _mm512_castsi512_ps(_mm512_sub_epi32(inv_bits, _mm512_castps_si512(step)));
          const __m512 r = _mm512_mul_ps(_mm512_roundscale_ps(_mm512_mul_ps(a, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), step);
          const __m512 rs = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), _mm512_and_si512(_mm512_castps_si512(v), sign)));
          _mm512_storeu_ps(y + i, _mm512_mul_ps(rs, vs));
        }
#endif
        for (; i < G; ++i) y[i] = round_e4m3(std::min(std::max(x[i] / s, -448.f), 448.f)) * s;
      } else {
        const float mag = std::max(pos, neg);
        s = kind == RTN_SYM_FULL ? (pos >= neg ? -mag : mag) / (qmax + 1.f) : mag / qmax;
        if (s == 0.f) s = 1.f;
        for (i = 0; i < G; ++i) y[i] = std::min(std::max(std::nearbyint(x[i] / s), lo), hi) * s;
      }
      s0[cell] = s;
    }
  });
  return {out, scale, zero};
}

// ------------------------------------------------------------------------------------------ greedy token
// logits [B, V] float32 -> int64 [B]: each row's first index of its largest value, as torch.argmax gives it (which
// walks a vocabulary in 2 ns a value: 0.1 ms a token on SmolLM2's 49152 logits, 0.6 ms on Gemma-3's 262144, against
// 11 and 27 us here: one vectorized max, then a scan for its first occurrence). A row holding NaN goes to torch.argmax
// (NaN counts as the largest there).
at::Tensor argmax_rows(at::Tensor logits) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() && logits.device().is_cpu(),
              "leanlm argmax_rows: logits must be a contiguous 2-D float32 CPU tensor");
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, "leanlm argmax_rows: empty rows");
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const float* x = logits.data_ptr<float>() + b * V;
    float m = -INFINITY;
    bool nan = false;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 vm[4];
    for (int j = 0; j < 4; ++j) vm[j] = _mm512_set1_ps(-INFINITY);
    __mmask16 unord = 0;
    for (; i + 64 <= V; i += 64)   // four running maxima: one would wait on the previous max every 16 values
      for (int j = 0; j < 4; ++j) {
        const __m512 v = _mm512_loadu_ps(x + i + 16 * j);
        vm[j] = _mm512_max_ps(v, vm[j]);
        unord |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      }
    m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(vm[0], vm[1]), _mm512_max_ps(vm[2], vm[3])));
    nan = unord != 0;
#endif
    for (; i < V; ++i) { m = x[i] > m ? x[i] : m; nan |= x[i] != x[i]; }
    if (nan) { o[b] = logits[b].argmax().item<int64_t>(); continue; }
    int64_t k = 0;   // no NaN: the max is one of the values
#ifdef __AVX512F__
    const __m512 vmax = _mm512_set1_ps(m);
    for (; k + 16 <= V; k += 16) {
      const __mmask16 eq = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + k), vmax, _CMP_EQ_OQ);
      if (eq) { k += __builtin_ctz((unsigned)eq); break; }
    }
#endif
    while (x[k] != m) ++k;
    o[b] = k;
  }
  return out;
}

int64_t kernel_path() { return path(); }
int64_t float_path() { return fpath(); }
void set_path(int64_t p) {   // tests: force an instruction-set path (-1: the CPU's own choice)
  g_path = -1; g_fpath = -1;
  if (p >= 0) { g_path = std::min((int)p, path()); g_fpath = std::min((int)p, fpath()); }
}

TORCH_LIBRARY(leanlm, m) {
  m.def("int4_gemv(Tensor x, Tensor w, Tensor sz, int group, int n) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("f32_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("int4_gemv_q8(Tensor x, Tensor w, Tensor sz, int group, int n) -> Tensor");
  m.def("int8_gemv_q8(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k, Tensor v, Tensor? ks, Tensor? vs, Tensor tables, Tensor pos, int block_size, int window, float scale) -> Tensor");
  m.def("kernel_path() -> int", kernel_path);
  m.def("float_path() -> int", float_path);
  m.def("set_path(int p) -> ()", set_path);
  m.def("round_to_nearest(Tensor w, int kind, int group, int bits) -> Tensor[]");
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.class_<Step>("Step")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>())
      .def("step", &Step::step)
      .def("rows", &Step::rows)
      .def("timings", &Step::timings);
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) {
  m.impl("int4_gemv", int4_gemv);
  m.impl("int8_gemv", int8_gemv);
  m.impl("f32_gemv", f32_gemv);
  m.impl("paged_attention", paged_attention);
  m.impl("int4_gemv_q8", int4_gemv_q8);
  m.impl("int8_gemv_q8", int8_gemv_q8);
  m.impl("round_to_nearest", round_to_nearest);
  m.impl("argmax_rows", argmax_rows);
}
