/* anetrain's decoder for text generation on CPU: a Llama forward pass over a batch of rows with a key/value
 * cache, and llama2.c run.c's sampler, in one C file built at first use (anetrain/generate/native.py).
 *
 * A "row" is one token of one stream at one position: the rows of a call may be the whole prompt of one stream
 * (prefill), one token of each of N streams (batched decode), or a window of known text (teacher forcing).
 * Per layer, for every row r (stream s_r, position p_r):
 *
 *     xn = rmsnorm(x) * g_att                         x: [R, D] the residual stream
 *     q, k, v = xn Wq^T, xn Wk^T, xn Wv^T              [R, Dq], [R, Dkv], [R, Dkv]; RoPE on q and k (pairs)
 *     cache_k[s_r, p_r], cache_v[s_r, p_r] = k, v      written for all rows before any row attends
 *     per head h (kv head j = h / (H / Hkv)):
 *         a = softmax(q_h . cache_k[s_r, 0..p_r, j] / sqrt(dh));   o_h = sum_t a_t cache_v[s_r, t, j]
 *     x += o Wo^T
 *     xn = rmsnorm(x) * g_ffn
 *     x += (silu(xn W1^T) * (xn W3^T)) W2^T
 *
 * then rmsnorm(x) * g_final and the classifier for the rows whose logits are asked for.
 *
 * Weights come in one of three types (everything else, the norms, the cache and the attention, is float32):
 *   F32   float32 weights and inputs (run.c's arithmetic, in another summation order);
 *   BF16  bfloat16 weights; each matmul input rounded to bfloat16 (nearest even), products summed in float32;
 *   Q8    runq.c's Q8_0: int8 weights with a float32 scale per group of GS consecutive values of a row; each
 *         matmul input quantized the same way at run time (scale = max|x| / 127, q = round(x / scale), halves
 *         away from zero as C's round()), integer dot products per group, then scaled by both scales.
 *
 * Threads: one OpenMP parallel region per call; each stage is a work-shared loop (the implicit barrier at its
 * end is the only synchronisation). Matmuls split the output features across threads in blocks of 4 rows of
 * W, which keeps 4 independent accumulator chains in flight even for a single row of input.
 *
 * Kernels: AVX-512 (F, BW, VL; BF16 for BF16, VNNI for Q8) when the compiler targets them and ANET_GENERIC is
 * not defined, otherwise portable loops that the compiler vectorises. Both give the same results up to
 * float32 summation order (Q8's integer sums are exact in both).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(ANET_GENERIC) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define ANET_AVX512 1
#if defined(__AVX512BF16__)
#define ANET_AVX512_BF16 1
#endif
#if defined(__AVX512VNNI__)
#define ANET_AVX512_VNNI 1
#endif
#endif

#define ANET_ABI 1

enum { W_F32 = 0, W_BF16 = 1, W_Q8 = 2 };

typedef struct {
    const void* w;   /* [rows, cols]: float32, bfloat16 (as uint16) or int8 */
    const float* s;  /* Q8 only: [rows, cols / group_size] */
} AnetMat;

typedef struct {
    int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, head_dim, vocab_size;
    int32_t cache_len;   /* positions held per stream */
    int32_t n_streams;
    int32_t max_rows;    /* rows per call (workspace size) */
    int32_t wtype, group_size, n_threads;
    float norm_eps;
    const float* rms_att;   /* [L, D] */
    const float* rms_ffn;   /* [L, D] */
    const float* rms_final; /* [D] */
    const float* rope_cos;  /* [cache_len, dh/2] */
    const float* rope_sin;
    AnetMat emb;            /* [V, D] */
    const AnetMat* wq;      /* L of them: [Dq, D] */
    const AnetMat* wk;      /* [Dkv, D] */
    const AnetMat* wv;      /* [Dkv, D] */
    const AnetMat* wo;      /* [D, Dq] */
    const AnetMat* w1;      /* [F, D] */
    const AnetMat* w2;      /* [D, F] */
    const AnetMat* w3;      /* [F, D] */
    AnetMat cls;            /* [V, D] */
    float* key_cache;       /* [L, n_streams, cache_len, Dkv] (after RoPE) */
    float* value_cache;
    /* workspace: shared by the threads */
    float* x;        /* [R, D] the residual stream */
    float* q;        /* [R, Dq] queries */
    float* ob;       /* [R, Dq] attention outputs */
    float* hb;       /* [R, F] feed-forward hidden */
    /* workspace: each thread's own (T = n_threads blocks), W = max(D, Dq, F) */
    float* att;      /* [T, cache_len] attention scores */
    float* xn;       /* [T, R, W] normalized matmul inputs */
    uint16_t* ab;    /* [T, R, W] BF16 matmul inputs */
    int8_t* aq;      /* [T, R, W] Q8 matmul inputs */
    float* as;       /* [T, R, W / group_size] their scales */
    void* sort;      /* [max_rows, V] (prob, index) pairs for top-p / top-k */
} AnetModel;

int anet_abi(void) { return ANET_ABI; }

int anet_sizeof_model(void) { return (int)sizeof(AnetModel); }

