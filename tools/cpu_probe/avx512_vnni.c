// AVX-512 VNNI (GGML_AVX512_VNNI): u8 x s8 dot products into i32 (the quantized matmul kernels).
#include <immintrin.h>
#include <stdio.h>

int main(void) {
    volatile char a = 2, b = -3;
    volatile int  acc = 10;
    __m512i r = _mm512_dpbusd_epi32(_mm512_set1_epi32(acc), _mm512_set1_epi8(a), _mm512_set1_epi8(b));
    int out[16];
    _mm512_storeu_si512(out, r);
    int ok = out[15] == 10 + 4 * 2 * -3;
    printf("%s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
