/* score_block and its inner products for the instruction set ISA (VECTOR_FLOATS floats per native vector; the narrow
 * inner products take NARROW_ENTRIES entries against ROW_ALIGN rows, the wide ones, where WIDE_GROUPS > 1,
 * WIDE_ENTRIES against WIDE_GROUPS groups of ROW_ALIGN rows, the row products one row at a time; LOAD_TAIL(pointer, lanes)
 * loads the first lanes floats at pointer into a vector, zeros in the others, reading no further; REDUCE_ADD(vector)
 * sums its lanes, in about REDUCE_COST instructions); included by _clusters.c once per instruction set, inside
 * that instruction set's target pragma, and undefining its parameters at the end. */

/* One native vector of VECTOR_FLOATS floats; a group of ROW_ALIGN rows is PARTS of them. */
#define VECTOR CAT(vector_, ISA)
#define PARTS (ROW_ALIGN / VECTOR_FLOATS)
typedef float VECTOR __attribute__((vector_size(VECTOR_FLOATS * sizeof(float)), aligned(sizeof(float))));
#define INTEGER_VECTOR CAT(integer_vector_, ISA)
typedef int32_t INTEGER_VECTOR __attribute__((vector_size(VECTOR_FLOATS * sizeof(int32_t)), aligned(sizeof(int32_t))));

/* the weights' 2^t, 0 below WEIGHT_FLOOR_BITS (and for -inf), a native vector at a time: GCC does not vectorise a loop
 * of a scalar version for AVX2 */
#define EXP2 CAT(exp2_, ISA)
DEFINE_EXP2(EXP2, VECTOR, INTEGER_VECTOR, float, int32_t, WEIGHT_FLOOR_BITS, 6, 23, 127, ROUND_MAGIC, 0x4B400000)

/* logits[e * ROW_BLOCK + j] = <query j, patch e> for ENTRIES patches starting at patches[e], whose num_rows runs of
 * size pixels start at the offsets rows[0..num_rows), and the query rows j of [0, GROUPS * ROW_ALIGN) (queries in groups
 * of ROW_ALIGN rows, each group's dimensions one after another, ROW_ALIGN floats each: struct scratch): ENTRIES x GROUPS
 * independent vector sums held in registers, enough of them to hide the latency of the multiply-adds */
#define INNER_PRODUCTS(FUNCTION, ENTRIES, GROUPS)                                                                    \
    static inline void FUNCTION(const float *restrict queries, const float *const *patches,                          \
                                                           const Py_ssize_t *rows, Py_ssize_t num_rows, Py_ssize_t size, \
                                                           float *restrict logits) {                                 \
        VECTOR sums[ENTRIES][GROUPS * PARTS];                                                                         \
        const Py_ssize_t group_floats = num_rows * size * ROW_ALIGN;                                                  \
        for (int e = 0; e < ENTRIES; e++)                                                                             \
            for (int g = 0; g < GROUPS * PARTS; g++) sums[e][g] = (VECTOR){0};                                        \
        for (Py_ssize_t r = 0; r < num_rows; r++) {                                                                   \
            const float *row[ENTRIES];                                                                                \
            for (int e = 0; e < ENTRIES; e++) row[e] = patches[e] + rows[r];                                          \
            for (Py_ssize_t dx = 0; dx < size; dx++) {                                                                \
                const float *column = queries + (r * size + dx) * ROW_ALIGN;                                          \
                for (int e = 0; e < ENTRIES; e++)                                                                     \
                    for (int g = 0; g < GROUPS * PARTS; g++)                                                          \
                        sums[e][g] += row[e][dx] * *(const VECTOR *)(column + g / PARTS * group_floats                \
                                                                     + g % PARTS * VECTOR_FLOATS);                    \
            }                                                                                                         \
        }                                                                                                             \
        for (int e = 0; e < ENTRIES; e++)                                                                             \
            for (int g = 0; g < GROUPS * PARTS; g++) ((VECTOR *)(logits + e * ROW_BLOCK))[g] = sums[e][g];            \
    }
INNER_PRODUCTS(CAT(narrow_products_, ISA), NARROW_ENTRIES, 1)
INNER_PRODUCTS(CAT(wide_products_, ISA), WIDE_ENTRIES, WIDE_GROUPS)
#undef INNER_PRODUCTS

