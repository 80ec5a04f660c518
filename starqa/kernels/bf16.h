/* bfloat16 <-> float32, shared by cpu_decode.c and cpu_quant.c (both compiled into one library, each its own
 * translation unit): rounding to nearest even, as torch's bfloat16 ops round, so the kernels and torch agree. */
#ifndef STARQA_BF16_H
#define STARQA_BF16_H

#include <stdint.h>
#include <string.h>
#include <immintrin.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* sixteen bfloat16 values -> float32 lanes (exact: a bfloat16 is a float32's upper half) */
static inline __m512 bf16x16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* float32 -> bfloat16, round to nearest even (finite values; a NaN stays a NaN) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#endif
