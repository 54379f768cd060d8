/* Native loops of the fused Kalman filter on CPU (see worldmodel/kalman/native.py, which compiles this file).

   The loops call BLAS/LAPACK through function pointers that the loader takes from the library
   PyTorch itself links (MKL on x86-64 Linux): one call per matrix operation, with none of the
   per-operator dispatch that a Python loop over tensor ops pays (3-5 us per op, more than the
   arithmetic of a 32 x 32 step). All matrices are row-major and contiguous, as torch stores them;
   BLAS is column-major, so a row-major matrix is passed as its transpose (gemm_rm below).

   The file includes itself twice, for float (suffix _f32) and double (_f64). */

#ifndef REAL
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef void (*gemm_fn)(const char *, const char *, const int *, const int *, const int *, const void *,
                        const void *, const int *, const void *, const int *, const void *, void *, const int *);
typedef void (*potrf_fn)(const char *, const int *, void *, const int *, int *);
typedef void (*trsm_fn)(const char *, const char *, const char *, const char *, const int *, const int *,
                        const void *, const void *, const int *, void *, const int *);

static gemm_fn sgemm, dgemm;
static potrf_fn spotrf, dpotrf;
static trsm_fn strsm, dtrsm;

/* The BLAS/LAPACK routines (Fortran interface, 32-bit integers): ?gemm_, ?potrf_, ?trsm_. */
void wm_set_blas(void *sgemm_, void *dgemm_, void *spotrf_, void *dpotrf_, void *strsm_, void *dtrsm_) {
    sgemm = (gemm_fn)sgemm_, dgemm = (gemm_fn)dgemm_;
    spotrf = (potrf_fn)spotrf_, dpotrf = (potrf_fn)dpotrf_;
    strsm = (trsm_fn)strsm_, dtrsm = (trsm_fn)dtrsm_;
}

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

#define REAL float
#define SFX f32
#define GEMM sgemm
#define POTRF spotrf
#define TRSM strsm
#include __FILE__
#undef REAL
#undef SFX
#undef GEMM
#undef POTRF
#undef TRSM

#define REAL double
#define SFX f64
#define GEMM dgemm
#define POTRF dpotrf
#define TRSM dtrsm
#include __FILE__

#else /* the routines for one REAL type */

#define FN(name) CAT(name, SFX)

/* Row-major C (M x N) = alpha op(A) op(B) + beta C, op(A) (M x K); ld*: row strides. */
static void FN(gemm_rm)(char ta, char tb, int M, int N, int K, REAL alpha, const REAL *A, int lda, const REAL *B,
                        int ldb, REAL beta, REAL *C, int ldc) {
    GEMM(&tb, &ta, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc); /* C^T = op(B)^T op(A)^T */
}

/* S (n x n, symmetric) -> its lower Cholesky factor L, S = L L^T, in place, upper part zeroed; LAPACK's
   info (> 0: the leading minor of that order is not positive definite). */
static int FN(cholesky)(REAL *S, int n) {
    int info;
    char uplo = 'U'; /* the column-major upper factor U, S = U^T U, is the row-major lower L = U^T */
    POTRF(&uplo, &n, S, &n, &info);
    for (int i = 0; i < n; i++)
        memset(S + (size_t)i * n + i + 1, 0, sizeof(REAL) * (size_t)(n - i - 1));
    return info;
}

/* Row-major B (c x r) <- L^-1 B (trans 'N') or L^-T B ('T') for a row-major lower L (c x c): in
   column-major terms B^T (r x c) <- B^T L^-T or B^T L^-1, with L's column-major view L^T upper. */
static void FN(solve_lower)(char trans, int c, int r, const REAL *L, REAL *B) {
    char side = 'R', uplo = 'U', diag = 'N';
    REAL one = 1;
    TRSM(&side, &uplo, &trans, &diag, &r, &c, &one, L, &c, B, &r);
}

static void FN(symmetrise)(REAL *P, int n) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++) {
            REAL v = (REAL)0.5 * (P[(size_t)i * n + j] + P[(size_t)j * n + i]);
            P[(size_t)i * n + j] = P[(size_t)j * n + i] = v;
        }
}

