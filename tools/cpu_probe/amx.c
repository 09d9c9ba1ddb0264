// AMX tiles (GGML_AMX_TILE/INT8): asks the kernel for tile state (arch_prctl ARCH_REQ_XCOMP_PERM, as
// ggml does), then runs tilezero, tileloadd, tdpbssd and tilestored on two threads and checks the sums.
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA  18

struct tilecfg {
    unsigned char  palette_id, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char  rows[16];
};

static void * run(void * arg) {
    (void) arg;
    static __thread signed char a[16 * 64], b[16 * 64];
    static __thread int         c[16 * 16];
    struct tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 3; ++t) {
        cfg.rows[t]  = 16;
        cfg.colsb[t] = 64;
    }
    memset(a, 2, sizeof a);
    memset(b, 3, sizeof b);
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_loadd(1, a, 64);
    _tile_loadd(2, b, 64);
    _tile_dpbssd(0, 1, 2);
    _tile_stored(0, c, 64);
    _tile_release();
    return (void *) (long) (c[0] == 64 * 6 && c[255] == 64 * 6);
}

int main(void) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) {
        printf("the kernel refuses AMX tile state\n");
        return 1;
    }
    pthread_t th;
    void *    other = 0;
    int       ok    = run(0) != 0;
    if (pthread_create(&th, 0, run, 0) != 0 || pthread_join(th, &other) != 0) return 1;
    ok = ok && other != 0;
    printf("%s\n", ok ? "ok" : "wrong result");
    return ok ? 0 : 1;
}