const char* anet_features(void) {
    return ""
#ifdef ANET_AVX512
           "avx512"
#ifdef ANET_AVX512_BF16
           " avx512-bf16"
#endif
#ifdef ANET_AVX512_VNNI
           " avx512-vnni"
#endif
#else
           "generic"
#endif
#ifdef _OPENMP
           " openmp"
#endif
        ;
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

static inline int row_width(const AnetModel* m) {
    return max3(m->dim, m->n_heads * m->head_dim, m->hidden_dim);
}

/* ---- matmul inputs: float32 rows converted once per stage for BF16 and Q8 -------------------------------- */

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even (no NaNs reach here) */
    return (uint16_t)(u >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* runq.c's quantize(): per group, scale = max|x| / 127 and q = round(x / scale) (halves away from zero);
 * an all-zero group gets scale 0 and q = 0 (runq.c would divide by zero there). */
static void quantize_row(const float* x, int n, int gs, int8_t* q, float* s) {
    for (int g = 0; g < n / gs; g++) {
        const float* xg = x + g * gs;
        float wmax = 0.0f;
        for (int i = 0; i < gs; i++) {
            float a = fabsf(xg[i]);
            wmax = a > wmax ? a : wmax;
        }
        float scale = wmax / 127.0f;
        s[g] = scale;
        for (int i = 0; i < gs; i++) {
            float v = scale > 0.0f ? xg[i] / scale : 0.0f;
            float t = truncf(v);
            float r = t + (fabsf(v - t) >= 0.5f ? copysignf(1.0f, v) : 0.0f);
            q[g * gs + i] = (int8_t)r;
        }
    }
}

/* Row r of a matmul input (n values of src) in the weight type's input form, into the given buffers (rows W
 * values apart). */
static void prepare_row(const AnetModel* m, const float* src, int n, int r, uint16_t* ab, int8_t* aq, float* as) {
    const size_t w = (size_t)row_width(m);
    if (m->wtype == W_BF16) {
        uint16_t* dst = ab + (size_t)r * w;
        for (int i = 0; i < n; i++) dst[i] = to_bf16(src[i]);
    } else if (m->wtype == W_Q8) {
        quantize_row(src, n, m->group_size, aq + (size_t)r * w, as + (size_t)r * (w / m->group_size));
    }
}

static void rmsnorm(float* o, const float* x, const float* g, int n, float eps);

/* ---- tiles: up to 4 rows of W against up to 4 input rows ---------------------------------------------------- */

/* A tile computes out[k * 4 + q] = W[i0 + k, :] . input_q for k < c <= 4 rows of W and q < nx <= 4 input rows,
 * keeping 4 x nx accumulators in registers: each W load serves nx inputs, each input load 4 rows of W.
 * Missing rows of W (c < 4) repeat row i0 and their results are dropped by the caller.
 *
 * Software prefetch for weights streamed from memory: a block of 4 rows of W is contiguous and the blocks are
 * consumed in order, so while the kernel reads bytes [0, k) of each row it prefetches the span ANET_PF_BYTES
 * ahead of the block at 4x that pace, one cache line per row read. The hardware prefetcher alone keeps fewer
 * lines in flight for 4 interleaved rows (measured from DRAM, one thread: bf16 12 -> 17 GB/s, Q8 10 -> 15). */
#ifndef ANET_PF_BYTES
#define ANET_PF_BYTES 8192
#endif

typedef struct {
    const float* f;     /* F32: float32 rows */
    const uint16_t* b;  /* BF16: bfloat16 rows */
    const int8_t* q;    /* Q8: int8 rows */
    const float* s;     /*     and their group scales */
    size_t stride;      /* elements between rows (scales: stride / group_size) */
} Inputs;

static inline const float* row_f(const Inputs* in, int r) { return in->f + (size_t)r * in->stride; }
static inline const uint16_t* row_b(const Inputs* in, int r) { return in->b + (size_t)r * in->stride; }
static inline const int8_t* row_q(const Inputs* in, int r) { return in->q + (size_t)r * in->stride; }
static inline const float* row_s(const Inputs* in, int r, int gs) { return in->s + (size_t)r * (in->stride / gs); }

#ifdef ANET_AVX512
#define PREFETCH4(block, k)                                                       \
    do {                                                                          \
        const char* pf_ = (const char*)(block) + ANET_PF_BYTES + 4 * (size_t)(k); \
        _mm_prefetch(pf_, _MM_HINT_T0);                                           \
        _mm_prefetch(pf_ + 64, _MM_HINT_T0);                                      \
        _mm_prefetch(pf_ + 128, _MM_HINT_T0);                                     \
        _mm_prefetch(pf_ + 192, _MM_HINT_T0);                                     \
    } while (0)

/* The sums of the 16 lanes of a, b, c, d, in that order. */
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 s = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0xB1));
    s = _mm512_add_ps(s, _mm512_permute_ps(s, 0x4E));
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), s));
}

