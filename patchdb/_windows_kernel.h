/* The sliding-window kernel for one scalar type; included by _windows.c once per type with
 *   SCALAR (float or double), INTEGER (the integer of the same width), SUFFIX (f or d),
 *   ROUND_MAGIC (1.5 * 2^mantissa bits) and its bits ROUND_MAGIC_BITS, EXPONENT_BIAS,
 *   MANTISSA_BITS and EXP2_DEGREE.
 *
 * Notation (patchdb/windows.py has the derivation): a task is a rectangle of query pixels
 * [iy0, iy1) x [ix0, ix1) and a shift (sy, sx): pixel i is paired, in every training image n of a
 * lane group, with the training patch centred at u = i + s. Its logit, in bits, is
 *   l = c1 * <q_i, k_{n,u}> - c2 * ||k_{n,u}||^2,
 * and the inner products of all of the task's pixels come from one product image
 * Z[p] = X[p] * Y_n[p + s] filtered by a P x P box: O(1) per pixel instead of O(P^2).
 */

typedef SCALAR CAT(vec_, SUFFIX) __attribute__((vector_size(LANES * sizeof(SCALAR)), aligned(sizeof(SCALAR))));
typedef INTEGER CAT(ivec_, SUFFIX) __attribute__((vector_size(LANES * sizeof(INTEGER)), aligned(sizeof(INTEGER))));
#define VEC CAT(vec_, SUFFIX)
#define IVEC CAT(ivec_, SUFFIX)
#define INLINE static inline __attribute__((always_inline))

INLINE VEC CAT(select_, SUFFIX)(IVEC mask, VEC yes, VEC no) {
    return (VEC)(((IVEC)yes & mask) | ((IVEC)no & ~mask));
}

INLINE int CAT(any_, SUFFIX)(IVEC mask) {
    INTEGER any = 0;
    for (int lane = 0; lane < LANES; lane++) any |= mask[lane];
    return any != 0;
}

/* 2^t for t in [EXP2_FLOOR, EXP2_CEILING]; exactly 0 where t < EXP2_FLOOR (also for -inf and NaN).
 * t is rounded to the nearest integer n with the magic-number trick; 2^(t - n) is the Taylor
 * polynomial of e^((t - n) ln 2) on [-1/2, 1/2] (relative error below 2e-8 for float, 1e-17 for
 * double) and 2^n is written into the exponent bits. */
INLINE VEC CAT(exp2_, SUFFIX)(VEC t) {
    IVEC kept = t >= (SCALAR)EXP2_FLOOR;
    VEC shifted = t + (SCALAR)ROUND_MAGIC;
    VEC fraction = t - (shifted - (SCALAR)ROUND_MAGIC);
    VEC power = (VEC){0} + (SCALAR)EXP2_TAYLOR[EXP2_DEGREE];
    for (int k = EXP2_DEGREE - 1; k >= 0; k--) power = power * fraction + (SCALAR)EXP2_TAYLOR[k];
    IVEC scale = ((IVEC)shifted - (INTEGER)ROUND_MAGIC_BITS + (INTEGER)EXPONENT_BIAS) << MANTISSA_BITS;
    return (VEC)((IVEC)(power * (VEC)scale) & kept);
}

/* One output row of a task: fold the row's logits into the state of its pixels.
 * sums: inner products (cols); norms: ||k||^2 of the partners (cols); centres: the partners'
 * centre pixels (cols x channels); the state pointers start at the row's first pixel. */
INLINE void CAT(fold_row_, SUFFIX)(
        Py_ssize_t cols, Py_ssize_t channels, SCALAR c1, SCALAR c2, IVEC code, const VEC *restrict sums,
        const VEC *restrict norms, const VEC *restrict centres, VEC *restrict logits, VEC *restrict shift,
        VEC *restrict normaliser, VEC *restrict weighted, VEC *restrict best, IVEC *restrict best_code) {
    IVEC exceeded = (IVEC){0};
    for (Py_ssize_t k = 0; k < cols; k++) {
        VEC logit = c1 * sums[k] - c2 * norms[k];
        IVEC better = logit > best[k];
        best[k] = CAT(select_, SUFFIX)(better, logit, best[k]);
        best_code[k] = (better & code) | (~better & best_code[k]);
        exceeded |= (logit - shift[k]) > (SCALAR)EXP2_CEILING;
        logits[k] = logit;
    }
    if (CAT(any_, SUFFIX)(exceeded)) {
        /* keep every weight below 2^EXP2_CEILING: raise the shift of the lanes that would exceed it
         * (and of pixels seen for the first time, whose shift is -inf), rescaling their sums */
        for (Py_ssize_t k = 0; k < cols; k++) {
            IVEC raise = (logits[k] - shift[k]) > (SCALAR)EXP2_CEILING;
            if (!CAT(any_, SUFFIX)(raise)) continue;
            VEC raised = CAT(select_, SUFFIX)(raise, logits[k], shift[k]);
            VEC factor = CAT(exp2_, SUFFIX)(shift[k] - raised); /* 1 where unchanged, 0 from -inf */
            normaliser[k] *= factor;
            for (Py_ssize_t c = 0; c < channels; c++) weighted[k * channels + c] *= factor;
            shift[k] = raised;
        }
    }
    for (Py_ssize_t k = 0; k < cols; k++) {
        VEC weight = CAT(exp2_, SUFFIX)(logits[k] - shift[k]);
        normaliser[k] += weight;
        for (Py_ssize_t c = 0; c < channels; c++) weighted[k * channels + c] += weight * centres[k * channels + c];
    }
}

