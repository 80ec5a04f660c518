/* Decoding GEMVs over weights kept in 4 or 8 bits (starqa/quantized_weights.py packs them): a decoding step reads
 * every weight once, so reading a GGUF's own 4- or 8-bit integers instead of their bfloat16 de-quantisation cuts the
 * bytes a step reads by 2-4x.  Every weight is  value = s[g] * q + z[g]  for its group g of consecutive inputs, with
 * s, z float32 (so a GGUF scale such as Q4_K's d * sc is kept exactly); x and y are bfloat16 as in linear_bf16.
 *
 *   linear_q4:  W uint8 [out, in / 2], groups of 32 inputs, q in 0..15 (asymmetric: z per group always).  In each
 *               64-input chunk, byte j holds q[j] in its low nibble and q[32 + j] in its high nibble.  Each nibble
 *               becomes an exact bfloat16 integer (a 16-entry table, vpermw; with one row of x, 128 + q: y1_q4) and
 *               meets x in vdpbf16ps: every product is exact in float32, so only the float32 sums round.
 *   linear_q8:  W int8 [out, in], groups of `group` inputs (16, 32, ... or `in`: one scale per output channel),
 *               z optional; also through exact bfloat16 integers and vdpbf16ps (see linear_q8 below).
 *
 *   y[r, o] = bf16( sum_g s[o, g] * (sum_{i in g} q[o, i] x[r, i]) + z[o, g] * (sum_{i in g} x[r, i]) )
 *   and, with a residual, bf16(y + residual) (rounded twice, as torch's `residual + linear(x)`).  y has a row stride
 *   (ldy) so that the parts of a fused projection (q | k | v) write their columns of one output.
 *
 * Compiled into the same library as cpu_decode.c (starqa/kernels/__init__.py), -march=native; the bfloat16 dot
 * product needs AVX512-BF16 (starqa_quant_available() says whether it was built with it).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include "bf16.h"

int starqa_quant_available(void) { return 1; }

#define Q_MAX_ROWS 8   /* rows of x per call (a GEMV; larger batches go to torch's matrix kernels) */
#define Q_ROW_BLOCK 4  /* rows that share one unpacked weight chunk in registers */

/* Per row of x, the sum of x over each group (the asymmetric term's factor), float32 [rows, groups]. */
static float* group_sums(const uint16_t* x, int rows, int in, int group) {
    const int groups = in / group;
    float* sums = aligned_alloc(64, sizeof(float) * (size_t)(rows * groups + 16));
    if (!sums) return NULL;
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < groups; g++) {
            __m512 acc = _mm512_setzero_ps();
            const uint16_t* xg = x + (size_t)r * in + (size_t)g * group;
            for (int i = 0; i < group; i += 16)
                acc = _mm512_add_ps(acc, bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(xg + i))));
            sums[(size_t)r * groups + g] = _mm512_reduce_add_ps(acc);
        }
    return sums;
}

