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
    /* workspace */
    float* x;        /* [R, D] */
    float* xb;       /* [R, W] with W = max(D, Dq, F) */
    float* q;        /* [R, Dq] */
    float* hb;       /* [R, F] */
    float* att;      /* [n_threads, cache_len] */
    int8_t* aq;      /* [R, W] Q8 inputs */
    float* as;       /* [R, W / group_size] their scales */
    uint16_t* ab;    /* [R, W] BF16 inputs */
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

/* Prepare row r of a matmul input (n values of src) in the weight type's input form. */
static void prepare_row(const AnetModel* m, const float* src, int n, int r) {
    int w = row_width(m);
    if (m->wtype == W_BF16) {
        uint16_t* dst = m->ab + (size_t)r * w;
        for (int i = 0; i < n; i++) dst[i] = to_bf16(src[i]);
    } else if (m->wtype == W_Q8) {
        quantize_row(src, n, m->group_size, m->aq + (size_t)r * w, m->as + (size_t)r * (w / m->group_size));
    }
}

/* ---- dot products of up to 4 rows of W with one input row ------------------------------------------------- */

/* out[k] = W[i0 + k, :] . x for k < c; W is [*, n] float32. */
static void dot_f32(const float* W, int i0, int c, int n, const float* x, float* out) {
#ifdef ANET_AVX512
    if (c == 4) {
        const float* w0 = W + (size_t)i0 * n;
        const float *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        int j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 xv = _mm512_loadu_ps(x + j);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w0 + j), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w1 + j), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w2 + j), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w3 + j), xv, a3);
        }
        if (j < n) {
            __mmask16 mk = (__mmask16)((1u << (n - j)) - 1u);
            __m512 xv = _mm512_maskz_loadu_ps(mk, x + j);
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w0 + j), xv, a0);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w1 + j), xv, a1);
            a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w2 + j), xv, a2);
            a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w3 + j), xv, a3);
        }
        out[0] = _mm512_reduce_add_ps(a0);
        out[1] = _mm512_reduce_add_ps(a1);
        out[2] = _mm512_reduce_add_ps(a2);
        out[3] = _mm512_reduce_add_ps(a3);
        return;
    }
    for (int k = 0; k < c; k++) {
        const float* w = W + (size_t)(i0 + k) * n;
        __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
        int j = 0;
        for (; j + 32 <= n; j += 32) {
            a = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), a);
            b = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), b);
        }
        for (; j < n; j += 16) {
            __mmask16 mk = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
            a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, w + j), _mm512_maskz_loadu_ps(mk, x + j), a);
        }
        out[k] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
    }
#else
    for (int k = 0; k < c; k++) {
        const float* w = W + (size_t)(i0 + k) * n;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < n; j++) acc += w[j] * x[j];
        out[k] = acc;
    }
#endif
}

/* BF16: W [*, n] bfloat16, x n bfloat16; products of bfloat16 values are exact in float32. */
static void dot_bf16(const uint16_t* W, int i0, int c, int n, const uint16_t* x, float* out) {
#ifdef ANET_AVX512_BF16
    if (c == 4) {
        const uint16_t* w0 = W + (size_t)i0 * n;
        const uint16_t *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 32) {
            __mmask32 mk = n - j >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n - j)) - 1u);
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + j);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(mk, w0 + j), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(mk, w1 + j), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(mk, w2 + j), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(mk, w3 + j), xv);
        }
        out[0] = _mm512_reduce_add_ps(a0);
        out[1] = _mm512_reduce_add_ps(a1);
        out[2] = _mm512_reduce_add_ps(a2);
        out[3] = _mm512_reduce_add_ps(a3);
        return;
    }
    for (int k = 0; k < c; k++) {
        const uint16_t* w = W + (size_t)(i0 + k) * n;
        __m512 a = _mm512_setzero_ps();
        for (int j = 0; j < n; j += 32) {
            __mmask32 mk = n - j >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n - j)) - 1u);
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(mk, w + j),
                                 (__m512bh)_mm512_maskz_loadu_epi16(mk, x + j));
        }
        out[k] = _mm512_reduce_add_ps(a);
    }