/* Row a of a task's box sums: row_sums[k] = sum_{b < size} Z[a][k + b], Z[a][p] = sum_c X[c][a][p] Y[a][p][c]. */
INLINE void CAT(row_sums_, SUFFIX)(
        Py_ssize_t cols, Py_ssize_t size, Py_ssize_t channels, Py_ssize_t plane, const SCALAR *restrict query_row,
        const VEC *restrict image_row, VEC *restrict products, VEC *restrict row_sums) {
    for (Py_ssize_t p = 0; p < cols + size - 1; p++) {
        VEC z = query_row[p] * image_row[p * channels];
        for (Py_ssize_t c = 1; c < channels; c++) z += query_row[c * plane + p] * image_row[p * channels + c];
        products[p] = z;
    }
    VEC running = products[0];
    for (Py_ssize_t p = 1; p < size; p++) running += products[p];
    row_sums[0] = running;
    for (Py_ssize_t k = 1; k < cols; k++) {
        running += products[k + size - 1] - products[k - 1];
        row_sums[k] = running;
    }
}

/* Fold one task against one lane group for one sample. The rows of box sums are made just before
 * the output row that first needs them, so that they are still in the L1 cache when used. */
INLINE void CAT(fold_task_, SUFFIX)(
        const struct fold_args *args, Py_ssize_t channels, const int64_t *rect, IVEC code, const SCALAR *query,
        const VEC *group, const VEC *group_norms, Py_ssize_t state, VEC *restrict scratch) {
    const Py_ssize_t width = args->width, size = args->patch_size, half = size / 2;
    const Py_ssize_t padded_width = width + size - 1, plane = (args->height + size - 1) * padded_width;
    const Py_ssize_t iy0 = rect[0], rows = rect[1] - rect[0], ix0 = rect[2], cols = rect[3] - rect[2];
    const Py_ssize_t sy = rect[4], sx = rect[5];
    VEC *products = scratch, *sums = products + padded_width, *logits = sums + width, *row_sums = logits + width;
    VEC *shift = args->shift, *normaliser = args->normaliser, *weighted = args->weighted, *best = args->best;
    IVEC *best_code = args->best_code;
#define ROW_SUMS(a) CAT(row_sums_, SUFFIX)(cols, size, channels, plane, query + (iy0 + (a)) * padded_width + ix0, \
                                           group + ((iy0 + (a) + sy) * padded_width + ix0 + sx) * channels, products, \
                                           row_sums + (a) * cols)
    for (Py_ssize_t a = 0; a < size; a++) ROW_SUMS(a);
    for (Py_ssize_t k = 0; k < cols; k++) {
        VEC total = row_sums[k];
        for (Py_ssize_t a = 1; a < size; a++) total += row_sums[a * cols + k];
        sums[k] = total;
    }
    for (Py_ssize_t j = 0; j < rows; j++) {
        if (j > 0) {
            ROW_SUMS(j + size - 1);
            const VEC *entering = row_sums + (j + size - 1) * cols, *leaving = row_sums + (j - 1) * cols;
            for (Py_ssize_t k = 0; k < cols; k++) sums[k] += entering[k] - leaving[k];
        }
        const Py_ssize_t pixel = state + (iy0 + j) * width + ix0;
        CAT(fold_row_, SUFFIX)(cols, channels, (SCALAR)args->c1, (SCALAR)args->c2, code, sums,
                               group_norms + (iy0 + j + sy) * width + ix0 + sx,
                               group + ((iy0 + j + sy + half) * padded_width + ix0 + sx + half) * channels, logits,
                               shift + pixel, normaliser + pixel, weighted + pixel * channels, best + pixel,
                               best_code + pixel);
    }
#undef ROW_SUMS
}

/* Fold every task, for every sample and every lane group of images, into the running softmax state. */
static TARGET_CLONES void CAT(fold_windows_, SUFFIX)(const struct fold_args *args) {
    const Py_ssize_t channels = args->channels, size = args->patch_size;
    const Py_ssize_t plane = (args->height + size - 1) * (args->width + size - 1);
    const Py_ssize_t image_block = plane * channels;
    const SCALAR *queries = args->queries;
    const VEC *images = args->images, *squared_norms = args->squared_norms;
    for (Py_ssize_t b = 0; b < args->batch; b++) {
        const SCALAR *query = queries + b * channels * plane;
        const Py_ssize_t state = b * args->height * args->width;
        for (Py_ssize_t g = 0; g < args->groups; g++) {
            const VEC *group = images + g * image_block;
            const VEC *group_norms = squared_norms + g * args->height * args->width;
            for (Py_ssize_t task = 0; task < args->num_tasks; task++) {
                const IVEC code = (IVEC){0} + (INTEGER)((args->group_offset + g) * args->num_tasks + task);
                const int64_t *rect = args->tasks + 6 * task;
                /* constant channel counts let the compiler unroll the channel loops */
                if (channels == 1)
                    CAT(fold_task_, SUFFIX)(args, 1, rect, code, query, group, group_norms, state, args->scratch);
                else if (channels == 3)
                    CAT(fold_task_, SUFFIX)(args, 3, rect, code, query, group, group_norms, state, args->scratch);
                else
                    CAT(fold_task_, SUFFIX)(args, channels, rect, code, query, group, group_norms, state, args->scratch);
            }
        }
    }
}

#undef VEC
#undef IVEC
#undef INLINE