/* e^x for 16 floats, within 2 ulp of expf (Cephes' polynomial on [-ln2/2, ln2/2], then x 2^n). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline void store_tile(__m512 acc[4][4], int nx, float* out) {
    for (int q = 0; q < nx; q++) {
        float s[4];
        _mm_storeu_ps(s, reduce4(acc[0][q], acc[1][q], acc[2][q], acc[3][q]));
        for (int k = 0; k < 4; k++) out[k * 4 + q] = s[k];
    }
}

#define TILE_BODY_BEGIN           \
    __m512 acc[4][4];             \
    for (int k = 0; k < 4; k++)   \
        for (int q = 0; q < 4; q++) acc[k][q] = _mm512_setzero_ps();

static inline __attribute__((always_inline)) void tile_f32_nx(const float* const w[4], int n, const Inputs* in,
                                                               int r0, const int nx, float* out) {
    TILE_BODY_BEGIN
    const float* x[4];
    for (int q = 0; q < nx; q++) x[q] = row_f(in, r0 + q);
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        PREFETCH4(w[0], 4 * j);
        __m512 wv[4];
        for (int k = 0; k < 4; k++) wv[k] = _mm512_loadu_ps(w[k] + j);
        for (int q = 0; q < nx; q++) {
            __m512 xv = _mm512_loadu_ps(x[q] + j);
            for (int k = 0; k < 4; k++) acc[k][q] = _mm512_fmadd_ps(wv[k], xv, acc[k][q]);
        }
    }
    if (j < n) {
        __mmask16 mk = (__mmask16)((1u << (n - j)) - 1u);
        __m512 wv[4];
        for (int k = 0; k < 4; k++) wv[k] = _mm512_maskz_loadu_ps(mk, w[k] + j);
        for (int q = 0; q < nx; q++) {
            __m512 xv = _mm512_maskz_loadu_ps(mk, x[q] + j);
            for (int k = 0; k < 4; k++) acc[k][q] = _mm512_fmadd_ps(wv[k], xv, acc[k][q]);
        }
    }
    store_tile(acc, nx, out);
}

#ifdef ANET_AVX512_BF16
static inline __attribute__((always_inline)) void tile_bf16_nx(const uint16_t* const w[4], int n, const Inputs* in,
                                                                int r0, const int nx, float* out) {
    TILE_BODY_BEGIN
    const uint16_t* x[4];
    for (int q = 0; q < nx; q++) x[q] = row_b(in, r0 + q);
    int j = 0;
    for (; j + 32 <= n; j += 32) {
        PREFETCH4(w[0], 2 * j);
        __m512bh wv[4];
        for (int k = 0; k < 4; k++) wv[k] = (__m512bh)_mm512_loadu_si512(w[k] + j);
        for (int q = 0; q < nx; q++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x[q] + j);
            for (int k = 0; k < 4; k++) acc[k][q] = _mm512_dpbf16_ps(acc[k][q], wv[k], xv);
        }
    }
    if (j < n) {
        __mmask32 mk = (__mmask32)((1u << (n - j)) - 1u);
        __m512bh wv[4];
        for (int k = 0; k < 4; k++) wv[k] = (__m512bh)_mm512_maskz_loadu_epi16(mk, w[k] + j);
        for (int q = 0; q < nx; q++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x[q] + j);
            for (int k = 0; k < 4; k++) acc[k][q] = _mm512_dpbf16_ps(acc[k][q], wv[k], xv);
        }
    }
    store_tile(acc, nx, out);
}
#endif

#ifdef ANET_AVX512_VNNI
/* vpdpbusd multiplies unsigned by signed bytes: feed |x| and W with x's sign moved onto it (W has no -128).
 * Each 64-byte chunk's int32 lanes are converted and scaled at once (exact: a chunk's sums are < 2^24). Group
 * sizes that are multiples of 64 scale a chunk by one (W scale x input scale); group size 32 puts two groups in
 * a chunk (lanes 0-7 and 8-15), with a last half chunk when a row has an odd number of groups. */
static inline __attribute__((always_inline)) void tile_q8_nx(const int8_t* const w[4], const float* const ws[4],
                                                              int n, int gs, const Inputs* in, int r0, const int nx,
                                                              float* out) {
    TILE_BODY_BEGIN
    const int8_t* x[4];
    const float* xs[4];
    for (int q = 0; q < nx; q++) x[q] = row_q(in, r0 + q), xs[q] = row_s(in, r0 + q, gs);
    const __m512i zero = _mm512_setzero_si512();
    for (int j = 0; j < n; j += 64) {
        PREFETCH4(w[0], j);
        __mmask64 mk = n - j >= 64 ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu; /* a half chunk only with gs 32 */
        __m512i wv[4];
        __m512 sw[4], sx[4];
        for (int k = 0; k < 4; k++) wv[k] = _mm512_maskz_loadu_epi8(mk, w[k] + j);
        if (gs >= 64) {
            int g = j / gs;
            for (int k = 0; k < 4; k++) sw[k] = _mm512_set1_ps(ws[k][g]);
            for (int q = 0; q < nx; q++) sx[q] = _mm512_set1_ps(xs[q][g]);
        } else { /* gs == 32 */
            int g = j / 32, two = n - j > 32;
            for (int k = 0; k < 4; k++)
                sw[k] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(ws[k][g])),
                                                            _mm256_castps_pd(_mm256_set1_ps(two ? ws[k][g + 1] : 0.0f)), 1));
            for (int q = 0; q < nx; q++)
                sx[q] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(xs[q][g])),
                                                            _mm256_castps_pd(_mm256_set1_ps(two ? xs[q][g + 1] : 0.0f)), 1));
        }
        for (int q = 0; q < nx; q++) {
            __m512i xv = _mm512_maskz_loadu_epi8(mk, x[q] + j);
            __mmask64 neg = _mm512_movepi8_mask(xv);
            __m512i xa = _mm512_abs_epi8(xv);
            for (int k = 0; k < 4; k++) {
                __m512i t = _mm512_dpbusd_epi32(zero, xa, _mm512_mask_sub_epi8(wv[k], neg, zero, wv[k]));
                acc[k][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sw[k], sx[q]), acc[k][q]);
            }
        }
    }
    store_tile(acc, nx, out);
}
#endif
#endif /* ANET_AVX512 */

