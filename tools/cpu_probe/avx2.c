// AVX2, FMA, F16C and BMI2: what ggml's portable x86-64 build (-mavx -mavx2 -mfma -mf16c -mbmi2) uses.
#include <immintrin.h>
#include <stdio.h>

int main(void) {
    volatile int   a = 3, b = 4;
    volatile float x = 1.5f, y = 2.0f, z = 0.25f;
    __m256i s = _mm256_add_epi32(_mm256_set1_epi32(a), _mm256_set1_epi32(b));      // AVX2
    __m256  f = _mm256_fmadd_ps(_mm256_set1_ps(x), _mm256_set1_ps(y), _mm256_set1_ps(z));  // FMA
    __m128  h = _mm_cvtph_ps(_mm_cvtps_ph(_mm_set1_ps(x), 0));                       // F16C
    unsigned p = _pdep_u32(0x5u, 0xF0u);                                            // BMI2
    int   si[8];
    float sf[8], sh[4];
    _mm256_storeu_si256((__m256i *) si, s);
    _mm256_storeu_ps(sf, f);
    _mm_storeu_ps(sh, h);
    int ok = si[7] == 7 && sf[7] == 3.25f && sh[3] == 1.5f && p == 0x50u;
    printf("%s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
