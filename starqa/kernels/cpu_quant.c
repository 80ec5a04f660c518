/* Decoding GEMVs over weights kept in 4 or 8 bits (starqa/quantized_weights.py packs them): a decoding step reads
 * every weight once, so reading a GGUF's own 4- or 8-bit integers instead of their bfloat16 de-quantisation cuts the
 * bytes a step reads by 2-4x.  Every weight is  value = s[g] * q + z[g]  for its group g of consecutive inputs, with
 * s, z float32 (so a GGUF scale such as Q4_K's d * sc is kept exactly); x and y are bfloat16 as in linear_bf16.
 *
 *   linear_q4:  W uint8 [out, in / 2], groups of 32 inputs, q in 0..15 (asymmetric: z per group always).  In each
 *               64-input chunk, byte j holds q[j] in its low nibble and q[32 + j] in its high nibble.  Each nibble
 *               becomes an exact bfloat16 integer (a 16-entry table, vpermw) and meets x in vdpbf16ps: every product
 *               q * x is exact in float32, so only the float32 sums round.
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

#else  /* no AVX512-BF16: quantized decoding is not offered (starqa.quantized_weights says so) */
int starqa_quant_available(void) { return 0; }
#endif
