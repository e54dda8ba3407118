/* convert.c: fp16 and bf16 to fp32 and back (round to nearest even). */
#include <string.h>

#include "cpu.h"

float iq_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (mant << 13); /* inf or nan */
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else { /* subnormal: normalise */
    int shift = 0;
    while (!(mant & 0x400)) {
      mant <<= 1;
      shift++;
    }
    bits = sign | ((uint32_t)(113 - shift) << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

uint16_t iq_f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t abs = x & 0x7fffffff;
  if (abs >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (abs > 0x7f800000 ? 0x200 : 0));
  if (abs >= 0x477ff000) return (uint16_t)(sign | 0x7c00); /* rounds past 65504 */
  if (abs < 0x38800000) {                                  /* fp16 subnormal or zero */
    if (abs < 0x33000000) return (uint16_t)sign;
    uint32_t mant = (abs & 0x7fffff) | 0x800000;
    int shift = 126 - (int)(abs >> 23); /* 14..24 */
    uint32_t half = mant >> shift, rest = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rest > mid || (rest == mid && (half & 1))) half++;
    return (uint16_t)(sign | half);
  }
  uint32_t h = ((abs - 0x38000000) >> 13);
  uint32_t rest = abs & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
  return (uint16_t)(sign | h);
}

uint16_t iq_f32_to_bf16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  /* truncating a NaN whose payload lies in the low half would give inf: keep it a quiet NaN */
  if ((x & 0x7fffffff) > 0x7f800000) return (uint16_t)((x >> 16) | 0x40);
  return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

float iq_bf16_to_f32(uint16_t b) {
  uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* Hot in matmul's prefill path and attention: cloned so AVX2 machines convert
 * fp16 with F16C instructions. */
IQ_CLONES void iq_to_f32(float *dst, const void *src, int dtype, int64_t count) {
  switch (dtype) {
  case IQ_F16:
    for (int64_t i = 0; i < count; i++) dst[i] = (float)((const _Float16 *)src)[i];
    break;
  case IQ_BF16:
    for (int64_t i = 0; i < count; i++) {
      uint32_t bits = (uint32_t)((const uint16_t *)src)[i] << 16;
      memcpy(dst + i, &bits, 4);
    }
    break;
  default:
    memcpy(dst, src, (size_t)count * sizeof(float));
  }
}
