/* The sliding-window kernel for one scalar type and instruction set; included by _windows.c once
 * per pair with NAME(x) (x suffixed by both), VECTOR_BYTES (the instruction set's vector width),
 *   SCALAR (float or double), INTEGER (the integer of the same width),
 *   ROUND_MAGIC (1.5 * 2^mantissa bits) and its bits ROUND_MAGIC_BITS, EXPONENT_BIAS,
 *   MANTISSA_BITS and EXP2_DEGREE (the degree of exp2's polynomial), which it undefines at its end.
 * A vector holds one lane per training image of a lane group: VECTOR_BYTES / sizeof(SCALAR) lanes,
 * so that every vector operation is one native instruction (wider generic vectors are lowered
 * badly: GCC 12 splits their comparisons into scalar ones).
 *
 * Notation (patchdb/windows.py has the derivation): a task is a rectangle of query pixels
 * [iy0, iy1) x [ix0, ix1) and a shift (sy, sx): pixel i is paired, in every training image n of a
 * lane group, with the training patch centred at u = i + s. Its logit, in bits, is
 *   l = c1 * <q_i, k_{n,u}> - c2 * ||k_{n,u}||^2,
 * and the inner products of all of the task's pixels come from one product image
 * Z[p] = X[p] * Y_n[p + s] filtered by a P x P box: O(1) per pixel instead of O(P^2).
 */

typedef SCALAR NAME(vec_) __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(SCALAR))));
typedef INTEGER NAME(ivec_) __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(INTEGER))));
#define VEC NAME(vec_)
#define IVEC NAME(ivec_)
#define WIDTH ((int)(VECTOR_BYTES / sizeof(SCALAR)))
#define INLINE static inline __attribute__((always_inline))

INLINE VEC NAME(select_)(IVEC mask, VEC yes, VEC no) {
    return (VEC)(((IVEC)yes & mask) | ((IVEC)no & ~mask));
}

INLINE int NAME(any_)(IVEC mask) {
    INTEGER any = 0;
    for (int lane = 0; lane < WIDTH; lane++) any |= mask[lane];
    return any != 0;
}

/* 2^t for t in [EXP2_FLOOR, EXP2_CEILING]; exactly 0 where t < EXP2_FLOOR (also for -inf and NaN) */
DEFINE_EXP2(NAME(exp2_), VEC, IVEC, SCALAR, INTEGER, EXP2_FLOOR, EXP2_DEGREE, MANTISSA_BITS, EXPONENT_BIAS, ROUND_MAGIC,
            ROUND_MAGIC_BITS)

/* One output row of a task: fold the row's logits into the state of its pixels.
 * sums: inner products (cols), first moved down one row (+ entering - leaving) unless leaving is NULL;
 * norms: ||k||^2 of the partners (cols); centres: the partners' centre pixels (cols x channels);
 * excess: scratch (cols); the state pointers start at the row's first pixel; best and best_code
 * are kept only with track_best. */
INLINE void NAME(fold_row_)(
        const int track_best, Py_ssize_t cols, Py_ssize_t channels, SCALAR c1, SCALAR c2, IVEC code,
        VEC *restrict sums, const VEC *restrict entering, const VEC *restrict leaving, const VEC *restrict norms,
        const VEC *restrict centres, VEC *restrict excess, VEC *restrict shift, VEC *restrict normaliser,
        VEC *restrict weighted, VEC *restrict best, IVEC *restrict best_code) {
    IVEC exceeded = (IVEC){0};
    for (Py_ssize_t k = 0; k < cols; k++) {
        if (leaving != NULL) sums[k] += entering[k] - leaving[k];
        VEC logit = c1 * sums[k] - c2 * norms[k];
        if (track_best) {
            IVEC better = logit > best[k];
            best[k] = NAME(select_)(better, logit, best[k]);
            best_code[k] = (better & code) | (~better & best_code[k]);
        }
        excess[k] = logit - shift[k];
        exceeded |= excess[k] > (SCALAR)EXP2_CEILING;
    }
    if (NAME(any_)(exceeded)) {
        /* keep every weight below 2^EXP2_CEILING: raise the shift of the lanes that would exceed it
         * (and of pixels seen for the first time, whose shift is -inf) to their logit, rescaling their sums */
        for (Py_ssize_t k = 0; k < cols; k++) {
            IVEC raise = excess[k] > (SCALAR)EXP2_CEILING;
            if (!NAME(any_)(raise)) continue;
            VEC raised = NAME(select_)(raise, c1 * sums[k] - c2 * norms[k], shift[k]);
            VEC factor = NAME(exp2_)(shift[k] - raised); /* 1 where unchanged, 0 from -inf */
            normaliser[k] *= factor;
            for (Py_ssize_t c = 0; c < channels; c++) weighted[k * channels + c] *= factor;
            shift[k] = raised;
            excess[k] = NAME(select_)(raise, (VEC){0}, excess[k]);
        }
    }
    for (Py_ssize_t k = 0; k < cols; k++) {
        VEC weight = NAME(exp2_)(excess[k]);
        normaliser[k] += weight;
        for (Py_ssize_t c = 0; c < channels; c++) weighted[k * channels + c] += weight * centres[k * channels + c];
    }
}