/* Portable tiles: one dot product at a time, in loops the compiler vectorises. */
static void tile_generic(const AnetModel* m, const AnetMat* M, int i0, int c, int n, const Inputs* in, int r0,
                         int nx, float* out) {
    for (int k = 0; k < c; k++) {
        for (int q = 0; q < nx; q++) {
            float acc = 0.0f;
            if (m->wtype == W_F32) {
                const float* w = (const float*)M->w + (size_t)(i0 + k) * n;
                const float* x = row_f(in, r0 + q);
#pragma omp simd reduction(+ : acc)
                for (int j = 0; j < n; j++) acc += w[j] * x[j];
            } else if (m->wtype == W_BF16) {
                const uint16_t* w = (const uint16_t*)M->w + (size_t)(i0 + k) * n;
                const uint16_t* x = row_b(in, r0 + q);
#pragma omp simd reduction(+ : acc)
                for (int j = 0; j < n; j++) acc += from_bf16(w[j]) * from_bf16(x[j]);
            } else {
                const int gs = m->group_size, ng = n / gs;
                const int8_t* w = (const int8_t*)M->w + (size_t)(i0 + k) * n;
                const float* s = M->s + (size_t)(i0 + k) * ng;
                const int8_t* x = row_q(in, r0 + q);
                const float* xs = row_s(in, r0 + q, gs);
                for (int g = 0; g < ng; g++) {
                    int32_t isum = 0;
#pragma omp simd reduction(+ : isum)
                    for (int j = 0; j < gs; j++) isum += (int32_t)w[g * gs + j] * (int32_t)x[g * gs + j];
                    acc += (float)isum * (s[g] * xs[g]);
                }
            }
            out[k * 4 + q] = acc;
        }
    }
}

/* out[k * 4 + q] = M[i0 + k, :] . input row (r0 + q) for k < c, q < nx; rows of M have n values. */
static void tile(const AnetModel* m, const AnetMat* M, int i0, int c, int n, const Inputs* in, int r0, int nx,
                 float* out) {
#ifdef ANET_AVX512
    if (m->wtype == W_F32) {
        const float* base = (const float*)M->w;
        const float* w[4];
        for (int k = 0; k < 4; k++) w[k] = base + (size_t)(i0 + (k < c ? k : 0)) * n;
        switch (nx) {
            case 1: tile_f32_nx(w, n, in, r0, 1, out); return;
            case 2: tile_f32_nx(w, n, in, r0, 2, out); return;
            case 3: tile_f32_nx(w, n, in, r0, 3, out); return;
            default: tile_f32_nx(w, n, in, r0, 4, out); return;
        }
    }
#ifdef ANET_AVX512_BF16
    if (m->wtype == W_BF16) {
        const uint16_t* base = (const uint16_t*)M->w;
        const uint16_t* w[4];
        for (int k = 0; k < 4; k++) w[k] = base + (size_t)(i0 + (k < c ? k : 0)) * n;
        switch (nx) {
            case 1: tile_bf16_nx(w, n, in, r0, 1, out); return;
            case 2: tile_bf16_nx(w, n, in, r0, 2, out); return;
            case 3: tile_bf16_nx(w, n, in, r0, 3, out); return;
            default: tile_bf16_nx(w, n, in, r0, 4, out); return;
        }
    }
#endif
#ifdef ANET_AVX512_VNNI
    const int gs = m->group_size;
    if (m->wtype == W_Q8 && (gs % 64 == 0 || gs == 32)) {
        const int8_t* base = (const int8_t*)M->w;
        const int8_t* w[4];
        const float* ws[4];
        for (int k = 0; k < 4; k++) {
            int i = i0 + (k < c ? k : 0);
            w[k] = base + (size_t)i * n;
            ws[k] = M->s + (size_t)i * (n / gs);
        }
        switch (nx) {
            case 1: tile_q8_nx(w, ws, n, gs, in, r0, 1, out); return;
            case 2: tile_q8_nx(w, ws, n, gs, in, r0, 2, out); return;
            case 3: tile_q8_nx(w, ws, n, gs, in, r0, 3, out); return;
            default: tile_q8_nx(w, ws, n, gs, in, r0, 4, out); return;
        }
    }
#endif
#endif
    tile_generic(m, M, i0, c, n, in, r0, nx, out);
}

/* A thread's own copy of a stage's matmul input: rows rows[r] (r < R; rows NULL: r) of src (stride floats
 * apart, n values), normalized with gain g when g is given, then converted to the weight type's input form.
 * Every thread prepares the whole input (O(R n) work against the stage's O(R n d)), so no barrier is needed
 * between making an input and using it. */
static Inputs own_inputs(const AnetModel* m, int tid, const float* src, size_t stride, int n, int R,
                         const int32_t* rows, const float* g) {
    const size_t W = (size_t)row_width(m), base = (size_t)tid * m->max_rows * W;
    const int gs = m->wtype == W_Q8 ? m->group_size : 1;
    Inputs in = {src, m->ab + base, m->aq + base, m->as + base / gs, stride};
    if (g == NULL && rows == NULL && m->wtype == W_F32) return in; /* float32 reads the shared rows */
    for (int r = 0; r < R; r++) {
        const float* row = src + (size_t)(rows ? rows[r] : r) * stride;
        if (g != NULL) {
            rmsnorm(m->xn + base + (size_t)r * W, row, g, n, m->norm_eps);
            row = m->xn + base + (size_t)r * W;
        }
        prepare_row(m, row, n, r, m->ab + base, m->aq + base, m->as + base / gs);
    }
    if (g != NULL) in.f = m->xn + base;
    if (g != NULL || m->wtype != W_F32) in.stride = W;
    return in;
}

