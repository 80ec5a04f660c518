/* Decoding kernels for x86-64 CPUs with AVX-512: a decoding step is bound by reading the weights and the stored KV,
 * and torch's CPU kernels read bfloat16 matrices at a fraction of the memory bandwidth when only a few rows multiply
 * them (a GEMV) or when a few query rows attend to many keys.  These two functions read every byte once, in order.
 *
 *   linear_bf16:       y[r, o] = sum_i x[r, i] * W[o, i]       W bf16 [out, in]; x, y bf16 [rows, in] / [rows, out]
 *                      (+ residual[r, o], optionally)
 *   rms_norm_bf16, rope_bf16, silu_mul_bf16: a decoder layer's small per-token steps, one call each instead of the
 *                      dozen torch ops (each costing more dispatch than arithmetic) that a decoding step repeats per
 *                      layer; rounded to bfloat16 wherever torch's bfloat16 ops round, so both paths agree.
 *   decode_attention:  out, lse (and optionally the scores) of R query rows per KV head over n stored keys, no mask,
 *                      with K/V in float32, bfloat16, float16 or int8 (keys scaled per channel and chunk, values per
 *                      token), and optionally over the decode buffer too, split over key chunks that are merged
 *                      exactly by their log-sum-exp.
 *
 * Accumulation is float32 throughout.  Compiled on first use by starqa/kernels/__init__.py with the machine's C
 * compiler (-O3 -march=native -fopenmp), loaded with ctypes after torch, so that OpenMP is torch's own runtime.
 */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#include "bf16.h"

int starqa_kernels_available(void) { return 1; }

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2, KV_I8 = 3 };
#define MAX_ROWS 64   /* query rows per KV head in one call (callers split larger batches) */
#define MAX_CHUNK 256 /* keys per chunk */
#define MAX_DIM 256   /* head_dim, a multiple of 16 */
#if defined(__AVX512BF16__)
#define BF16_DOT 1    /* bfloat16 query x bfloat16 keys through vdpbf16ps */
#else
#define BF16_DOT 0
#endif

static inline __m512 load16(int fmt, const void* base, size_t offset) {
    switch (fmt) {
    case KV_F32: return _mm512_loadu_ps((const float*)base + offset);
    case KV_BF16: return bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + offset)));
    case KV_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + offset)));
    default: return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)base + offset))));
    }
}

/* ------------------------------------------------------------------------------------------------------ linear */

/* Rows of x (bf16) are widened to float32 once; each pair of W rows is streamed once for all rows of x. */
int linear_bf16(const uint16_t* restrict W, const uint16_t* restrict x, uint16_t* restrict y, int out, int in,
                int rows, const uint16_t* restrict residual) {
    if (in % 32 || rows < 1) return -1;
    float* xf = aligned_alloc(64, sizeof(float) * (size_t)rows * in);
    if (!xf) return -3;
    for (size_t i = 0; i < (size_t)rows * in; i += 16)
        _mm512_store_ps(xf + i, bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(x + i))));
    {
        #pragma omp parallel for schedule(static)
        for (int o = 0; o < out; o += 2) {
            const uint16_t* w0 = W + (size_t)o * in;
            const uint16_t* w1 = o + 1 < out ? w0 + in : w0;
            for (int r = 0; r < rows; r++) {
                const float* xr = xf + (size_t)r * in;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
                for (int i = 0; i < in; i += 32) {
                    if (r == 0) _mm_prefetch((const char*)(w0 + i + 4 * (size_t)in), _MM_HINT_T0);
                    __m512 x0 = _mm512_load_ps(xr + i), x1 = _mm512_load_ps(xr + i + 16);
                    a0 = _mm512_fmadd_ps(bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(w0 + i))), x0, a0);
                    a1 = _mm512_fmadd_ps(bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(w0 + i + 16))), x1, a1);
                    b0 = _mm512_fmadd_ps(bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(w1 + i))), x0, b0);
                    b1 = _mm512_fmadd_ps(bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(w1 + i + 16))), x1, b1);
                }
                size_t at = (size_t)r * out + o;
                uint16_t y0 = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(a0, a1)));
                uint16_t y1 = f32_to_bf16(_mm512_reduce_add_ps(_mm512_add_ps(b0, b1)));
                if (residual) {  /* x + linear(h) of a decoder layer, rounded as torch rounds it: twice */
                    y0 = f32_to_bf16(bf16_to_f32(y0) + bf16_to_f32(residual[at]));
                    if (o + 1 < out) y1 = f32_to_bf16(bf16_to_f32(y1) + bf16_to_f32(residual[at + 1]));
                }
                y[at] = y0;
                if (o + 1 < out) y[at + 1] = y1;
            }
        }
    }
    free(xf);
    return 0;
}

