// ggml's GGML_AVX512: AVX-512 F, CD, VL, DQ and BW (-mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw).
#include <immintrin.h>
#include <stdio.h>

int main(void) {
    volatile float     x = 1.5f, y = 2.0f, z = 0.25f;
    volatile long long q = 3;
    volatile int       c = 1;
    volatile char      e = 5;
    __m512  f  = _mm512_fmadd_ps(_mm512_set1_ps(x), _mm512_set1_ps(y), _mm512_set1_ps(z));   // F
    __m512i lz = _mm512_lzcnt_epi32(_mm512_set1_epi32(c));                                    // CD
    __m256i vl = _mm256_mask_add_epi32(_mm256_setzero_si256(), 0x0F, _mm256_set1_epi32(c),
                                       _mm256_set1_epi32(c));                                 // VL
    __m512i dq = _mm512_mullo_epi64(_mm512_set1_epi64(q), _mm512_set1_epi64(q));             // DQ
    __m512i bw = _mm512_add_epi8(_mm512_set1_epi8(e), _mm512_set1_epi8(e));                  // BW
    float     sf[16];
    int       slz[16], svl[8];
    long long sdq[8];
    char      sbw[64];
    _mm512_storeu_ps(sf, f);
    _mm512_storeu_si512(slz, lz);
    _mm256_storeu_si256((__m256i *) svl, vl);
    _mm512_storeu_si512(sdq, dq);
    _mm512_storeu_si512(sbw, bw);
    int ok = sf[15] == 3.25f && slz[15] == 31 && svl[3] == 2 && svl[4] == 0 && sdq[7] == 9 && sbw[63] == 10;
    printf("%s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