/* ---- the forward pass --------------------------------------------------------------------------------------- */

static void embed_row(const AnetModel* m, int token, float* x) {
    int d = m->dim;
    if (m->wtype == W_F32) {
        memcpy(x, (const float*)m->emb.w + (size_t)token * d, (size_t)d * sizeof(float));
    } else if (m->wtype == W_BF16) {
        const uint16_t* e = (const uint16_t*)m->emb.w + (size_t)token * d;
        for (int i = 0; i < d; i++) x[i] = from_bf16(e[i]);
    } else {
        int gs = m->group_size;
        const int8_t* e = (const int8_t*)m->emb.w + (size_t)token * d;
        const float* s = m->emb.s + (size_t)token * (d / gs);
        for (int i = 0; i < d; i++) x[i] = e[i] * s[i / gs];
    }
}

static void rmsnorm(float* o, const float* x, const float* g, int n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    ss = 1.0f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) o[i] = g[i] * (ss * x[i]);
}

static void softmax(float* x, int n) {
    float mx = x[0];
    for (int i = 1; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* a[i] = silu(a[i]) * b[i] = a / (1 + e^-a) * b for a tile's 16 values. */
static inline void silu_mul16(float* a, const float* b) {
#ifdef ANET_AVX512
    const __m512 av = _mm512_loadu_ps(a);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), av));
    _mm512_storeu_ps(a, _mm512_mul_ps(_mm512_div_ps(av, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_loadu_ps(b)));
#else
    for (int i = 0; i < 16; i++) a[i] = a[i] / (1.0f + expf(-a[i])) * b[i];
#endif
}

#ifdef ANET_AVX512
/* run.c's softmax with 16 lanes at a time (the exponential within 2 ulp of expf). */
static void softmax16(float* x, int n) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 16 <= n; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(x + i));
    float mx = _mm512_reduce_max_ps(mv);
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    const __m512 m16 = _mm512_set1_ps(mx);
    __m512 sv = _mm512_setzero_ps();
    for (i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), m16));
        _mm512_mask_storeu_ps(x + i, k, e);
        sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(k, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sv));
    for (i = 0; i < n; i += 16) {
        const __mmask16 k = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
        _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), inv));
    }
}
#endif

/* One query head over positions 0..T-1 of its stream: scores q.k_t / sqrt(dh) into att, run.c's softmax, then
 * o = sum_t att[t] v_t. Keys and values are rows `stride` floats apart. */
static void attend(const float* q, const float* kb, const float* vb, size_t stride, int T, int dh, float sq,
                   float* att, float* o) {
#ifdef ANET_AVX512
    if (dh % 16 == 0 && dh <= 256) {
        const int nv = dh / 16;
        __m512 qv[16], ov[16];
        for (int i = 0; i < nv; i++) qv[i] = _mm512_loadu_ps(q + 16 * i), ov[i] = _mm512_setzero_ps();
        int t = 0;
        for (; t + 4 <= T; t += 4) {
            __m512 a[4];
            for (int u = 0; u < 4; u++) {
                const float* kt = kb + (size_t)(t + u) * stride;
                a[u] = _mm512_mul_ps(_mm512_loadu_ps(kt), qv[0]);
                for (int i = 1; i < nv; i++) a[u] = _mm512_fmadd_ps(_mm512_loadu_ps(kt + 16 * i), qv[i], a[u]);
            }
            _mm_storeu_ps(att + t, _mm_div_ps(reduce4(a[0], a[1], a[2], a[3]), _mm_set1_ps(sq)));
        }
        for (; t < T; t++) {
            const float* kt = kb + (size_t)t * stride;
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(kt), qv[0]);
            for (int i = 1; i < nv; i++) a = _mm512_fmadd_ps(_mm512_loadu_ps(kt + 16 * i), qv[i], a);
            att[t] = _mm512_reduce_add_ps(a) / sq;
        }
        softmax16(att, T);
        for (t = 0; t < T; t++) {
            const float* vt = vb + (size_t)t * stride;
            const __m512 w = _mm512_set1_ps(att[t]);
            for (int i = 0; i < nv; i++) ov[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(vt + 16 * i), ov[i]);
        }
        for (int i = 0; i < nv; i++) _mm512_storeu_ps(o + 16 * i, ov[i]);
        return;
    }
#endif
    for (int t = 0; t < T; t++) {
        const float* kt = kb + (size_t)t * stride;
        float score = 0.0f;
#pragma omp simd reduction(+ : score)
        for (int i = 0; i < dh; i++) score += q[i] * kt[i];
        att[t] = score / sq;
    }
    softmax(att, T);
    for (int i = 0; i < dh; i++) o[i] = 0.0f;
    for (int t = 0; t < T; t++) {
        const float* vt = vb + (size_t)t * stride;
        const float a = att[t];
#pragma omp simd
        for (int i = 0; i < dh; i++) o[i] += a * vt[i];
    }
}

/* Blocks of 4 output rows: how many blocks d rows make. */
static inline int nblocks(int d) { return (d + 3) / 4; }

/* Static work sharing without OpenMP's worksharing constructs: thread tid of nt takes iterations [lo, hi) of n,
 * and a barrier is only a barrier when there are several threads. */