#else
    for (int k = 0; k < c; k++) {
        const uint16_t* w = W + (size_t)(i0 + k) * n;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < n; j++) acc += from_bf16(w[j]) * from_bf16(x[j]);
        out[k] = acc;
    }
#endif
}

/* Q8: W [*, n] int8 with scales Ws [*, n/gs]; x n int8 with scales xs [n/gs].
 * out[k] = sum_g Ws[i, g] * xs[g] * sum_{j in g} W[i, j] x[j]. */
static void dot_q8_generic(const int8_t* W, const float* Ws, int i0, int c, int n, int gs, const int8_t* x,
                           const float* xs, float* out) {
    int ng = n / gs;
    for (int k = 0; k < c; k++) {
        const int8_t* w = W + (size_t)(i0 + k) * n;
        const float* s = Ws + (size_t)(i0 + k) * ng;
        float acc = 0.0f;
        for (int g = 0; g < ng; g++) {
            int32_t isum = 0;
#pragma omp simd reduction(+ : isum)
            for (int j = 0; j < gs; j++) isum += (int32_t)w[g * gs + j] * (int32_t)x[g * gs + j];
            acc += (float)isum * (s[g] * xs[g]);
        }
        out[k] = acc;
    }
}

#ifdef ANET_AVX512_VNNI
/* vpdpbusd multiplies unsigned by signed bytes: feed |x| and W with x's sign moved onto it (W has no -128). */
#define Q8_SIGNED(w, neg) _mm512_mask_sub_epi8((w), (neg), _mm512_setzero_si512(), (w))

/* Group sizes that are multiples of 64: each group is one or more whole 64-byte chunks. */
static void dot_q8_vnni64(const int8_t* W, const float* Ws, int i0, int c, int n, int gs, const int8_t* x,
                          const float* xs, float* out) {
    int ng = n / gs;
    if (c == 4) {
        const int8_t* w0 = W + (size_t)i0 * n;
        const int8_t *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
        const float* s0 = Ws + (size_t)i0 * ng;
        const float *s1 = s0 + ng, *s2 = s1 + ng, *s3 = s2 + ng;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        for (int g = 0; g < ng; g++) {
            __m512i i0v = _mm512_setzero_si512(), i1v = _mm512_setzero_si512(), i2v = _mm512_setzero_si512(),
                    i3v = _mm512_setzero_si512();
            for (int j = g * gs; j < (g + 1) * gs; j += 64) {
                __m512i xv = _mm512_loadu_si512(x + j);
                __mmask64 neg = _mm512_movepi8_mask(xv);
                __m512i xa = _mm512_abs_epi8(xv);
                i0v = _mm512_dpbusd_epi32(i0v, xa, Q8_SIGNED(_mm512_loadu_si512(w0 + j), neg));
                i1v = _mm512_dpbusd_epi32(i1v, xa, Q8_SIGNED(_mm512_loadu_si512(w1 + j), neg));
                i2v = _mm512_dpbusd_epi32(i2v, xa, Q8_SIGNED(_mm512_loadu_si512(w2 + j), neg));
                i3v = _mm512_dpbusd_epi32(i3v, xa, Q8_SIGNED(_mm512_loadu_si512(w3 + j), neg));
            }
            float sx = xs[g];
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0v), _mm512_set1_ps(s0[g] * sx), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1v), _mm512_set1_ps(s1[g] * sx), a1);
            a2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i2v), _mm512_set1_ps(s2[g] * sx), a2);
            a3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i3v), _mm512_set1_ps(s3[g] * sx), a3);
        }
        out[0] = _mm512_reduce_add_ps(a0);
        out[1] = _mm512_reduce_add_ps(a1);
        out[2] = _mm512_reduce_add_ps(a2);
        out[3] = _mm512_reduce_add_ps(a3);
        return;
    }
    for (int k = 0; k < c; k++) {
        const int8_t* w = W + (size_t)(i0 + k) * n;
        const float* s = Ws + (size_t)(i0 + k) * ng;
        __m512 a = _mm512_setzero_ps();
        for (int g = 0; g < ng; g++) {
            __m512i iv = _mm512_setzero_si512();
            for (int j = g * gs; j < (g + 1) * gs; j += 64) {
                __m512i xv = _mm512_loadu_si512(x + j);
                __mmask64 neg = _mm512_movepi8_mask(xv);
                iv = _mm512_dpbusd_epi32(iv, _mm512_abs_epi8(xv), Q8_SIGNED(_mm512_loadu_si512(w + j), neg));
            }
            a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), _mm512_set1_ps(s[g] * xs[g]), a);
        }
        out[k] = _mm512_reduce_add_ps(a);
    }
}