/* logits[e * ROW_BLOCK + first_row + j] = <query j, patch e> for the ENTRY_BLOCK patches and the rows j < count (the
 * rows of a block beyond its last whole group of ROW_ALIGN), one row at a time, vectorised along each run of a patch's
 * pixels: s->row_queries holds row j's runs at (j * num_runs + run) * s->run_stride, each padded with zeros. With few
 * rows a group of ROW_ALIGN would mostly score padding; here a row costs a patch's vectors and a sum of lanes. */
static inline void CAT(row_products_, ISA)(const struct scratch *s, const float *const *patches, Py_ssize_t entries,
                                           Py_ssize_t first_row, Py_ssize_t count, float *restrict logits) {
    const Py_ssize_t run_vectors = (s->run_length + VECTOR_FLOATS - 1) / VECTOR_FLOATS;
    const Py_ssize_t last = (run_vectors - 1) * VECTOR_FLOATS, tail = s->run_length - last;
    for (Py_ssize_t j = 0; j < count; j++)
        for (Py_ssize_t i = 0; i < entries; i += ROW_ENTRIES) {
            VECTOR sums[ROW_ENTRIES];
            for (int e = 0; e < ROW_ENTRIES; e++) sums[e] = (VECTOR){0};
            for (Py_ssize_t r = 0; r < s->num_runs; r++) {
                const float *query = s->row_queries + (j * s->num_runs + r) * s->run_stride;
                for (Py_ssize_t v = 0; v < last; v += VECTOR_FLOATS) {
                    const VECTOR q = *(const VECTOR *)(query + v);
                    for (int e = 0; e < ROW_ENTRIES; e++) sums[e] += *(const VECTOR *)(patches[i + e] + s->runs[r] + v) * q;
                }
                const VECTOR q = *(const VECTOR *)(query + last);
                for (int e = 0; e < ROW_ENTRIES; e++) sums[e] += LOAD_TAIL(patches[i + e] + s->runs[r] + last, tail) * q;
            }
            for (int e = 0; e < ROW_ENTRIES; e++) logits[(i + e) * ROW_BLOCK + first_row + j] = REDUCE_ADD(sums[e]);
        }
}

/* Score entries [first, last) of a cluster (at most ENTRY_BLOCK) against the block's rows [0, count) and fold
 * their weights into the rows' state; columns up to count rounded up to ROW_ALIGN are computed and ignored.
 * A patch is s->num_rows runs of s->run_length contiguous pixels (one run when the patches are contiguous,
 * else one per row of P pixels) at the offsets s->runs from its start; its centre pixels at s->centre_offsets. */