/* sum_g z[g] * xs[g] over `groups` entries. */
static inline float zero_term(const float* z, const float* xs, int groups) {
    __m512 acc = _mm512_setzero_ps();
    int g = 0;
    for (; g + 16 <= groups; g += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(z + g), _mm512_loadu_ps(xs + g), acc);
    if (g < groups) {
        __mmask16 m = (__mmask16)((1u << (groups - g)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, z + g), _mm512_maskz_loadu_ps(m, xs + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

static inline void store_out(uint16_t* y, long ldy, const uint16_t* residual, long ldr, int r, int o, float v) {
    uint16_t out = f32_to_bf16(v);
    if (residual) out = f32_to_bf16(bf16_to_f32(out) + bf16_to_f32(residual[(size_t)r * ldr + o]));
    y[(size_t)r * ldy + o] = out;
}

/* One output of a one-row call (a decoding step), a chain of FMAs per group of the 64-input chunk: with one row the
 * FMAs into one accumulator, two per chunk, are what a step waits for, not the bytes.  Each nibble becomes the exact
 * bfloat16 integer 128 + q with one OR (bfloat16 holds 128..255 in steps of 1), and the 128 * sum(x) this adds per
 * group is taken off with the zero term.  0.59-0.66x the table's time per GEMV on the 1.5B's projections (2 threads,
 * a quiet machine): about the memory's read rate. */
static inline void y1_q4(const uint8_t* restrict wrow, const float* srow, const float* zrow, const uint16_t* x,
                         const float* xs, int in, int groups, uint16_t* y, long ldy, const uint16_t* residual,
                         long ldr, int o) {
    const __m512i magic = _mm512_set1_epi16(0x4300), low4 = _mm512_set1_epi16(0x0F);
    __m512 acc_a = _mm512_setzero_ps(), acc_b = _mm512_setzero_ps();
    for (int c = 0; c < in / 64; c++) {
        _mm_prefetch((const char*)(wrow + 32 * c + 512), _MM_HINT_T0);
        const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wrow + 32 * c)));
        const __m512bh wa = (__m512bh)_mm512_or_si512(_mm512_and_si512(bytes, low4), magic);
        const __m512bh wb = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes, 4), magic);
        const __m512bh xa = (__m512bh)_mm512_loadu_si512(x + 64 * c);
        const __m512bh xb = (__m512bh)_mm512_loadu_si512(x + 64 * c + 32);
        acc_a = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wa, xa), _mm512_set1_ps(srow[2 * c]), acc_a);
        acc_b = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wb, xb), _mm512_set1_ps(srow[2 * c + 1]),
                                acc_b);
    }
    const float v = _mm512_reduce_add_ps(_mm512_add_ps(acc_a, acc_b)) + zero_term(zrow, xs, groups)
                    - 128.0f * zero_term(srow, xs, groups);
    store_out(y, ldy, residual, ldr, 0, o, v);
}

int linear_q4(const uint8_t* restrict W, const float* restrict S, const float* restrict Z,
              const uint16_t* restrict x, uint16_t* restrict y, int out, int in, int rows, long ldy,
              const uint16_t* restrict residual, long ldr) {
    if (in % 64 || rows < 1 || rows > Q_MAX_ROWS || out < 1) return -1;
    const int groups = in / 32;
    float* xs = group_sums(x, rows, in, 32);
    if (!xs) return -3;
    /* bf16 bit patterns of 0.0 .. 15.0 (entries 16..31 unused) */
    static const uint16_t table_values[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                              0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
    const __m512i table = _mm512_loadu_si512(table_values);
    const __m512i low4 = _mm512_set1_epi16(0x0F);
    #pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        const uint8_t* wrow = W + (size_t)o * (in / 2);
        const float* srow = S + (size_t)o * groups;
        const float* zrow = Z + (size_t)o * groups;
        if (rows == 1) {
            y1_q4(wrow, srow, zrow, x, xs, in, groups, y, ldy, residual, ldr, o);
            continue;
        }
        for (int r0 = 0; r0 < rows; r0 += Q_ROW_BLOCK) {
            const int rb = rows - r0 < Q_ROW_BLOCK ? rows - r0 : Q_ROW_BLOCK;
            __m512 acc[Q_ROW_BLOCK];
            for (int r = 0; r < Q_ROW_BLOCK; r++) acc[r] = _mm512_setzero_ps();
            for (int c = 0; c < in / 64; c++) {
                if (r0 == 0) _mm_prefetch((const char*)(wrow + 32 * c + 512), _MM_HINT_T0);
                const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wrow + 32 * c)));
                const __m512bh wa = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low4), table);
                const __m512bh wb = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
                const __m512 sa = _mm512_set1_ps(srow[2 * c]), sb = _mm512_set1_ps(srow[2 * c + 1]);
                for (int r = 0; r < rb; r++) {
                    const uint16_t* xr = x + (size_t)(r0 + r) * in + 64 * c;
                    const __m512bh xa = (__m512bh)_mm512_loadu_si512(xr);
                    const __m512bh xb = (__m512bh)_mm512_loadu_si512(xr + 32);
                    acc[r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wa, xa), sa, acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), wb, xb), sb, acc[r]);
                }
            }
            for (int r = 0; r < rb; r++) {
                float v = _mm512_reduce_add_ps(acc[r]) + zero_term(zrow, xs + (size_t)(r0 + r) * groups, groups);
                store_out(y, ldy, residual, ldr, r0 + r, o, v);
            }
        }
    }
    free(xs);
    return 0;
}