/* -------------------------------------------------------------------------------------------- decode attention */

/* exp(x) for float32 lanes: 2^n * p(r) with |r| <= ln2/2 (Cephes expf polynomial), ~1 ulp.  Below ln(FLT_MIN)
 * the result is 0, not a denormal: attention weights that small add nothing next to the largest (1), and a denormal
 * multiplied in the weighted sum would cost the CPU a microcode assist per lane. */
static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

/* lane t of the result = the sum of the 16 lanes of v[t] */
static inline __m512 hsum16(const __m512* v) {
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d p = _mm512_castps_pd(a[2 * i]), q = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
}

#define ROW_BLOCK 4

/* The scores s[r, j] (row stride MAX_CHUNK) of R query rows q (float32, the scale applied) over keys [k0, k1),
 * each key widened to float32 once per 16 and met by every row.  kscale: per-channel key scales (int8). */
static inline __attribute__((always_inline)) void scores_widened(
        int fmt, const void* K, const float* kscale, int k0, int len, int d, const float* q, int R, float* s,
        const int dv) {
    __m512 qv[MAX_ROWS][MAX_DIM / 16];
    for (int r = 0; r < R; r++)  /* per-channel key scales fold into the query */
        for (int c = 0; c < dv; c++) {
            qv[r][c] = _mm512_loadu_ps(q + (size_t)r * d + 16 * c);
            if (kscale) qv[r][c] = _mm512_mul_ps(qv[r][c], _mm512_loadu_ps(kscale + 16 * c));
        }
    for (int j = 0; j < len; j += 16) {
        const int kn = len - j < 16 ? len - j : 16;
        __m512 kv[16][MAX_DIM / 16];
        for (int t = 0; t < 16; t++)
            for (int c = 0; c < dv; c++)
                kv[t][c] = t < kn ? load16(fmt, K, (size_t)(k0 + j + t) * d + 16 * c) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            __m512 acc[16];
            for (int t = 0; t < 16; t++) {
                acc[t] = _mm512_mul_ps(kv[t][0], qv[r][0]);
                for (int c = 1; c < dv; c++) acc[t] = _mm512_fmadd_ps(kv[t][c], qv[r][c], acc[t]);
            }
            _mm512_store_ps(s + r * MAX_CHUNK + j, hsum16(acc));
        }
    }
}

#if BF16_DOT
/* The same for bfloat16 keys and a bfloat16 query qb (unscaled): vdpbf16ps takes both as they are, every product
 * exact in float32, and `scale` multiplies the sums -- no key is widened (d % 32 == 0). */
static inline __attribute__((always_inline)) void scores_bf16(
        const uint16_t* K, int k0, int len, int d, const uint16_t* qb, float scale, int R, float* s, const int dv) {
    const __m512 sv = _mm512_set1_ps(scale);
    for (int j = 0; j < len; j += 16) {
        const int kn = len - j < 16 ? len - j : 16;
        const uint16_t* kj = K + (size_t)(k0 + j) * d;
        for (int r = 0; r < R; r++) {
            const uint16_t* qr = qb + (size_t)r * d;
            __m512 acc[16];
            for (int t = 0; t < 16; t++) {
                acc[t] = _mm512_setzero_ps();
                if (t < kn)
                    for (int c = 0; c < dv / 2; c++)
                        acc[t] = _mm512_dpbf16_ps(acc[t], (__m512bh)_mm512_loadu_si512(kj + (size_t)t * d + 32 * c),
                                                  (__m512bh)_mm512_loadu_si512(qr + 32 * c));
            }
            _mm512_store_ps(s + r * MAX_CHUNK + j, _mm512_mul_ps(hsum16(acc), sv));
        }
    }
}
#endif

/* One (head, chunk): the partial softmax state of R rows over keys [k0, k1).  K and V point at this head's first
 * key (token stride d).  kscale: this chunk's per-channel key scales (int8); vscale: this head's per-token value
 * scales (int8); qb: the query in bfloat16, unscaled, where the keys are bfloat16 too (else NULL: q, float32,
 * scaled).  Writes part_out [R, d] (unnormalised), part_m [R] (max score), part_l [R] (sum of exp). */
