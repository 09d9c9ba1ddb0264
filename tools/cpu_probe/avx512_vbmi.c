// AVX-512 VBMI (GGML_AVX512_VBMI): byte permutes.
#include <immintrin.h>
#include <stdio.h>

int main(void) {
    volatile char k = 63;
    char          src[64], out[64];
    for (int i = 0; i < 64; ++i) src[i] = (char) i;
    __m512i r = _mm512_permutexvar_epi8(_mm512_set1_epi8(k), _mm512_loadu_si512(src));
    _mm512_storeu_si512(out, r);
    int ok = out[0] == 63 && out[63] == 63;
    printf("%s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