/* int8 weights meet x in vdpbf16ps too, exactly: a "narrow" matrix (every q in -64..63: Q5_0, Q5_1, Q5_K, Q6_K, the
 * 4-bit types) turns q into the bfloat16 integer 192 + q with one 16-bit add (bit pattern 0x4300 + 64 + q: bfloat16
 * holds 128..255 exactly), and the 192 * sum(x) it adds per group is taken off with the zero term; a "wide" one
 * (Q8_0, per-channel int8) splits q = 16 * hi + lo into two exact bfloat16 integers (16-entry tables) and two dot
 * products.  Groups of 16 (Q6_K) scale each half of a 32-input chunk's 16 lanes; groups of 32 or more sum their
 * chunks before the scale. */
int linear_q8(const int8_t* restrict W, const float* restrict S, const float* restrict Z,
              const uint16_t* restrict x, uint16_t* restrict y, int out, int in, int group, int wide, int rows,
              long ldy, const uint16_t* restrict residual, long ldr) {
    if (in % 32 || !(group == 16 || (group % 32 == 0 && in % group == 0)) || rows < 1 || rows > Q_MAX_ROWS
        || out < 1)
        return -1;
    const int groups = in / group;
    float* xs = group_sums(x, rows, in, group);
    if (!xs) return -3;
    static const uint16_t low_values[32] = {0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                            0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
    /* bf16 of 16 * h for h = hi & 31: 0..7 -> 0..112, 24..31 -> -128..-16 */
    static const uint16_t high_values[32] = {0x0000, 0x4180, 0x4200, 0x4240, 0x4280, 0x42a0, 0x42c0, 0x42e0,
                                             0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                             0xc300, 0xc2e0, 0xc2c0, 0xc2a0, 0xc280, 0xc240, 0xc200, 0xc180};
    const __m512i low_table = _mm512_loadu_si512(low_values), high_table = _mm512_loadu_si512(high_values);
    const __m512i magic = _mm512_set1_epi16(0x4300 + 64), low4 = _mm512_set1_epi16(0x0F);
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const int per_group = group / 32;  /* chunks per group (0 for groups of 16) */
    #pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        const int8_t* wrow = W + (size_t)o * in;
        const float* srow = S + (size_t)o * groups;
        for (int r0 = 0; r0 < rows; r0 += Q_ROW_BLOCK) {
            const int rb = rows - r0 < Q_ROW_BLOCK ? rows - r0 : Q_ROW_BLOCK;
            __m512 acc[Q_ROW_BLOCK], part[Q_ROW_BLOCK];
            for (int r = 0; r < Q_ROW_BLOCK; r++) acc[r] = part[r] = _mm512_setzero_ps();
            for (int c = 0; c < in / 32; c++) {
                if (r0 == 0 && (c & 1) == 0) _mm_prefetch((const char*)(wrow + 32 * c + 1024), _MM_HINT_T0);
                const __m512i q16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wrow + 32 * c)));
                __m512bh wa, wb;
                if (wide) {
                    wa = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(q16, low4), low_table);
                    wb = (__m512bh)_mm512_permutexvar_epi16(_mm512_srai_epi16(q16, 4), high_table);
                } else {
                    wa = wb = (__m512bh)_mm512_add_epi16(q16, magic);
                }
                for (int r = 0; r < rb; r++) {
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (size_t)(r0 + r) * in + 32 * c);
                    part[r] = _mm512_dpbf16_ps(part[r], wa, xv);
                    if (wide) part[r] = _mm512_dpbf16_ps(part[r], wb, xv);
                }
                if (per_group == 0) {  /* groups of 16: lanes 0..7 are chunk's first group, 8..15 its second */
                    const __m512 sv = _mm512_permutexvar_ps(halves, _mm512_castpd_ps(_mm512_castpd128_pd512(
                                          _mm_load_sd((const double*)(srow + 2 * c)))));
                    for (int r = 0; r < rb; r++) {
                        acc[r] = _mm512_fmadd_ps(part[r], sv, acc[r]);
                        part[r] = _mm512_setzero_ps();
                    }
                } else if ((c + 1) % per_group == 0) {
                    const __m512 sv = _mm512_set1_ps(srow[c / per_group]);
                    for (int r = 0; r < rb; r++) {
                        acc[r] = _mm512_fmadd_ps(part[r], sv, acc[r]);
                        part[r] = _mm512_setzero_ps();
                    }
                }
            }
            for (int r = 0; r < rb; r++) {
                const float* xr = xs + (size_t)(r0 + r) * groups;
                float v = _mm512_reduce_add_ps(acc[r]);
                if (Z) v += zero_term(Z + (size_t)o * groups, xr, groups);
                if (!wide) v -= 192.0f * zero_term(srow, xr, groups);
                store_out(y, ldy, residual, ldr, r0 + r, o, v);
            }
        }
    }
    free(xs);
    return 0;
}