/* max |x - y| / max |x| over the entries of `parts` arrays x[i], y[i] of len[i] entries (0 where x is 0). */
static double FN(relative_change)(const REAL *const *x, const REAL *const *y, const size_t *len, int parts) {
    double diff = 0, scale = 0;
    for (int p = 0; p < parts; p++)
        for (size_t i = 0; i < len[p]; i++) {
            double a = fabs((double)x[p][i]), d = fabs((double)x[p][i] - (double)y[p][i]);
            scale = a > scale ? a : scale;
            diff = d > diff ? d : diff;
        }
    return scale > 0 ? diff / scale : 0.0;
}

/* The covariance recursion of the fused filter (kalman._covariance_recursion, standard form), for one
   set of parameters shared by the batch: for t = 0..steps-1

       Pp_t = A P_{t-1} A^T + Q,  S_t = C Pp_t C^T + R = L_t L_t^T,  W = L_t^-1 C Pp_t,
       Pf_t = Pp_t - W^T W,       X_t = L_t^-T W = S_t^-1 C Pp_t,      P_{-1} = P0,

   every covariance symmetrised. Where `observed` (steps bytes; NULL: every step) is 0 the step is a pure
   predict: W = 0, so X_t = 0 and Pf_t = Pp_t (S_t and L_t are still computed). Stops at the steady state
   as kalman._SteadyStop does on L_t (checked every `every` steps while `min_left` steps remain, and only
   at steps t > `first`, the step after the last missing one; `ulps` = 0: never); Pp and Pf (steps x n x n)
   are then filled to the end with the last step. X (m x n),
   S and L (m x m) get one entry per computed step, info one int: 0, the order of the failed minor of
   S_t (1..m), or m + that of Pf_t (Pf_t not positive definite). Returns the number of steps computed
   (the recursion also stops at the first failure), or -1 if out of memory. */
int FN(wm_covariance_recursion)(int n, int m, int steps, const REAL *A, const REAL *Q, const REAL *C, const REAL *R,
                                const REAL *P0, REAL *Pp, REAL *Pf, REAL *X, REAL *S, REAL *L, int *info,
                                const unsigned char *observed, int first, double ulps, int every, int min_left,
                                double eps) {
    size_t nn = (size_t)n * n, mn = (size_t)m * n, mm = (size_t)m * m;
    REAL *AP = malloc(sizeof(REAL) * (nn + 2 * (mn + nn)));
    if (!AP)
        return -1;
    REAL *Ws[2] = {AP + nn, AP + nn + mn}, *Lfs[2] = {AP + nn + 2 * mn, AP + 2 * nn + 2 * mn}; /* this step, last */
    const REAL *P = P0;
    double before = 0, tol = ulps * eps;
    int k = steps;
    for (int t = 0; t < steps; t++) {
        REAL *Ppt = Pp + t * nn, *Pft = Pf + t * nn, *St = S + t * mm, *Lt = L + t * mm, *Xt = X + t * mn;
        REAL *W = Ws[t % 2], *Lf = Lfs[t % 2];
        FN(gemm_rm)('N', 'N', n, n, n, 1, A, n, P, n, 0, AP, n);
        memcpy(Ppt, Q, sizeof(REAL) * nn);
        FN(gemm_rm)('N', 'T', n, n, n, 1, AP, n, A, n, 1, Ppt, n);
        FN(symmetrise)(Ppt, n);
        FN(gemm_rm)('N', 'N', m, n, n, 1, C, n, Ppt, n, 0, W, n); /* U = C Pp */
        memcpy(St, R, sizeof(REAL) * mm);
        FN(gemm_rm)('N', 'T', m, m, n, 1, W, n, C, n, 1, St, m);
        FN(symmetrise)(St, m);
        memcpy(Lt, St, sizeof(REAL) * mm);
        info[t] = FN(cholesky)(Lt, m);
        if (info[t]) {
            k = t + 1;
            break;
        }
        FN(solve_lower)('N', m, n, Lt, W); /* W = L^-1 U */
        if (observed && !observed[t])
            memset(W, 0, sizeof(REAL) * mn);
        memcpy(Pft, Ppt, sizeof(REAL) * nn);
        FN(gemm_rm)('T', 'N', n, n, m, -1, W, n, W, n, 1, Pft, n);
        FN(symmetrise)(Pft, n);
        memcpy(Lf, Pft, sizeof(REAL) * nn);
        int failed = FN(cholesky)(Lf, n);
        memcpy(Xt, W, sizeof(REAL) * mn);
        FN(solve_lower)('T', m, n, Lt, Xt); /* X = L^-T W */
        if (failed) {
            info[t] = m + failed;
            k = t + 1;
            break;
        }
        P = Pft;
        if (ulps > 0 && t > first && (t + 1) % every == 0 && t + 1 + min_left <= steps) {
            /* the joint factor [[L, 0], [W^T, Lf]] of the covariance of (z_t, h_t), as the joint form checks it */
            const REAL *now[3] = {Lt, W, Lf}, *last[3] = {Lt - mm, Ws[(t + 1) % 2], Lfs[(t + 1) % 2]};
            double change = FN(relative_change)(now, last, (size_t[3]){mm, mn, nn}, 3);
            int done = change == 0;
            if (!done && before > 0) {
                double rate = pow(change / before, 1.0 / every);
                done = change <= tol && rate < 1 && change * rate <= tol * (1 - rate);
            }
            before = change;
            if (done) {
                k = t + 1;
                break;
            }
        }
    }
    for (int t = k; t < steps; t++) {
        memcpy(Pp + t * nn, Pp + (k - 1) * nn, sizeof(REAL) * nn);
        memcpy(Pf + t * nn, Pf + (k - 1) * nn, sizeof(REAL) * nn);
    }
    free(AP);
    return k;
}