/* Group size 32: a 64-byte chunk holds two groups (int32 lanes 0-7 and 8-15); a last half chunk is masked. */
static inline __m512 q8_pair_scale(const float* s, const float* xs, int g, int two) {
    __m512d lo = _mm512_castps_pd(_mm512_set1_ps(s[g] * xs[g]));
    __m256d hi = _mm256_castps_pd(_mm256_set1_ps(two ? s[g + 1] * xs[g + 1] : 0.0f));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, hi, 1));
}

static void dot_q8_vnni32(const int8_t* W, const float* Ws, int i0, int c, int n, const int8_t* x,
                          const float* xs, float* out) {
    int ng = n / 32;
    for (int k0 = 0; k0 < c; k0 += 4) {
        int cc = c - k0 < 4 ? c - k0 : 4;
        const int8_t* w[4];
        const float* s[4];
        __m512 a[4];
        for (int k = 0; k < 4; k++) {
            int kk = k < cc ? k : 0;
            w[k] = W + (size_t)(i0 + k0 + kk) * n;
            s[k] = Ws + (size_t)(i0 + k0 + kk) * ng;
            a[k] = _mm512_setzero_ps();
        }
        for (int g = 0; g < ng; g += 2) {
            int two = g + 1 < ng;
            __mmask64 mk = two ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
            int j = g * 32;
            __m512i xv = _mm512_maskz_loadu_epi8(mk, x + j);
            __mmask64 neg = _mm512_movepi8_mask(xv);
            __m512i xa = _mm512_abs_epi8(xv);
            for (int k = 0; k < 4; k++) {
                __m512i iv = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xa,
                                                 Q8_SIGNED(_mm512_maskz_loadu_epi8(mk, w[k] + j), neg));
                a[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv), q8_pair_scale(s[k], xs, g, two), a[k]);
            }
        }
        for (int k = 0; k < cc; k++) out[k0 + k] = _mm512_reduce_add_ps(a[k]);
    }
}
#endif

static void dot_q8(const int8_t* W, const float* Ws, int i0, int c, int n, int gs, const int8_t* x,
                   const float* xs, float* out) {
#ifdef ANET_AVX512_VNNI
    if (gs % 64 == 0) {
        dot_q8_vnni64(W, Ws, i0, c, n, gs, x, xs, out);
        return;
    }
    if (gs == 32) {
        dot_q8_vnni32(W, Ws, i0, c, n, x, xs, out);
        return;
    }
#endif
    dot_q8_generic(W, Ws, i0, c, n, gs, x, xs, out);
}