static inline __attribute__((always_inline)) void chunk_attention_dv(
        int fmt, const void* K, const void* V, const float* kscale, const float* vscale, int k0, int k1, int d,
        const float* q, const uint16_t* qb, float scale, int R, float* part_out, float* part_m, float* part_l,
        float* scores, size_t scores_row_stride, const int dv) {
    float s[MAX_ROWS * MAX_CHUNK] __attribute__((aligned(64)));
    const int len = k1 - k0;
#if BF16_DOT
    if (qb)
        scores_bf16((const uint16_t*)K, k0, len, d, qb, scale, R, s, dv);
    else
#endif
        scores_widened(fmt, K, kscale, k0, len, d, q, R, s, dv);
    for (int r = 0; r < R; r++) {
        float* sr = s + r * MAX_CHUNK;
        if (scores) memcpy(scores + (size_t)r * scores_row_stride + k0, sr, sizeof(float) * (size_t)len);
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int j = 0; j < len; j += 16) {
            __mmask16 mask = len - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - j)) - 1);
            mv = _mm512_mask_max_ps(mv, mask, mv, _mm512_load_ps(sr + j));
        }
        const float m = _mm512_reduce_max_ps(mv);
        mv = _mm512_set1_ps(m);
        __m512 lv = _mm512_setzero_ps();
        for (int j = 0; j < len; j += 16) {
            __mmask16 mask = len - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (len - j)) - 1);
            __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_load_ps(sr + j), mv)));
            lv = _mm512_add_ps(lv, p);
            if (vscale) p = _mm512_mul_ps(p, _mm512_maskz_loadu_ps(mask, vscale + k0 + j));  /* per-token values */
            _mm512_store_ps(sr + j, p);
        }
        part_m[r] = m;
        part_l[r] = _mm512_reduce_add_ps(lv);
    }
    for (int r0 = 0; r0 < R; r0 += ROW_BLOCK) {
        const int rb = R - r0 < ROW_BLOCK ? R - r0 : ROW_BLOCK;
        __m512 acc[ROW_BLOCK][MAX_DIM / 16];
        for (int r = 0; r < rb; r++)
            for (int c = 0; c < dv; c++) acc[r][c] = _mm512_setzero_ps();
        for (int j = 0; j < len; j++) {
            for (int c = 0; c < dv; c++) {
                __m512 vv = load16(fmt, V, (size_t)(k0 + j) * d + 16 * c);
                for (int r = 0; r < rb; r++)
                    acc[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(s[(r0 + r) * MAX_CHUNK + j]), vv, acc[r][c]);
            }
        }
        for (int r = 0; r < rb; r++)
            for (int c = 0; c < dv; c++) _mm512_storeu_ps(part_out + (size_t)(r0 + r) * d + 16 * c, acc[r][c]);
    }
}

/* head_dim 64 and 128 get their own copies with the vector count known to the compiler, so that the
 * accumulators of a row block stay in registers. */
static void chunk_attention(int fmt, const void* K, const void* V, const float* kscale, const float* vscale,
                            int k0, int k1, int d, const float* q, const uint16_t* qb, float scale, int R,
                            float* part_out, float* part_m, float* part_l, float* scores, size_t scores_row_stride) {
    switch (d) {
    case 64:
        chunk_attention_dv(fmt, K, V, kscale, vscale, k0, k1, d, q, qb, scale, R, part_out, part_m, part_l, scores,
                           scores_row_stride, 4);
        break;
    case 128:
        chunk_attention_dv(fmt, K, V, kscale, vscale, k0, k1, d, q, qb, scale, R, part_out, part_m, part_l, scores,
                           scores_row_stride, 8);
        break;
    default:
        chunk_attention_dv(fmt, K, V, kscale, vscale, k0, k1, d, q, qb, scale, R, part_out, part_m, part_l, scores,
                           scores_row_stride, d / 16);
    }
}

/* One segment of keys a query row attends to: the stored prefix (chunked by chunk_start, scored for a caller) or
 * the buffer of the tokens being decoded (uniform chunks, no scores). */
typedef struct {
    int fmt;                      /* KV_F32, KV_BF16, KV_F16 or KV_I8 */
    const void* K;                /* head h's keys start at h * head_stride elements, token stride d */
    const void* V;
    const float* kscale;          /* int8: [hk, n_chunks, d] per channel and chunk */
    const float* vscale;          /* int8: [hk, n] per token */
    long head_stride;
    const int32_t* chunk_start;   /* [n_chunks + 1] ascending offsets; NULL: uniform chunks of MAX_CHUNK over n */
    int n_chunks;
    int n;                        /* keys */
    float* scores;                /* NULL, or float32 [hk, R, n]: the scaled scores */
} Segment;