/* The filtered means of the fused filter (kalman._MeanRecursion) for parameters shared by the batch:

       out_t = F_t out_{t-1} + X_t^T y_t (+ b_t),  F_t = A - X_t^T CA,  out_{-1} = x0,

   for B sequences of T steps: X (k x m x n) the gains up to the steady state (later steps take the last),
   CA (m x n), A (n x n), y (B x T x m), b (B x T x n) or NULL, x0 (B x n). Writes F (k x n x n) and
   out (B x T x n). */
void FN(wm_mean_recursion)(int n, int m, int k, int batch, int steps, const REAL *X, const REAL *A, const REAL *CA,
                           const REAL *y, const REAL *b, const REAL *x0, REAL *F, REAL *out) {
    size_t nn = (size_t)n * n, mn = (size_t)m * n;
    int ldy = steps * m, ldo = steps * n, tail = steps - k;
    for (int j = 0; j < k; j++) {
        memcpy(F + j * nn, A, sizeof(REAL) * nn);
        FN(gemm_rm)('T', 'N', n, n, m, -1, X + j * mn, n, CA, n, 1, F + j * nn, n);
    }
    if (b)
        memcpy(out, b, sizeof(REAL) * (size_t)batch * steps * n);
    REAL beta = b ? 1 : 0;
    for (int t = 0; t < k; t++) /* X_t^T y_t: the steps before the steady state, the batch at once */
        FN(gemm_rm)('N', 'N', batch, n, m, 1, y + (size_t)t * m, ldy, X + t * mn, n, beta, out + (size_t)t * n, ldo);
    for (int s = 0; s < batch && tail > 0; s++) /* after it, each sequence's steps at once */
        FN(gemm_rm)('N', 'N', tail, n, m, 1, y + (size_t)s * ldy + (size_t)k * m, m, X + (k - 1) * mn, n, beta,
                    out + (size_t)s * ldo + (size_t)k * n, n);
    for (int t = 0; t < steps; t++) {
        const REAL *prev = t ? out + (size_t)(t - 1) * n : x0;
        FN(gemm_rm)('N', 'T', batch, n, n, 1, prev, t ? ldo : n, F + (t < k ? t : k - 1) * nn, n, 1,
                    out + (size_t)t * n, ldo);
    }
}

/* The innovation log-likelihood of the fused filter (kalman._InnovationLogLik) for factors shared by the
   batch: with the lower Cholesky factors L (k x m x m) of S_t up to the steady state (later steps take the
   last) and the residuals e (B x T x m), writes the whitened residuals w_t = L_t^-1 e_t (B x T x m) and
   ll_t = log N(e_t; 0, S_t) = -(|w_t|^2 + log|S_t| + m log 2 pi) / 2 (B x T). */