/* ---- de-quantisation to bfloat16, for the calls with many rows (a question's or a block's prefill) ----
 *
 * Under --weights auto the bfloat16 copy of a projection is not kept beside its GGUF integers (it would be the
 * model's weights twice over): a call with more rows than a GEMV takes de-quantises the projection into a bfloat16
 * buffer and gives it to torch's matrix multiply.  The values are bfloat16(fp32(s * q) + z), rounded where the GGUF
 * de-quantisers and the bfloat16 conversion round (mul and add with explicit rounding, never fused into an FMA): the
 * very weights the converted model holds, so the prefill is bit for bit what it was with the bfloat16 copy.
 */
static inline __m512 dequantized(__m512i q, float s, const float* z) {  /* fp32(s * q) + z, rounded twice */
    __m512 v = _mm512_mul_round_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(q), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return z ? _mm512_add_round_ps(v, _mm512_set1_ps(*z), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : v;
}

/* 32 values as bfloat16, rounded to nearest even in one instruction (vcvtne2ps2bf16: torch's rule for every value
 * but a float32 denormal, which it flushes to zero; no weight is one: s and z come from GGUF's float16 scales, so
 * s * q and z are 0 or above 2^-24 in magnitude, and their sum is 0 or a multiple of a float32 ulp of such a value,
 * far above the denormals).  0.61-0.63x the integer rounding's time for the 4-bit matrices. */
static inline void store32(uint16_t* d, __m512 low, __m512 high) {
    _mm512_storeu_si512(d, (__m512i)_mm512_cvtne2ps_pbh(high, low));
}

/* dst bf16 [out, in] = the weights W (linear_q4's or linear_q8's layout, scales S and zeros Z) as values. */
int dequantize_q(int bits, const void* restrict W, const float* restrict S, const float* restrict Z, int group,
                 int out, int in, uint16_t* restrict dst) {
    if (bits == 4) {
        if (in % 64 || !Z) return -1;
        group = 32;
    } else if (bits != 8 || in % 32 || !(group == 16 || (group % 32 == 0 && in % group == 0))) {
        return -1;
    }
    const int groups = in / group;
    #pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        const float* s = S + (size_t)o * groups;
        const float* z = Z ? Z + (size_t)o * groups : NULL;
        uint16_t* d = dst + (size_t)o * in;
        if (bits == 4) {
            const uint8_t* w = (const uint8_t*)W + (size_t)o * (in / 2);
            for (int c = 0; c < in; c += 64) {  /* byte j: q[c + j] low nibble, q[c + 32 + j] high */
                __m256i bytes = _mm256_loadu_si256((const __m256i*)(w + c / 2));
                __m256i halves[2] = {_mm256_and_si256(bytes, _mm256_set1_epi8(0x0f)),
                                     _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(0x0f))};
                for (int h = 0; h < 2; h++) {  /* one group of 32 */
                    const int g = c / 32 + h;
                    store32(d + c + 32 * h,
                            dequantized(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(halves[h])), s[g], z + g),
                            dequantized(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(halves[h], 1)), s[g], z + g));
                }
            }
        } else {
            const int8_t* w = (const int8_t*)W + (size_t)o * in;
            for (int i = 0; i < in; i += 32) {  /* groups of 16 or of a multiple of 32 */
                const int g0 = i / group, g1 = (i + 16) / group;
                store32(d + i,
                        dequantized(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + i))), s[g0],
                                    z ? z + g0 : NULL),
                        dequantized(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + i + 16))), s[g1],
                                    z ? z + g1 : NULL));
            }
        }
    }
    return 0;
}