/* Z[p] = sum_c X[c][p] Y[p][c] along one row of a task's product image. */
INLINE VEC NAME(product_)(Py_ssize_t p, Py_ssize_t channels, Py_ssize_t plane, const SCALAR *restrict query_row,
                          const VEC *restrict image_row) {
    VEC z = query_row[p] * image_row[p * channels];
    for (Py_ssize_t c = 1; c < channels; c++) z += query_row[c * plane + p] * image_row[p * channels + c];
    return z;
}

/* One row of a task's box sums: row_sums[k] = sum_{b < size} Z[k + b] for k < cols, by a running sum.
 * Each product is made twice (entering and leaving the window), which is faster than storing it. */
INLINE void NAME(row_sums_)(
        Py_ssize_t cols, Py_ssize_t size, Py_ssize_t channels, Py_ssize_t plane, const SCALAR *restrict query_row,
        const VEC *restrict image_row, VEC *restrict row_sums) {
    VEC running = NAME(product_)(0, channels, plane, query_row, image_row);
    for (Py_ssize_t p = 1; p < size; p++) running += NAME(product_)(p, channels, plane, query_row, image_row);
    row_sums[0] = running;
    for (Py_ssize_t k = 1; k < cols; k++) {
        running += NAME(product_)(k + size - 1, channels, plane, query_row, image_row) -
                   NAME(product_)(k - 1, channels, plane, query_row, image_row);
        row_sums[k] = running;
    }
}

/* Fold one task against one lane group for one sample. The rows of box sums are made just before
 * the output row that first needs them, so that they are still in the L1 cache when used. */
INLINE void NAME(fold_task_)(
        const struct fold_args *args, const int track_best, Py_ssize_t channels, const int64_t *rect, IVEC code,
        const SCALAR *query, const VEC *group, const VEC *group_norms, Py_ssize_t state, VEC *restrict scratch) {
    const Py_ssize_t width = args->width, size = args->patch_size, half = size / 2;
    const Py_ssize_t padded_width = width + size - 1, plane = (args->height + size - 1) * padded_width;
    const Py_ssize_t iy0 = rect[0], rows = rect[1] - rect[0], ix0 = rect[2], cols = rect[3] - rect[2];
    const Py_ssize_t sy = rect[4], sx = rect[5];
    VEC *sums = scratch, *excess = sums + width, *row_sums = excess + width;
    VEC *shift = args->shift, *normaliser = args->normaliser, *weighted = args->weighted, *best = args->best;
    IVEC *best_code = args->best_code;
#define ROW_SUMS(a) NAME(row_sums_)(cols, size, channels, plane, query + (iy0 + (a)) * padded_width + ix0, \
                                   group + ((iy0 + (a) + sy) * padded_width + ix0 + sx) * channels, row_sums + (a) * cols)
    for (Py_ssize_t a = 0; a < size; a++) ROW_SUMS(a);
    for (Py_ssize_t k = 0; k < cols; k++) {
        VEC total = row_sums[k];
        for (Py_ssize_t a = 1; a < size; a++) total += row_sums[a * cols + k];
        sums[k] = total;
    }
    for (Py_ssize_t j = 0; j < rows; j++) {
        if (j > 0) ROW_SUMS(j + size - 1);
        const Py_ssize_t pixel = state + (iy0 + j) * width + ix0;
        NAME(fold_row_)(track_best, cols, channels, (SCALAR)args->c1, (SCALAR)args->c2, code, sums,
                        row_sums + (j + size - 1) * cols, j > 0 ? row_sums + (j - 1) * cols : NULL,
                        group_norms + (iy0 + j + sy) * width + ix0 + sx,
                        group + ((iy0 + j + sy + half) * padded_width + ix0 + sx + half) * channels, excess,
                        shift + pixel, normaliser + pixel, weighted + pixel * channels, best + pixel, best_code + pixel);
    }
#undef ROW_SUMS
}

/* Fold every task, for every sample and every lane group of images, into the running softmax state. */
static void NAME(fold_windows_)(const struct fold_args *args) {
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
                /* constants (channels 1 or 3, with or without provenance) let the compiler specialise each case */
#define FOLD_TASK(best, count) NAME(fold_task_)(args, best, count, rect, code, query, group, group_norms, state, args->scratch)
                if (args->track_best) {
                    if (channels == 1) FOLD_TASK(1, 1); else if (channels == 3) FOLD_TASK(1, 3); else FOLD_TASK(1, channels);
                } else {
                    if (channels == 1) FOLD_TASK(0, 1); else if (channels == 3) FOLD_TASK(0, 3); else FOLD_TASK(0, channels);
                }
#undef FOLD_TASK
            }
        }
    }
}

#undef VEC
#undef IVEC
#undef WIDTH
#undef INLINE
#undef SCALAR
#undef INTEGER
#undef SUFFIX
#undef ROUND_MAGIC
#undef ROUND_MAGIC_BITS
#undef EXPONENT_BIAS
#undef MANTISSA_BITS
#undef EXP2_DEGREE