#define RANGE(n, lo, hi)                                          \
    const int lo = (int)(((long long)(n) * tid) / nt);            \
    const int hi = (int)(((long long)(n) * (tid + 1)) / nt)
#define BARRIER()                            \
    do {                                     \
        if (nt > 1) { _Pragma("omp barrier") } \
    } while (0)

static void forward_rows(const AnetModel* m, int R, const int32_t* tokens, const int32_t* streams,
                         const int32_t* pos, int n_logits, const int32_t* logit_rows, float* logits) {
    const int D = m->dim, F = m->hidden_dim, H = m->n_heads, Hkv = m->n_kv_heads, dh = m->head_dim;
    const int Dq = H * dh, Dkv = Hkv * dh, L = m->n_layers, C = m->cache_len;
    const int kv_mul = H / Hkv, half = dh / 2;
    const int RB = (R + 3) / 4; /* tiles of up to 4 input rows */
    const float sq = sqrtf((float)dh);

#pragma omp parallel num_threads(m->n_threads) if (m->n_threads > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        float* att = m->att + (size_t)tid * C;
        float t1[16] = {0}, t3[16] = {0};
        {
            RANGE(R, lo, hi);
            for (int r = lo; r < hi; r++) embed_row(m, tokens[r], m->x + (size_t)r * D);
        }
        BARRIER();

        for (int l = 0; l < L; l++) {
            float* kc = m->key_cache + (size_t)l * m->n_streams * C * Dkv;
            float* vc = m->value_cache + (size_t)l * m->n_streams * C * Dkv;

            /* q, k, v = rmsnorm(x) g_att (Wq | Wk | Wv)^T in blocks of 4 rows of W; RoPE on pairs; k, v to the cache */
            {
                const Inputs in = own_inputs(m, tid, m->x, (size_t)D, D, R, NULL, m->rms_att + (size_t)l * D);
                const int bq = nblocks(Dq), bk = nblocks(Dkv), nb = bq + 2 * bk;
                RANGE(nb * RB, lo, hi);
                for (int it = lo; it < hi; it++) {
                    const int b = it / RB, rb = it % RB;
                    const AnetMat* M;
                    int i0, d, kind;
                    if (b < bq) {
                        M = m->wq + l, i0 = 4 * b, d = Dq, kind = 0;
                    } else if (b < bq + bk) {
                        M = m->wk + l, i0 = 4 * (b - bq), d = Dkv, kind = 1;
                    } else {
                        M = m->wv + l, i0 = 4 * (b - bq - bk), d = Dkv, kind = 2;
                    }
                    const int c = d - i0 < 4 ? d - i0 : 4, r0 = 4 * rb, nx = R - r0 < 4 ? R - r0 : 4;
                    tile(m, M, i0, c, D, &in, r0, nx, t1);
                    for (int qq = 0; qq < nx; qq++) {
                        const int r = r0 + qq, p = pos[r];
                        float v[4];
                        for (int k = 0; k < c; k++) v[k] = t1[k * 4 + qq];
                        if (kind < 2) { /* rotate pair (i, i+1) of a head by p * theta^(-2 (i % dh / 2) / dh) */
                            for (int k = 0; k + 1 < c; k += 2) {
                                const int fi = ((i0 + k) % dh) / 2;
                                const float cs = m->rope_cos[(size_t)p * half + fi];
                                const float sn = m->rope_sin[(size_t)p * half + fi];
                                const float v0 = v[k], v1 = v[k + 1];
                                v[k] = v0 * cs - v1 * sn;
                                v[k + 1] = v1 * cs + v0 * sn;
                            }
                        }
                        float* dst = kind == 0   ? m->q + (size_t)r * Dq
                                     : kind == 1 ? kc + ((size_t)streams[r] * C + p) * Dkv
                                                 : vc + ((size_t)streams[r] * C + p) * Dkv;
                        for (int k = 0; k < c; k++) dst[i0 + k] = v[k];
                    }
                }
            }
            BARRIER();

            /* attention of each row's heads over its stream's positions 0..p */
            {
                RANGE(R * H, lo, hi);
                for (int it = lo; it < hi; it++) {
                    const int r = it / H, h = it % H;
                    const size_t kv = (size_t)streams[r] * C * Dkv + (size_t)(h / kv_mul) * dh;
                    attend(m->q + (size_t)r * Dq + h * dh, kc + kv, vc + kv, (size_t)Dkv, pos[r] + 1, dh, sq, att,
                           m->ob + (size_t)r * Dq + h * dh);
                }
            }
            BARRIER();

            /* x += o Wo^T */
            {
                const Inputs in = own_inputs(m, tid, m->ob, (size_t)Dq, Dq, R, NULL, NULL);
                RANGE(nblocks(D) * RB, lo, hi);
                for (int it = lo; it < hi; it++) {
                    const int b = it / RB, rb = it % RB;
                    const int i0 = 4 * b, c = D - i0 < 4 ? D - i0 : 4, r0 = 4 * rb, nx = R - r0 < 4 ? R - r0 : 4;
                    tile(m, m->wo + l, i0, c, Dq, &in, r0, nx, t1);
                    for (int qq = 0; qq < nx; qq++) {
                        float* x = m->x + (size_t)(r0 + qq) * D + i0;
                        for (int k = 0; k < c; k++) x[k] += t1[k * 4 + qq];
                    }
                }
            }
            BARRIER();

            /* h = silu(xn W1^T) * (xn W3^T) with xn = rmsnorm(x) g_ffn */
            {
                const Inputs in = own_inputs(m, tid, m->x, (size_t)D, D, R, NULL, m->rms_ffn + (size_t)l * D);
                RANGE(nblocks(F) * RB, lo, hi);
                for (int it = lo; it < hi; it++) {
                    const int b = it / RB, rb = it % RB;
                    const int i0 = 4 * b, c = F - i0 < 4 ? F - i0 : 4, r0 = 4 * rb, nx = R - r0 < 4 ? R - r0 : 4;
                    tile(m, m->w1 + l, i0, c, D, &in, r0, nx, t1);
                    tile(m, m->w3 + l, i0, c, D, &in, r0, nx, t3);
                    silu_mul16(t1, t3);
                    for (int qq = 0; qq < nx; qq++) {
                        float* h = m->hb + (size_t)(r0 + qq) * F + i0;
                        for (int k = 0; k < c; k++) h[k] = t1[k * 4 + qq];
                    }
                }
            }
            BARRIER();

            /* x += h W2^T */
            {
                const Inputs in = own_inputs(m, tid, m->hb, (size_t)F, F, R, NULL, NULL);
                RANGE(nblocks(D) * RB, lo, hi);
                for (int it = lo; it < hi; it++) {
                    const int b = it / RB, rb = it % RB;
                    const int i0 = 4 * b, c = D - i0 < 4 ? D - i0 : 4, r0 = 4 * rb, nx = R - r0 < 4 ? R - r0 : 4;
                    tile(m, m->w2 + l, i0, c, F, &in, r0, nx, t1);
                    for (int qq = 0; qq < nx; qq++) {
                        float* x = m->x + (size_t)(r0 + qq) * D + i0;
                        for (int k = 0; k < c; k++) x[k] += t1[k * 4 + qq];
                    }
                }
            }
            BARRIER();
        }

        if (n_logits > 0) { /* the classifier on rmsnorm(x) g_final of the rows asked for */
            const Inputs in = own_inputs(m, tid, m->x, (size_t)D, D, n_logits, logit_rows, m->rms_final);
            const int V = m->vocab_size, JB = (n_logits + 3) / 4;
            RANGE(nblocks(V) * JB, lo, hi);
            for (int it = lo; it < hi; it++) {
                const int b = it / JB, jb = it % JB;
                const int i0 = 4 * b, c = V - i0 < 4 ? V - i0 : 4, j0 = 4 * jb;
                const int nx = n_logits - j0 < 4 ? n_logits - j0 : 4;
                tile(m, &m->cls, i0, c, D, &in, j0, nx, t1);
                for (int qq = 0; qq < nx; qq++)
                    for (int k = 0; k < c; k++) logits[(size_t)(j0 + qq) * V + i0 + k] = t1[k * 4 + qq];
            }
        }
    }
}