/* ---- int8 activations (--activations int8): x rounded to int8 per 32 inputs, the products summed in int32 ----
 *
 * The kernels above keep x in bfloat16 and turn every weight into a bfloat16 integer first (a table lookup or an
 * add per 16-bit lane): that work, not the bytes, bounds them.  These give the integers as they are, one byte per
 * weight, to AVX512-VNNI's vpdpbusd (four u8 x s8 products per 32-bit lane).  x is rounded per group of 32 inputs to
 * x ~ dx[g] * xq, xq = round-to-even(x / dx) in -127..127, dx = max|x| / 127 -- the one rounding they add (as
 * llama.cpp's 8-bit activations); sum q * xq is exact in int32, then scaled in float32 by s[g] * dx[g].  The zero
 * term z[g] * sum x takes the exact sums of the bfloat16 x, as above.
 */
#if defined(__AVX512VNNI__)
int starqa_quant_x8_available(void) { return 1; }

typedef struct {
    int8_t* q;        /* [rows, in] */
    float* d;         /* [rows, in / 32] */
    int32_t* sums16;  /* [rows, in / 16]: sum of q over each 16 inputs */
} x8_rows;

static void free_x8(x8_rows* xq) { free(xq->q); free(xq->d); free(xq->sums16); }

static void* alloc64(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Round x bf16 [rows, in] to int8 per 32 inputs.  `step128`: lay each full 128-input step out as its groups
 * [0, 2, 1, 3] (q and d alike), the order linear_q4_x8's nibbles meet them in. */
static int quantize_x8(const uint16_t* x, int rows, int in, int step128, x8_rows* out) {
    const size_t n = (size_t)rows * in, groups = n / 32;
    out->q = alloc64(n);
    out->d = alloc64(sizeof(float) * groups);
    out->sums16 = alloc64(sizeof(int32_t) * 2 * groups);
    if (!out->q || !out->d || !out->sums16) return -3;
    const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
    const int per_row = in / 32, full = step128 ? in / 128 * 4 : 0;
    for (size_t g = 0; g < groups; g++) {
        const uint16_t* xg = x + 32 * g;
        const __m512 a = bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)xg));
        const __m512 b = bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(xg + 16)));
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const float d = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        /* |x| * 127 / amax can round to 127.00001: clamp */
        const __m512i qa = _mm512_max_epi32(lo, _mm512_min_epi32(hi, _mm512_cvtps_epi32(_mm512_mul_ps(a, inv))));
        const __m512i qb = _mm512_max_epi32(lo, _mm512_min_epi32(hi, _mm512_cvtps_epi32(_mm512_mul_ps(b, inv))));
        const size_t row = g / per_row;
        int k = (int)(g % per_row);
        if (k < full) {  /* group k of its step moves to slot [0, 2, 1, 3][k % 4] */
            static const int slot[4] = {0, 2, 1, 3};
            k = k / 4 * 4 + slot[k % 4];
        }
        const size_t at = row * per_row + k;
        _mm_storeu_si128((__m128i*)(out->q + 32 * at), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i*)(out->q + 32 * at + 16), _mm512_cvtepi32_epi8(qb));
        out->d[at] = d;
        out->sums16[2 * at] = _mm512_reduce_add_epi32(qa);
        out->sums16[2 * at + 1] = _mm512_reduce_add_epi32(qb);
    }
    return 0;
}