static inline int chunk_bound(const Segment* s, int c) {
    if (s->chunk_start) return s->chunk_start[c];
    long b = (long)c * MAX_CHUNK;
    return b < s->n ? (int)b : s->n;
}

static int check_segment(const Segment* s) {
    if (s->fmt < 0 || s->fmt > KV_I8 || s->n_chunks < 1 || s->n < 1 || s->head_stride < 0
        || (s->fmt == KV_I8 && (!s->kscale || !s->vscale))) return -1;
    if (s->chunk_start && s->chunk_start[0] != 0) return -2;  /* a first chunk before the keys' start */
    for (int c = 0; c < s->n_chunks; c++) {
        int len = chunk_bound(s, c + 1) - chunk_bound(s, c);
        if (len < 1 || len > MAX_CHUNK) return -2;
    }
    return chunk_bound(s, s->n_chunks) == s->n ? 0 : -2;
}

/* q: [hk, R, d] in q_fmt (KV_F32 or KV_BF16), multiplied by `scale` here; rows are independent queries that see
 * every key of every segment (the prefix, then optionally the decode buffer: merged here, exactly, by the
 * log-sum-exp).  work: float32 [hk * chunks * R * (d + 2)] (chunks over both segments); out: float32 [hk, R, d];
 * lse: float32 [hk, R]. */
int decode_attention(const Segment* prefix, const Segment* local, int hk, int d, const void* q_in, int q_fmt,
                     float scale, int R, float* work, float* out, float* lse) {
    if (R < 1 || R > MAX_ROWS || d % 16 || d > MAX_DIM || (q_fmt != KV_F32 && q_fmt != KV_BF16)) return -1;
    const Segment* segments[2] = {prefix, local};
    int n_segments = local ? 2 : 1;
    for (int i = 0; i < n_segments; i++) {
        int problem = check_segment(segments[i]);
        if (problem) return problem;
    }
    float* q = aligned_alloc(64, sizeof(float) * (size_t)hk * R * d);
    if (!q) return -3;
    for (size_t i = 0; i < (size_t)hk * R * d; i++)
        q[i] = scale * (q_fmt == KV_F32 ? ((const float*)q_in)[i] : bf16_to_f32(((const uint16_t*)q_in)[i]));
    const int chunks = prefix->n_chunks + (local ? local->n_chunks : 0);
    const size_t part = (size_t)R * (d + 2);
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < hk * chunks; t++) {
        const int h = t / chunks, c = t % chunks;
        const Segment* s = c < prefix->n_chunks ? prefix : local;
        const int sc = c < prefix->n_chunks ? c : c - prefix->n_chunks;
        const size_t elem = s->fmt == KV_F32 ? 4 : s->fmt == KV_I8 ? 1 : 2;
        float* w = work + (size_t)t * part;
        /* bfloat16 keys and a bfloat16 query meet as they are (the scale applied to the scores) */
        const uint16_t* qb = (BF16_DOT && s->fmt == KV_BF16 && q_fmt == KV_BF16 && d % 32 == 0)
                                 ? (const uint16_t*)q_in + (size_t)h * R * d : NULL;
        chunk_attention(s->fmt, (const char*)s->K + (size_t)h * s->head_stride * elem,
                        (const char*)s->V + (size_t)h * s->head_stride * elem,
                        s->fmt == KV_I8 ? s->kscale + ((size_t)h * s->n_chunks + sc) * d : NULL,
                        s->fmt == KV_I8 ? s->vscale + (size_t)h * s->n : NULL, chunk_bound(s, sc),
                        chunk_bound(s, sc + 1), d, q + (size_t)h * R * d, qb, scale, R, w, w + (size_t)R * d,
                        w + (size_t)R * d + R, s->scores ? s->scores + (size_t)h * R * s->n : NULL, (size_t)s->n);
    }
    free(q);
    #pragma omp parallel for schedule(static)
    for (int t = 0; t < hk * R; t++) {
        const int h = t / R, r = t % R;
        const float* head_work = work + (size_t)h * chunks * part;
        float M = -INFINITY;
        for (int c = 0; c < chunks; c++) {
            float m = head_work[c * part + (size_t)R * d + r];
            M = m > M ? m : M;
        }
        float L = 0.f;
        __m512 acc[MAX_DIM / 16];
        for (int i = 0; i < d / 16; i++) acc[i] = _mm512_setzero_ps();
        for (int c = 0; c < chunks; c++) {
            const float* w = head_work + c * part;
            const float f = expf(w[(size_t)R * d + r] - M);
            L += f * w[(size_t)R * d + R + r];
            for (int i = 0; i < d / 16; i++)
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(f), _mm512_loadu_ps(w + (size_t)r * d + 16 * i), acc[i]);
        }
        float* o = out + ((size_t)h * R + r) * d;
        for (int i = 0; i < d / 16; i++) _mm512_storeu_ps(o + 16 * i, _mm512_div_ps(acc[i], _mm512_set1_ps(L)));
        lse[h * R + r] = M + logf(L);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ per-token layer steps */

