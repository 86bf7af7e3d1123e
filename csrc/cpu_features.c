#include "cpu_features.h"

#include <pthread.h>
#include <stdatomic.h>

#include "bf16.h"
#include "errors.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#endif

static unsigned long long read_xcr0(void) {
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}

static void probe(vad_cpu_features *f) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return; /* no OSXSAVE: no XGETBV */
    unsigned long long xcr0 = read_xcr0();
    /* SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state enabled by the OS */
    int os_avx512 = (xcr0 & 0xe6) == 0xe6;
    f->os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    f->avx512f = os_avx512 && (b & (1u << 16));
    f->avx512bw = os_avx512 && (b & (1u << 30));
    f->amx_bf16 = (d >> 22) & 1;
    f->amx_tile = (d >> 24) & 1;
    f->amx_int8 = (d >> 25) & 1;
    if (a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f->avx512bf16 = f->avx512f && (a & (1u << 5));
#if defined(__linux__)
    if (f->amx_tile && f->os_amx) {
        unsigned long long mask = 0;
        if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 &&
            syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mask) == 0)
            f->amx_permitted = (mask >> XFEATURE_XTILEDATA) & 1;
    }
#endif
}
#else
static void probe(vad_cpu_features *f) { (void)f; }
#endif

static vad_cpu_features features;
static pthread_once_t probed = PTHREAD_ONCE_INIT;

static void probe_once(void) { probe(&features); }

const vad_cpu_features *vad_cpu_features_get(void) {
    pthread_once(&probed, probe_once);
    return &features;
}

static atomic_int bf16_allowed = 1;

int vad_precision_allow_bf16(int allow) {
    int prev = atomic_load(&bf16_allowed);
    atomic_store(&bf16_allowed, allow ? 1 : 0);
    return prev;
}

int vad_precision_kernel(int precision) {
    const vad_cpu_features *f = vad_cpu_features_get();
    if (precision == VAD_FP32) return f->avx512f ? VAD_KERNEL_AVX512 : VAD_KERNEL_BLAS;
#ifdef VAD_HAVE_BF16_KERNELS
    if (precision == VAD_BF16)
        return f->avx512bf16 && atomic_load(&bf16_allowed) ? VAD_KERNEL_AVX512BF16 : VAD_KERNEL_NONE;
#endif
    return VAD_KERNEL_NONE;
}

const char *vad_kernel_name(int kernel) {
    switch (kernel) {
    case VAD_KERNEL_BLAS: return "openblas";
    case VAD_KERNEL_AVX512: return "avx512f";
    case VAD_KERNEL_AVX512BF16: return "avx512bf16";
    default: return "none";
    }
}

int vad_precision_check(int precision) {
    if (precision != VAD_FP32 && precision != VAD_BF16)
        return vad_fail(VAD_ERR_VALUE, "unknown precision %d", precision);
    if (vad_precision_kernel(precision) == VAD_KERNEL_NONE)
#ifdef VAD_HAVE_BF16_KERNELS
        return vad_fail(VAD_ERR_VALUE, "precision 'bf16' needs a CPU with AVX512-BF16 (vdpbf16ps), "
                        "which this CPU (or its operating system) does not offer; use precision='fp32'");
#else
        return vad_fail(VAD_ERR_VALUE, "precision 'bf16' needs AVX512-BF16 kernels, which this build "
                        "left out (its compiler has no AVX512-BF16 support); use precision='fp32'");
#endif
    return VAD_OK;
}