static inline float hsum256(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

/* 4-bit weights (linear_q4's layout): 512-bit steps of 128 inputs -- the 64 low nibbles of a step are inputs 0..31
 * of its two 64-input chunks (groups 0 and 2), the high nibbles inputs 32..63 (groups 1 and 3), which is why
 * quantize_x8 lays xq out as [0, 2, 1, 3]; a last 64-input chunk (in % 128 == 64) in 256-bit steps. */
int linear_q4_x8(const uint8_t* restrict W, const float* restrict S, const float* restrict Z,
                 const uint16_t* restrict x, uint16_t* restrict y, int out, int in, int rows, long ldy,
                 const uint16_t* restrict residual, long ldr) {
    if (in % 64 || rows < 1 || rows > Q_MAX_ROWS || out < 1) return -1;
    const int groups = in / 32, steps = in / 128;
    x8_rows xq;
    float* xs = group_sums(x, rows, in, 32);
    const int bad = !xs || quantize_x8(x, rows, in, 1, &xq);
    if (bad) { free(xs); free_x8(&xq); return -3; }
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m256i low4y = _mm256_set1_epi8(0x0F);
    const __m512i slots_a = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i slots_b = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    #pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        const uint8_t* wrow = W + (size_t)o * (in / 2);
        const float* srow = S + (size_t)o * groups;
        for (int r = 0; r < rows; r++) {
            const int8_t* xr = xq.q + (size_t)r * in;
            const float* dr = xq.d + (size_t)r * groups;
            __m512 acc = _mm512_setzero_ps();
            for (int k = 0; k < steps; k++) {
                if (r == 0) _mm_prefetch((const char*)(wrow + 64 * k + 512), _MM_HINT_T0);
                const __m512i bytes = _mm512_loadu_si512(wrow + 64 * k);
                const __m512i wa = _mm512_and_si512(bytes, low4);
                const __m512i wb = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low4);
                const __m512i ia = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wa, _mm512_loadu_si512(xr + 128 * k));
                const __m512i ib = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wb,
                                                       _mm512_loadu_si512(xr + 128 * k + 64));
                /* s * dx of groups 0..3 (s in the weights' order, dx in the [0, 2, 1, 3] order) */
                const __m128 sd = _mm_mul_ps(_mm_loadu_ps(srow + 4 * k),
                                             _mm_permute_ps(_mm_loadu_ps(dr + 4 * k), _MM_SHUFFLE(3, 1, 2, 0)));
                const __m512 sd4 = _mm512_castps128_ps512(sd);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_permutexvar_ps(slots_a, sd4), acc);
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib), _mm512_permutexvar_ps(slots_b, sd4), acc);
            }
            float v = _mm512_reduce_add_ps(acc);
            if (in % 128) {  /* the last 64 inputs: groups 2 * (in / 64) - 2 and - 1, in natural order */
                const int c = in / 64 - 1;
                const __m256i bytes = _mm256_loadu_si256((const __m256i*)(wrow + 32 * c));
                const __m256i ia = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(bytes, low4y),
                                                       _mm256_loadu_si256((const __m256i*)(xr + 64 * c)));
                const __m256i ib = _mm256_dpbusd_epi32(_mm256_setzero_si256(),
                                                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4y),
                                                       _mm256_loadu_si256((const __m256i*)(xr + 64 * c + 32)));
                v += hsum256(_mm256_cvtepi32_ps(ia)) * (srow[2 * c] * dr[2 * c])
                   + hsum256(_mm256_cvtepi32_ps(ib)) * (srow[2 * c + 1] * dr[2 * c + 1]);
            }
            v += zero_term(Z + (size_t)o * groups, xs + (size_t)r * groups, groups);
            store_out(y, ldy, residual, ldr, r, o, v);
        }
    }
    free(xs);
    free_x8(&xq);
    return 0;
}

