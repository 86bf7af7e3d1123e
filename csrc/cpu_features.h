/* What the CPU and the operating system offer, probed once at run time, and the kernel each
 * precision runs with (the dispatch). The build itself never assumes an instruction set: kernels
 * that need AVX-512 or AVX512-BF16 are compiled per function (target attributes) and only called
 * when the probe found the feature. */
#ifndef VAD_CPU_FEATURES_H
#define VAD_CPU_FEATURES_H

enum vad_precision { VAD_FP32 = 0, VAD_BF16 = 1 };

typedef struct {
    int avx512f, avx512bw, avx512bf16; /* CPUID and the OS saves the ZMM / opmask state (XCR0) */
    int amx_tile, amx_bf16, amx_int8;  /* CPUID leaf 7 EDX bits 24, 22, 25 */
    int os_amx;                        /* XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA) */
    int amx_permitted;                 /* Linux granted XTILEDATA (arch_prctl ARCH_REQ_XCOMP_PERM) */
} vad_cpu_features;

/* The probe result (computed on the first call, thread-safe). */
const vad_cpu_features *vad_cpu_features_get(void);

/* The kernel families behind each precision (the dispatch's choices). */
enum vad_kernel {
    VAD_KERNEL_NONE = 0,       /* the precision cannot run here */
    VAD_KERNEL_BLAS = 1,       /* fp32 through OpenBLAS (no AVX-512) */
    VAD_KERNEL_AVX512 = 2,     /* fp32 AVX-512F kernels (panel GEMM, fused attention) */
    VAD_KERNEL_AVX512BF16 = 3, /* bf16 through vdpbf16ps, fp32 accumulation */
};

/* The kernel a precision uses on this machine. AMX tiles, where present, are reported by
 * vad_cpu_features_get but not used yet: bf16 then still runs on AVX512-BF16. */
int vad_precision_kernel(int precision);
const char *vad_kernel_name(int kernel);
/* 0: behave as if the CPU had no AVX512-BF16 (tests of the refusal); 1 (the default): as probed.
 * Returns the previous setting. */
int vad_precision_allow_bf16(int allow);
/* VAD_OK, or VAD_ERR_VALUE naming the missing CPU feature. */
int vad_precision_check(int precision);

#endif
