// AVX-512 BF16 (GGML_AVX512_BF16): bf16 conversions and dot products.
#include <immintrin.h>
#include <stdio.h>

int main(void) {
    volatile float x = 1.5f, y = 2.0f;
    __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(x), _mm512_set1_ps(x));
    __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(y), _mm512_set1_ps(y));
    __m512   r = _mm512_dpbf16_ps(_mm512_setzero_ps(), a, b);
    float out[16];
    _mm512_storeu_ps(out, r);
    int ok = out[15] == 6.0f;
    printf("%s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