/* 8-bit weights (linear_q8's layout): vpdpbusd takes unsigned bytes, so q + 128 (q ^ 0x80) meets xq and
 * s * dx * 128 * sum xq is taken off per group (sum xq is exact: the quantisation counted it).  Groups of 16 (Q6_K)
 * scale lanes 0..3 and 4..7 of a 32-input chunk apart. */
int linear_q8_x8(const int8_t* restrict W, const float* restrict S, const float* restrict Z,
                 const uint16_t* restrict x, uint16_t* restrict y, int out, int in, int group, int rows,
                 long ldy, const uint16_t* restrict residual, long ldr) {
    if (in % 32 || !(group == 16 || (group % 32 == 0 && in % group == 0)) || rows < 1 || rows > Q_MAX_ROWS
        || out < 1)
        return -1;
    const int groups = in / group, chunks = in / 32, per_group = group / 32;
    x8_rows xq;
    float* xs = Z ? group_sums(x, rows, in, group) : NULL;
    /* per row and 16 inputs: 128 * dx * sum xq, the offset that q + 128 adds */
    float* offset = alloc64(sizeof(float) * (size_t)rows * chunks * 2);
    const int bad = (Z && !xs) || !offset || quantize_x8(x, rows, in, 0, &xq);
    if (bad) { free(xs); free(offset); free_x8(&xq); return -3; }
    for (size_t i = 0; i < (size_t)rows * chunks * 2; i++) offset[i] = 128.0f * xq.d[i / 2] * (float)xq.sums16[i];
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    #pragma omp parallel for schedule(static)
    for (int o = 0; o < out; o++) {
        const int8_t* wrow = W + (size_t)o * in;
        const float* srow = S + (size_t)o * groups;
        for (int r = 0; r < rows; r++) {
            const int8_t* xr = xq.q + (size_t)r * in;
            const float* dr = xq.d + (size_t)r * chunks;
            const float* orow = offset + (size_t)r * chunks * 2;
            __m256 acc = _mm256_setzero_ps();
            float off = 0.0f;
            for (int c = 0; c < chunks; c++) {
                if (r == 0 && (c & 1) == 0) _mm_prefetch((const char*)(wrow + 32 * c + 1024), _MM_HINT_T0);
                const __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wrow + 32 * c)), flip);
                const __m256i i32 = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w,
                                                        _mm256_loadu_si256((const __m256i*)(xr + 32 * c)));
                float s0, s1;
                __m256 sv;
                if (per_group == 0) {
                    s0 = srow[2 * c], s1 = srow[2 * c + 1];
                    sv = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s0)), _mm_set1_ps(s1), 1);
                } else {
                    s0 = s1 = srow[c / per_group];
                    sv = _mm256_set1_ps(s0);
                }
                acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(i32), sv), _mm256_broadcast_ss(dr + c), acc);
                off += s0 * orow[2 * c] + s1 * orow[2 * c + 1];
            }
            float v = hsum256(acc) - off;
            if (Z) v += zero_term(Z + (size_t)o * groups, xs + (size_t)r * groups, groups);
            store_out(y, ldy, residual, ldr, r, o, v);
        }
    }
    free(offset);
    free(xs);
    free_x8(&xq);
    return 0;
}
#else  /* no AVX512-VNNI: --activations int8 is not offered, but the library keeps every symbol (a missing one
        * would make starqa/kernels/__init__.py refuse the whole library, the bfloat16 kernels with it) */
int starqa_quant_x8_available(void) { return 0; }
int linear_q4_x8(void) { return -2; }
int linear_q8_x8(void) { return -2; }
#endif

#else  /* no AVX512-BF16: quantized decoding is not offered (starqa.quantized_weights says so); stubs keep every
      * symbol, so that the other kernels still load */
int starqa_quant_available(void) { return 0; }
int starqa_quant_x8_available(void) { return 0; }
int linear_q4(void) { return -2; }
int linear_q8(void) { return -2; }
int dequantize_q(void) { return -2; }
int linear_q4_x8(void) { return -2; }
int linear_q8_x8(void) { return -2; }
#endif
