// AVX-VNNI (GGML_AVX_VNNI): the 256-bit VEX dot products of CPUs with VNNI but no AVX-512 (Alder Lake).
#include <immintrin.h>
#include <stdio.h>

int main(void) {
    volatile char a = 2, b = -3;
    volatile int  acc = 10;
    __m256i r = _mm256_dpbusd_avx_epi32(_mm256_set1_epi32(acc), _mm256_set1_epi8(a), _mm256_set1_epi8(b));
    int out[8];
    _mm256_storeu_si256((__m256i *) out, r);
    int ok = out[7] == 10 + 4 * 2 * -3;
    printf("%s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