static void CAT(score_block_, ISA)(const struct fold_args *a, struct scratch *s, Py_ssize_t first, Py_ssize_t last, Py_ssize_t count) {
    const Py_ssize_t channels = a->channels;
    const Py_ssize_t entries = last - first, columns = (count + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
    const float *patch_of[ENTRY_BLOCK];
    for (Py_ssize_t i = 0; i < entries; i++) {
        patch_of[i] = a->patches + a->starts[first + i];
        for (Py_ssize_t ch = 0; ch < channels; ch++) s->centres[i * channels + ch] = patch_of[i][s->centre_offsets[ch]];
    }
    for (Py_ssize_t i = entries; i < ENTRY_BLOCK; i++) patch_of[i] = patch_of[0]; /* scored, never folded */
    /* the rows beyond the last whole group go one at a time where that costs fewer vector instructions than a group
     * (a patch's dimensions times PARTS) */
    const Py_ssize_t grouped = count / ROW_ALIGN * ROW_ALIGN, rest = count - grouped;
    const Py_ssize_t row_cost = s->num_runs * ((s->run_length + VECTOR_FLOATS - 1) / VECTOR_FLOATS) + REDUCE_COST;
    const int by_rows = rest > 0 && rest * row_cost < channels * a->patch_size * a->patch_size * PARTS;
    if (by_rows) {
        CAT(row_products_, ISA)(s, patch_of, entries, grouped, rest, s->logits);
        for (Py_ssize_t i = 0; i < entries; i++)
            for (Py_ssize_t j = count; j < columns; j++) s->logits[i * ROW_BLOCK + j] = 0.0f; /* computed and ignored */
    }
    /* the block's inner products: WIDE_ENTRIES at a time against WIDE_GROUPS x ROW_ALIGN rows, then NARROW_ENTRIES against
     * ROW_ALIGN for the rows left (ENTRY_BLOCK is a multiple of both); entries outside, so that their patches stay in the
     * level-1 cache while the rows' queries stream past them */
    const Py_ssize_t in_groups = by_rows ? grouped : columns;
    const Py_ssize_t dims = s->num_runs * s->run_length; /* a group of ROW_ALIGN queries is dims * ROW_ALIGN floats */
    const Py_ssize_t wide_rows = WIDE_GROUPS > 1 ? in_groups / (WIDE_GROUPS * ROW_ALIGN) * (WIDE_GROUPS * ROW_ALIGN) : 0;
    for (Py_ssize_t i = 0; wide_rows > 0 && i < entries; i += WIDE_ENTRIES)
        for (Py_ssize_t j = 0; j < wide_rows; j += WIDE_GROUPS * ROW_ALIGN)
            CAT(wide_products_, ISA)(s->queries + j * dims, patch_of + i, s->runs, s->num_runs, s->run_length, s->logits + i * ROW_BLOCK + j);
    for (Py_ssize_t i = 0; i < entries; i += NARROW_ENTRIES)
        for (Py_ssize_t j = wide_rows; j < in_groups; j += ROW_ALIGN)
            CAT(narrow_products_, ISA)(s->queries + j * dims, patch_of + i, s->runs, s->num_runs, s->run_length, s->logits + i * ROW_BLOCK + j);
    for (Py_ssize_t i = 0; i < entries; i++) {
        float *logits = s->logits + i * ROW_BLOCK;
        const float multiplicity = a->log_multiplicity == NULL ? 0.0f : a->log_multiplicity[first + i];
        const float bias = -a->c2 * a->squared_norms[first + i];
        const int64_t entry = first + i;
        for (Py_ssize_t j = 0; j < columns; j++) {
            const float logit = a->c1 * logits[j] + bias;
            const int better = logit > s->best[j];
            s->best[j] = better ? logit : s->best[j];
            s->best_entry[j] = better ? entry : s->best_entry[j];
            logits[j] = logit + multiplicity;
        }
    }
    float *block_max = s->biases; /* the row maxima of this block's logits */
    for (Py_ssize_t j = 0; j < columns; j++) block_max[j] = -INFINITY;
    for (Py_ssize_t i = 0; i < entries; i++)
        for (Py_ssize_t j = 0; j < columns; j++) {
            const float logit = s->logits[i * ROW_BLOCK + j];
            block_max[j] = logit > block_max[j] ? logit : block_max[j];
        }
    float *rescale = block_max; /* overwritten in place; columns is a multiple of ROW_ALIGN and so of VECTOR_FLOATS */
    for (Py_ssize_t j = 0; j < columns; j += VECTOR_FLOATS) {
        VECTOR *shift = (VECTOR *)(s->shift + j), *factor = (VECTOR *)(rescale + j);
        const INTEGER_VECTOR higher = *factor > *shift;
        const VECTOR raised = (VECTOR)(((INTEGER_VECTOR)*factor & higher) | ((INTEGER_VECTOR)*shift & ~higher));
        *factor = EXP2(*shift - raised);
        *shift = raised;
        *(VECTOR *)(s->normaliser + j) *= *factor;
    }
    for (Py_ssize_t ch = 0; ch < channels; ch++)
        for (Py_ssize_t j = 0; j < columns; j++) s->weighted[ch * ROW_BLOCK + j] *= rescale[j];
    for (Py_ssize_t i = 0; i < entries; i++) {
        float *weights = s->logits + i * ROW_BLOCK; /* the logits become their weights */
        for (Py_ssize_t j = 0; j < columns; j += VECTOR_FLOATS)
            *(VECTOR *)(weights + j) = EXP2(*(VECTOR *)(weights + j) - *(const VECTOR *)(s->shift + j));
        for (Py_ssize_t j = 0; j < columns; j++) s->normaliser[j] += weights[j];
        for (Py_ssize_t ch = 0; ch < channels; ch++) {
            const float centre = s->centres[i * channels + ch];
            float *weighted = s->weighted + ch * ROW_BLOCK;
            for (Py_ssize_t j = 0; j < columns; j++) weighted[j] += weights[j] * centre;
        }
    }
}

#undef EXP2
#undef INTEGER_VECTOR
#undef VECTOR
#undef PARTS
#undef ISA
#undef VECTOR_FLOATS
#undef WIDE_GROUPS
#undef WIDE_ENTRIES
#undef NARROW_ENTRIES
#undef LOAD_TAIL
#undef REDUCE_ADD
#undef REDUCE_COST