/* out[k] = M[i0 + k, :] . (input row r), for the prepared input of n values whose float32 form is xf. */
static inline void dot_block(const AnetModel* m, const AnetMat* M, int i0, int c, int n, int r, const float* xf,
                             float* out) {
    int w = row_width(m);
    if (m->wtype == W_F32) {
        dot_f32((const float*)M->w, i0, c, n, xf, out);
    } else if (m->wtype == W_BF16) {
        dot_bf16((const uint16_t*)M->w, i0, c, n, m->ab + (size_t)r * w, out);
    } else {
        int gs = m->group_size;
        dot_q8((const int8_t*)M->w, M->s, i0, c, n, gs, m->aq + (size_t)r * w, m->as + (size_t)r * (w / gs),
               out);
    }
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

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

/* Blocks of 4 output rows: how many blocks d rows make. */
static inline int nblocks(int d) { return (d + 3) / 4; }

static void forward_rows(const AnetModel* m, int R, const int32_t* tokens, const int32_t* streams,
                         const int32_t* pos, int n_logits, const int32_t* logit_rows, float* logits) {
    const int D = m->dim, F = m->hidden_dim, H = m->n_heads, Hkv = m->n_kv_heads, dh = m->head_dim;
    const int Dq = H * dh, Dkv = Hkv * dh, L = m->n_layers, C = m->cache_len, W = row_width(m);
    const int kv_mul = H / Hkv, half = dh / 2;
    const float sq = sqrtf((float)dh);

#pragma omp parallel num_threads(m->n_threads)
    {
        float* att = m->att + (size_t)thread_id() * C;
        float tmp[4];

#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) embed_row(m, tokens[r], m->x + (size_t)r * D);

        for (int l = 0; l < L; l++) {
            float* kc = m->key_cache + (size_t)l * m->n_streams * C * Dkv;
            float* vc = m->value_cache + (size_t)l * m->n_streams * C * Dkv;

            /* attention rmsnorm */
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                rmsnorm(m->xb + (size_t)r * W, m->x + (size_t)r * D, m->rms_att + (size_t)l * D, D, m->norm_eps);
                prepare_row(m, m->xb + (size_t)r * W, D, r);
            }

            /* q, k, v in blocks of 4 rows of Wq | Wk | Wv; RoPE on pairs; k and v straight into the cache */
            {
                const int bq = nblocks(Dq), bk = nblocks(Dkv), nb = bq + 2 * bk;
#pragma omp for schedule(static) collapse(2)
                for (int b = 0; b < nb; b++) {
                    for (int r = 0; r < R; r++) {
                        const AnetMat* M;
                        int i0, d, kind;
                        if (b < bq) {
                            M = m->wq + l, i0 = 4 * b, d = Dq, kind = 0;
                        } else if (b < bq + bk) {
                            M = m->wk + l, i0 = 4 * (b - bq), d = Dkv, kind = 1;
                        } else {
                            M = m->wv + l, i0 = 4 * (b - bq - bk), d = Dkv, kind = 2;
                        }
                        int c = d - i0 < 4 ? d - i0 : 4;
                        dot_block(m, M, i0, c, D, r, m->xb + (size_t)r * W, tmp);
                        int p = pos[r];
                        if (kind < 2) { /* rotate pairs (i, i+1) of a head by p * theta^(-2 (i % dh / 2) / dh) */
                            for (int k = 0; k + 1 < c; k += 2) {
                                int fi = ((i0 + k) % dh) / 2;
                                float cs = m->rope_cos[(size_t)p * half + fi], sn = m->rope_sin[(size_t)p * half + fi];
                                float v0 = tmp[k], v1 = tmp[k + 1];
                                tmp[k] = v0 * cs - v1 * sn;
                                tmp[k + 1] = v1 * cs + v0 * sn;
                            }
                        }
                        float* dst = kind == 0   ? m->q + (size_t)r * Dq
                                     : kind == 1 ? kc + ((size_t)streams[r] * C + p) * Dkv
                                                 : vc + ((size_t)streams[r] * C + p) * Dkv;
                        for (int k = 0; k < c; k++) dst[i0 + k] = tmp[k];
                    }
                }
            }

            /* attention of each row's heads over its stream's positions 0..p */
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < R; r++) {
                for (int h = 0; h < H; h++) {
                    int p = pos[r];
                    const float* qh = m->q + (size_t)r * Dq + h * dh;
                    const float* kb = kc + (size_t)streams[r] * C * Dkv + (h / kv_mul) * dh;
                    const float* vb = vc + (size_t)streams[r] * C * Dkv + (h / kv_mul) * dh;
                    for (int t = 0; t <= p; t++) {
                        const float* kt = kb + (size_t)t * Dkv;
                        float score = 0.0f;
#pragma omp simd reduction(+ : score)
                        for (int i = 0; i < dh; i++) score += qh[i] * kt[i];
                        att[t] = score / sq;
                    }
                    softmax(att, p + 1);
                    float* o = m->xb + (size_t)r * W + h * dh;
                    for (int i = 0; i < dh; i++) o[i] = 0.0f;
                    for (int t = 0; t <= p; t++) {
                        const float* vt = vb + (size_t)t * Dkv;
                        float a = att[t];
#pragma omp simd
                        for (int i = 0; i < dh; i++) o[i] += a * vt[i];
                    }
                }
            }
            if (m->wtype != W_F32) {
#pragma omp for schedule(static)
                for (int r = 0; r < R; r++) prepare_row(m, m->xb + (size_t)r * W, Dq, r);
            }

            /* x += o Wo^T */
#pragma omp for schedule(static) collapse(2)
            for (int b = 0; b < nblocks(D); b++) {
                for (int r = 0; r < R; r++) {
                    int i0 = 4 * b, c = D - i0 < 4 ? D - i0 : 4;
                    dot_block(m, m->wo + l, i0, c, Dq, r, m->xb + (size_t)r * W, tmp);
                    float* x = m->x + (size_t)r * D;
                    for (int k = 0; k < c; k++) x[i0 + k] += tmp[k];
                }
            }

            /* ffn rmsnorm */
#pragma omp for schedule(static)
            for (int r = 0; r < R; r++) {
                rmsnorm(m->xb + (size_t)r * W, m->x + (size_t)r * D, m->rms_ffn + (size_t)l * D, D, m->norm_eps);
                prepare_row(m, m->xb + (size_t)r * W, D, r);
            }

            /* h = silu(xn W1^T) * (xn W3^T) */
#pragma omp for schedule(static) collapse(2)
            for (int b = 0; b < nblocks(F); b++) {
                for (int r = 0; r < R; r++) {
                    int i0 = 4 * b, c = F - i0 < 4 ? F - i0 : 4;
                    float t3[4];
                    dot_block(m, m->w1 + l, i0, c, D, r, m->xb + (size_t)r * W, tmp);
                    dot_block(m, m->w3 + l, i0, c, D, r, m->xb + (size_t)r * W, t3);
                    float* h = m->hb + (size_t)r * F;
                    for (int k = 0; k < c; k++) h[i0 + k] = silu(tmp[k]) * t3[k];
                }
            }
            if (m->wtype != W_F32) {
#pragma omp for schedule(static)
                for (int r = 0; r < R; r++) prepare_row(m, m->hb + (size_t)r * F, F, r);
            }

            /* x += h W2^T */
#pragma omp for schedule(static) collapse(2)
            for (int b = 0; b < nblocks(D); b++) {
                for (int r = 0; r < R; r++) {
                    int i0 = 4 * b, c = D - i0 < 4 ? D - i0 : 4;
                    dot_block(m, m->w2 + l, i0, c, F, r, m->hb + (size_t)r * F, tmp);
                    float* x = m->x + (size_t)r * D;
                    for (int k = 0; k < c; k++) x[i0 + k] += tmp[k];
                }
            }
        }

        if (n_logits > 0) {
            /* final rmsnorm of the asked rows (into their own slots), then the classifier */
#pragma omp for schedule(static)
            for (int j = 0; j < n_logits; j++) {
                int r = logit_rows[j];
                rmsnorm(m->xb + (size_t)r * W, m->x + (size_t)r * D, m->rms_final, D, m->norm_eps);
                prepare_row(m, m->xb + (size_t)r * W, D, r);
            }
            const int V = m->vocab_size;
#pragma omp for schedule(static) collapse(2)
            for (int b = 0; b < nblocks(V); b++) {
                for (int j = 0; j < n_logits; j++) {
                    int r = logit_rows[j], i0 = 4 * b, c = V - i0 < 4 ? V - i0 : 4;
                    dot_block(m, &m->cls, i0, c, D, r, m->xb + (size_t)r * W, tmp);
                    for (int k = 0; k < c; k++) logits[(size_t)j * V + i0 + k] = tmp[k];
                }
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

static int argmax(const float* x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
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
#pragma omp parallel for schedule(static) num_threads(m->n_threads) if (R > 1)
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

/* The sampler alone (for tests against run.c's draws): R rows of logits [R, V], rng per row. */
void anet_sample_logits(int R, int V, float* logits, float temperature, float topp, int topk, uint64_t* rng,
                        int32_t* out) {
    ProbIndex* sort = (ProbIndex*)malloc(sizeof(ProbIndex) * (size_t)V);
    for (int r = 0; r < R; r++)
        out[r] = sample_one(logits + (size_t)r * V, V, temperature, topp, topk, rng + r, sort);
    free(sort);
}