/* y = w * bf16(x * rsqrt(mean(x^2) + eps)), as LlamaRMSNorm in bfloat16: normalised in float32, rounded, then the
 * weight applied in bfloat16. */
int rms_norm_bf16(const uint16_t* restrict x, const uint16_t* restrict w, uint16_t* restrict y, int rows, int dim,
                  float eps) {
    if (dim % 16 || rows < 1) return -1;
    for (int r = 0; r < rows; r++) {
        const uint16_t* xr = x + (size_t)r * dim;
        uint16_t* yr = y + (size_t)r * dim;
        __m512 squares = _mm512_setzero_ps();
        for (int i = 0; i < dim; i += 16) {
            __m512 v = bf16x16_to_f32(_mm256_loadu_si256((const __m256i*)(xr + i)));
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(squares) / dim + eps);
        for (int i = 0; i < dim; i++) {
            float normalised = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[i]) * inv));
            yr[i] = f32_to_bf16(normalised * bf16_to_f32(w[i]));
        }
    }
    return 0;
}

/* Rotary embedding in place on the first `heads` heads of each row (the query and key heads of a fused qkv row):
 * h * cos + rotate_half(h) * sin over the first `rotary` channels, each product and the sum rounded to bfloat16 as
 * torch's bfloat16 ops round them.  cos, sin: bf16 [rows, rotary]. */
int rope_bf16(uint16_t* restrict qk, long row_stride, int rows, int heads, int dim, int rotary,
              const uint16_t* restrict cos, const uint16_t* restrict sin) {
    if (rotary % 2 || rotary > dim || dim > MAX_DIM || rows < 1) return -1;
    int half = rotary / 2;
    float rotated[MAX_DIM];
    for (int r = 0; r < rows; r++) {
        const uint16_t* c = cos + (size_t)r * rotary;
        const uint16_t* s = sin + (size_t)r * rotary;
        for (int h = 0; h < heads; h++) {
            uint16_t* p = qk + (size_t)r * row_stride + (size_t)h * dim;
            for (int j = 0; j < rotary; j++) {
                float other = j < half ? -bf16_to_f32(p[j + half]) : bf16_to_f32(p[j - half]);
                float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(p[j]) * bf16_to_f32(c[j])));
                float b = bf16_to_f32(f32_to_bf16(other * bf16_to_f32(s[j])));
                rotated[j] = a + b;
            }
            for (int j = 0; j < rotary; j++) p[j] = f32_to_bf16(rotated[j]);
        }
    }
    return 0;
}

/* out = bf16(silu(gate)) * up, rounded, for rows of [gate | up] (the fused gate_up projection's output). */
int silu_mul_bf16(const uint16_t* restrict gate_up, uint16_t* restrict out, int rows, int inter) {
    if (rows < 1) return -1;
    for (int r = 0; r < rows; r++) {
        const uint16_t* g = gate_up + (size_t)r * 2 * inter;
        const uint16_t* u = g + inter;
        uint16_t* o = out + (size_t)r * inter;
        for (int i = 0; i < inter; i++) {
            float x = bf16_to_f32(g[i]);
            float silu = bf16_to_f32(f32_to_bf16(x / (1.0f + expf(-x))));
            o[i] = f32_to_bf16(silu * bf16_to_f32(u[i]));
        }
    }
    return 0;
}

/* Sums n floats with all threads, 64 bytes per load: what the memory delivers to a streaming read (the decode
 * benchmark's floor, benchmarks/decode.py). */
float stream_read(const float* p, long n) {
    float total = 0.f;
    #pragma omp parallel for reduction(+:total) schedule(static)
    for (long c = 0; c < n / 64; c++) {
        __m512 a = _mm512_add_ps(_mm512_loadu_ps(p + c * 64), _mm512_loadu_ps(p + c * 64 + 16));
        __m512 b = _mm512_add_ps(_mm512_loadu_ps(p + c * 64 + 32), _mm512_loadu_ps(p + c * 64 + 48));
        total += _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
    return total;
}

#else  /* no AVX-512: the torch path serves */
int starqa_kernels_available(void) { return 0; }
#endif