/* ---- run.c's sampler, plus top-k -------------------------------------------------------------------------- */

typedef struct {
    float prob;
    int32_t index;
} ProbIndex;

static uint32_t random_u32(uint64_t* state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(uint64_t* state) { return (random_u32(state) >> 8) / 16777216.0f; }

/* Descending probability; equal probabilities in index order (run.c's qsort leaves their order open). */
static int cmp_desc(const void* a, const void* b) {
    const ProbIndex* x = (const ProbIndex*)a;
    const ProbIndex* y = (const ProbIndex*)b;
    if (x->prob > y->prob) return -1;
    if (x->prob < y->prob) return 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* The first index of the largest value (run.c's sample_argmax). */
static int argmax(const float* x, int n) {
    int i = 0;
    float mx = x[0];
#ifdef ANET_AVX512
    if (n >= 16) {
        __m512 m = _mm512_loadu_ps(x);
        for (i = 16; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
        mx = _mm512_reduce_max_ps(m);
    }
#endif
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    for (i = 0; i < n; i++)
        if (x[i] == mx) return i;
    return 0; /* NaNs only */
}

static int sample_mult(const float* p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf) return i;
    }
    return n - 1;
}

static int sample_topp(const float* p, int n, float topp, ProbIndex* pi, float coin) {
    int n0 = 0;
    const float cutoff = n > 1 ? (1.0f - topp) / (float)(n - 1) : 0.0f;
    for (int i = 0; i < n; i++) {
        if (p[i] >= cutoff) {
            pi[n0].index = i;
            pi[n0].prob = p[i];
            n0++;
        }
    }
    if (n0 == 0) return sample_mult(p, n, coin);
    qsort(pi, (size_t)n0, sizeof(ProbIndex), cmp_desc);
    float cum = 0.0f;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cum += pi[i].prob;
        if (cum > topp) {
            last = i;
            break;
        }
    }
    float r = coin * cum;
    float cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += pi[i].prob;
        if (r < cdf) return pi[i].index;
    }
    return pi[last].index;
}

/* "a ranks below b": smaller value, or the same value at a larger index. */
static inline int ranks_below(const ProbIndex* a, const ProbIndex* b) {
    return a->prob < b->prob || (a->prob == b->prob && a->index > b->index);
}

static void heap_down(ProbIndex* h, int n, int i) {
    for (;;) {
        int lo = i, a = 2 * i + 1, b = a + 1;
        if (a < n && ranks_below(&h[a], &h[lo])) lo = a;
        if (b < n && ranks_below(&h[b], &h[lo])) lo = b;
        if (lo == i) return;
        ProbIndex t = h[i];
        h[i] = h[lo];
        h[lo] = t;
        i = lo;
    }
}