void FN(wm_innovation_loglik)(int m, int k, int batch, int steps, const REAL *L, const REAL *e, REAL *w, REAL *ll) {
    size_t mm = (size_t)m * m;
    int ldw = steps * m, tail = steps - k;
    char side = 'L', uplo = 'U', trans = 'T', diag = 'N';
    REAL one = 1;
    memcpy(w, e, sizeof(REAL) * (size_t)batch * steps * m);
    for (int t = 0; t < k; t++) /* the batch's rows w_t (B x m) <- w_t L_t^-T, as column-major L_t^-1 w_t^T */
        TRSM(&side, &uplo, &trans, &diag, &m, &batch, &one, L + t * mm, &m, w + (size_t)t * m, &ldw);
    for (int s = 0; s < batch && tail > 0; s++) /* after the steady state, each sequence's steps at once */
        TRSM(&side, &uplo, &trans, &diag, &m, &tail, &one, L + (k - 1) * mm, &m, w + (size_t)s * ldw + (size_t)k * m, &m);
    double log_2pi = log(2.0 * 3.14159265358979323846);
    for (int t = 0; t < steps; t++) {
        const REAL *Lt = L + (t < k ? t : k - 1) * mm;
        double log_det = 0;
        for (int i = 0; i < m; i++)
            log_det += 2.0 * log((double)Lt[(size_t)i * m + i]);
        for (int s = 0; s < batch; s++) {
            const REAL *ws = w + (size_t)s * ldw + (size_t)t * m;
            double sq = 0;
            for (int i = 0; i < m; i++)
                sq += (double)ws[i] * ws[i];
            ll[(size_t)s * steps + t] = (REAL)(-0.5 * (sq + log_det + m * log_2pi));
        }
    }
}

/* The adjoint of the mean recursion (kalman._MeanRecursion's reverse pass) for parameters shared by the
   batch: lam_t = g_t + lam_{t+1} F_{t+1} (rows; F_t = F_{k-1} for t >= k), lam_{T-1} = g_{T-1}, for B
   sequences: F (k x n x n), g and lam (B x T x n). */
void FN(wm_adjoint_mean_recursion)(int n, int k, int batch, int steps, const REAL *F, const REAL *g, REAL *lam) {
    size_t nn = (size_t)n * n;
    int ld = steps * n;
    memcpy(lam, g, sizeof(REAL) * (size_t)batch * steps * n);
    for (int t = steps - 2; t >= 0; t--)
        FN(gemm_rm)('N', 'N', batch, n, n, 1, lam + (size_t)(t + 1) * n, ld, F + (t + 1 < k ? t + 1 : k - 1) * nn, n, 1,
                    lam + (size_t)t * n, ld);
}

/* G_j = D_j + N_j G_{j+1} N_j^T for j = L-1 .. 0 from G_L = 0 (the covariance recursion's adjoint, backwards
   in time): N_j = N + j n_stride and D_j = D + j d_stride (strides in entries; 0: one matrix for all
   steps), each n x n. Writes, where not NULL, every G_j to states (L x n x n), sum_j G_j to total and G_0
   to last. Returns -1 if out of memory, else 0. */
int FN(wm_sandwich_recursion)(int n, int steps, const REAL *N, long n_stride, const REAL *D, long d_stride,
                              REAL *states, REAL *total, REAL *last) {
    size_t nn = (size_t)n * n;
    REAL *G = malloc(sizeof(REAL) * 2 * nn);
    if (!G)
        return -1;
    REAL *NG = G + nn;
    if (total)
        memset(total, 0, sizeof(REAL) * nn);
    for (int j = steps - 1; j >= 0; j--) {
        const REAL *Nj = N + j * n_stride;
        if (j < steps - 1)
            FN(gemm_rm)('N', 'N', n, n, n, 1, Nj, n, G, n, 0, NG, n);
        memcpy(G, D + j * d_stride, sizeof(REAL) * nn);
        if (j < steps - 1)
            FN(gemm_rm)('N', 'T', n, n, n, 1, NG, n, Nj, n, 1, G, n);
        if (states)
            memcpy(states + j * nn, G, sizeof(REAL) * nn);
        if (total)
            for (size_t i = 0; i < nn; i++)
                total[i] += G[i];
    }
    if (last)
        memcpy(last, G, sizeof(REAL) * nn);
    free(G);
    return 0;
}

#undef FN
#endif
