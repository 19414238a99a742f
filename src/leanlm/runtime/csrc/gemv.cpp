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
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& sz, int64_t group, int64_t N) {
  const int K = (int)x.numel(), G = (int)group;
  TORCH_CHECK(K % QB == 0 && G % QB == 0 && K % G == 0 && N % 16 == 0, "int4_gemv: K and group must be multiples of 32, N of 16");
  TORCH_CHECK(w.is_contiguous() && sz.is_contiguous() && sz.scalar_type() == at::kBFloat16, "int4_gemv: bad layout");
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
at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int K = (int)x.numel(), N = (int)w.size(0);
  TORCH_CHECK(K % QB == 0 && w.size(1) == K && w.is_contiguous() && scale.scalar_type() == at::kBFloat16, "int8_gemv: bad layout");
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

int64_t kernel_path() { return path(); }
void set_path(int64_t p) { g_path = (int)p; }

TORCH_LIBRARY(leanlm, m) {
  m.def("int4_gemv(Tensor x, Tensor w, Tensor sz, int group, int n) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("kernel_path() -> int", kernel_path);
  m.def("set_path(int p) -> ()", set_path);
}

TORCH_LIBRARY_IMPL(leanlm, CPU, m) {
  m.impl("int4_gemv", int4_gemv);
  m.impl("int8_gemv", int8_gemv);
}