/* Keep the k largest values of x (equal values: the lower index first), set the others to -inf. */
static void keep_top_k(float* x, int n, int k, ProbIndex* h) {
    for (int i = 0; i < k; i++) {
        h[i].prob = x[i];
        h[i].index = i;
    }
    for (int i = k / 2 - 1; i >= 0; i--) heap_down(h, k, i);
    for (int i = k; i < n; i++) {
        if (x[i] > h[0].prob) { /* a later index never beats an equal value */
            h[0].prob = x[i];
            h[0].index = i;
            heap_down(h, k, 0);
        }
    }
    for (int i = 0; i < k; i++) h[i].prob = x[h[i].index];
    for (int i = 0; i < n; i++) x[i] = -INFINITY;
    for (int i = 0; i < k; i++) x[h[i].index] = h[i].prob;
}

/* The next token for logits x [n] (modified in place), as anetrain.generate.sampling.Sampler.sample. */
static int sample_one(float* x, int n, float temperature, float topp, int topk, uint64_t* rng, ProbIndex* pi) {
    if (temperature == 0.0f) return argmax(x, n);
    for (int i = 0; i < n; i++) x[i] /= temperature;
    if (topk > 0 && topk < n) keep_top_k(x, n, topk, pi);
    softmax(x, n);
    float coin = random_f32(rng);
    if (topp <= 0.0f || topp >= 1.0f) return sample_mult(x, n, coin);
    return sample_topp(x, n, topp, pi, coin);
}

/* ---- entry points ----------------------------------------------------------------------------------------- */

/* Feed R rows (R <= max_rows); logits [n_logits, V] for the rows listed in logit_rows. */
void anet_forward(const AnetModel* m, int R, const int32_t* tokens, const int32_t* streams, const int32_t* pos,
                  int n_logits, const int32_t* logit_rows, float* logits) {
    forward_rows(m, R, tokens, streams, pos, n_logits, logit_rows, logits);
}

/* Sample one token for each of R rows of logits [R, V] (modified), row r with rng[streams[r]]. */
void anet_sample_rows(const AnetModel* m, int R, float* logits, const int32_t* streams, float temperature,
                      float topp, int topk, uint64_t* rng, int32_t* out) {
    const int V = m->vocab_size;
    ProbIndex* sort = (ProbIndex*)m->sort;
    if (R == 1) {
        out[0] = sample_one(logits, V, temperature, topp, topk, rng + streams[0], sort);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(m->n_threads)
    for (int r = 0; r < R; r++)
        out[r] = sample_one(logits + (size_t)r * V, V, temperature, topp, topk, rng + streams[r],
                            sort + (size_t)r * V);
}

/* One decode step: feed tokens[r] of streams[r] at pos[r] for R rows, then replace tokens[r] with the sampled
 * next token. logits [R, V] is workspace. */
void anet_decode(const AnetModel* m, int R, int32_t* tokens, const int32_t* streams, const int32_t* pos,
                 float* logits, float temperature, float topp, int topk, uint64_t* rng, int32_t* rows) {
    for (int r = 0; r < R; r++) rows[r] = r;
    forward_rows(m, R, tokens, streams, pos, R, rows, logits);
    anet_sample_rows(m, R, logits, streams, temperature, topp, topk, rng, tokens);
}

/* Copy positions [0, n_pos) of stream src's cache to stream dst (N continuations of one prompt). */
void anet_copy_stream(const AnetModel* m, int src, int dst, int n_pos) {
    const size_t Dkv = (size_t)m->n_kv_heads * m->head_dim, C = (size_t)m->cache_len;
    for (int l = 0; l < m->n_layers; l++) {
        size_t base = (size_t)l * m->n_streams * C * Dkv;
        memcpy(m->key_cache + base + dst * C * Dkv, m->key_cache + base + src * C * Dkv, n_pos * Dkv * 4);
        memcpy(m->value_cache + base + dst * C * Dkv, m->value_cache + base + src * C * Dkv, n_pos * Dkv * 4);
    }
}

/* out [R, d] = the rows of x [R, n] times M^T in the model's weight type, the inputs prepared as in a forward
 * pass (for tests of the kernels). R <= max_rows, n <= max(D, Dq, F). */
void anet_linear(const AnetModel* m, const AnetMat* M, int d, int n, int R, const float* x, float* out) {
    const Inputs in = own_inputs(m, 0, x, (size_t)n, n, R, NULL, NULL);
    float t[16] = {0};
    for (int b = 0; b < nblocks(d); b++) {
        for (int r0 = 0; r0 < R; r0 += 4) {
            const int i0 = 4 * b, c = d - i0 < 4 ? d - i0 : 4, nx = R - r0 < 4 ? R - r0 : 4;
            tile(m, M, i0, c, n, &in, r0, nx, t);
            for (int q = 0; q < nx; q++)
                for (int k = 0; k < c; k++) out[(size_t)(r0 + q) * d + i0 + k] = t[k * 4 + q];
        }
    }
}

/* The sampler alone (for tests against run.c's draws): R rows of logits [R, V], rng per row. */
void anet_sample_logits(int R, int V, float* logits, float temperature, float topp, int topk, uint64_t* rng,
                        int32_t* out) {
    ProbIndex* sort = (ProbIndex*)malloc(sizeof(ProbIndex) * (size_t)V);
    for (int r = 0; r < R; r++)
        out[r] = sample_one(logits + (size_t)r * V, V, temperature, topp, topk, rng + r, sort);
    free(sort);
}
