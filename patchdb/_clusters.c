/* patchdb._clusters: the top-k backend's exact scores of the clusters each query visits (patchdb/topk.py).
 *
 * fold(patches, starts, squared_norms, log_multiplicity, channels, patch_size, channel_stride, row_stride, offsets,
 *      visit_starts, visit_rows, queries, c1, c2, max_bits, normaliser, weighted, best_bits, best_entry)
 * scores, for every cluster c and every query row r listed in visit_rows[visit_starts[c]:visit_starts[c + 1]],
 * every entry e of offsets[c]:offsets[c + 1], and folds the
 * logits into row r's running softmax (the state of patchdb.engine.SoftmaxAccumulator, in bits):
 *   patches: float32 buffer that holds every entry's patch, entry e's (C, P, P) patch at
 *       patches[starts[e] + ch * channel_stride + dy * row_stride + dx] (an in-memory dictionary's keys,
 *       or the padded training images themselves, so that no patch is copied out of them);
 *   squared_norms (n,) float32: ||k_e||^2; log_multiplicity (n,) float32, in bits, or None (every entry one patch);
 *   queries (Q, C * P * P) float32;
 *   logit in bits: l_e = c1 <q, k_e> - c2 ||k_e||^2 + log_multiplicity[e];
 *   max_bits, normaliser, best_bits (Q,), weighted (Q, C) float32: normaliser = sum 2^(l - max_bits),
 *       weighted likewise times the entry's centre pixel, max_bits the largest l (a row is rescaled when a
 *       block of entries raises it); best_bits the largest l without its multiplicity, best_entry (Q,) int64
 *       the entry that set it (rows whose best did not change keep their value).
 * Weights below 2^WEIGHT_FLOOR_BITS of the row's maximum count as 0 (the engine floors them there).
 * An optional last argument names the instruction set (one of isas(); default the fastest), for tests.
 * The GIL is released while it runs: threads may fold disjoint sets of clusters, each into a state of its own
 * (patchdb.topk merges them).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_buffers.h"
#include "_exp2.h"
#if X86_ISAS
#include <immintrin.h>
#endif

#define ENTRY_BLOCK 48   /* entries scored before their weights are folded: one rescale per block and row (a multiple of every instruction set's WIDE_ENTRIES and NARROW_ENTRIES) */
#define ROW_BLOCK 128    /* rows whose state is held in a contiguous block while a cluster is scored */
#define ROW_ALIGN 16     /* rows are scored in groups of this many (one AVX-512 vector of floats, two AVX2 ones, four SSE ones) */
#define ROW_ENTRIES 8    /* entries scored together against one row by the row products (a divisor of ENTRY_BLOCK) */
#define RUN_ALIGN 16     /* a row's query runs are padded to a multiple of this many floats (the widest vector) */
#define WEIGHT_FLOOR_BITS (-115.0f) /* patchdb.engine.LOG_WEIGHT_FLOOR (-80 nats) in bits */
#define ROUND_MAGIC 12582912.0f     /* 1.5 * 2^23: adding it rounds a float to an integer */


struct fold_args {
    const float *patches, *squared_norms, *log_multiplicity, *queries;
    const int64_t *starts, *offsets, *visit_starts, *visit_rows;
    Py_ssize_t channels, patch_size, channel_stride, row_stride, num_clusters;
    float c1, c2;
    float *max_bits, *normaliser, *weighted, *best_bits;
    int64_t *best_entry;
};

/* Working memory of one call: a block of rows' state (row j of the block in column j) and queries (rows the vectorised
 * dimension: in groups of ROW_ALIGN rows, each group's dimensions one after another, so that a group's queries are read
 * in one sequential stream, which the hardware prefetches, rather than a stride of ROW_BLOCK floats), the queries of the rows beyond its last whole group of ROW_ALIGN row by row (each run of
 * run_length pixels padded with zeros to run_stride), a block of entries' centre pixels and logits, and where a
 * patch's pixels lie. */
struct scratch {
    float *shift, *normaliser, *weighted, *best, *queries, *row_queries, *logits, *centres, *biases;
    int64_t *best_entry;
    Py_ssize_t *runs, *centre_offsets, num_runs, run_length, run_stride;
};

/* Ask for the pixel runs of entries [first, last): patches read in place lie scattered over the images, and asking
 * for a whole block ahead of its use lets the cache misses overlap instead of stalling the inner products. */
static void prefetch_patches(const struct fold_args *a, const struct scratch *s, Py_ssize_t first, Py_ssize_t last) {
    for (Py_ssize_t e = first; e < last; e++)
        for (Py_ssize_t r = 0; r < s->num_runs; r++) {
            __builtin_prefetch(a->patches + a->starts[e] + s->runs[r]);
            __builtin_prefetch(a->patches + a->starts[e] + s->runs[r] + s->run_length - 1);
        }
}

/* score_block, one per instruction set (_clusters_kernel.h), each compiled for it so that its vectors are native
 * registers and its inner products' sums fit in them (GCC keeps wider generic vectors in memory). */
static inline float reduce_add_generic(const float *lanes, int count) {
    float total = 0.0f;
    for (int lane = 0; lane < count; lane++) total += lanes[lane];
    return total;
}
#define ISA generic
#define VECTOR_FLOATS 4
#define WIDE_GROUPS 1
#define WIDE_ENTRIES 1
#define NARROW_ENTRIES 4
#define LOAD_TAIL(pointer, lanes) ({ vector_generic tail_ = {0}; for (Py_ssize_t l_ = 0; l_ < (lanes); l_++) tail_[l_] = (pointer)[l_]; tail_; })
#define REDUCE_ADD(vector) ({ vector_generic sum_ = (vector); reduce_add_generic((const float *)&sum_, 4); })
#define REDUCE_COST 4
#include "_clusters_kernel.h"
#if X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
/* only narrow products, six entries at a time: twelve sums in registers hide the multiply-adds' latency, and each
 * vector of queries loaded from the level-2 cache (where a block of large patches' queries lies) serves six entries */
static inline float reduce_add_avx2(__m256 vector) {
    __m128 half = _mm_add_ps(_mm256_castps256_ps128(vector), _mm256_extractf128_ps(vector, 1));
    half = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}
#define ISA avx2
#define VECTOR_FLOATS 8
#define WIDE_GROUPS 1
#define WIDE_ENTRIES 1
#define NARROW_ENTRIES 6
#define LOAD_TAIL(pointer, lanes) \
    ((vector_avx2)_mm256_maskload_ps((pointer), _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))))
#define REDUCE_ADD(vector) reduce_add_avx2((__m256)(vector))
#define REDUCE_COST 6
#include "_clusters_kernel.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
/* sixteen sums in registers where a cluster has 32 rows or more (eight entries against two groups: ten loads per sixteen
 * multiply-adds), eight otherwise: with four, the multiply-adds' latency bound the products (benchmarks/RESULTS.md) */
#define ISA avx512
#define VECTOR_FLOATS 16
#define WIDE_GROUPS 2
#define WIDE_ENTRIES 8
#define NARROW_ENTRIES 8
#define LOAD_TAIL(pointer, lanes) ((vector_avx512)_mm512_maskz_loadu_ps((__mmask16)((1u << (lanes)) - 1u), (pointer)))
#define REDUCE_ADD(vector) _mm512_reduce_add_ps((__m512)(vector))
#define REDUCE_COST 8
#include "_clusters_kernel.h"
#pragma GCC pop_options
#endif

typedef void (*score_function)(const struct fold_args *, struct scratch *, Py_ssize_t, Py_ssize_t, Py_ssize_t);

/* The instruction sets this processor runs, fastest first, and their score_block. */
struct isa_kernel {
    const char *name;
    score_function score_block;
};

static int supported_isas(struct isa_kernel *out) {
    int count = 0;
#if X86_ISAS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))
        out[count++] = (struct isa_kernel){"avx512", score_block_avx512};
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        out[count++] = (struct isa_kernel){"avx2", score_block_avx2};
#endif
    out[count++] = (struct isa_kernel){"generic", score_block_generic};
    return count;
}

static void fold_clusters(const struct fold_args *a, struct scratch *s, score_function score_block) {
    const Py_ssize_t channels = a->channels, size = a->patch_size, dims = channels * size * size;
    const int contiguous = a->channel_stride == size * size && a->row_stride == size;
    s->num_runs = contiguous ? 1 : channels * size;
    s->run_length = contiguous ? dims : size;
    s->run_stride = (s->run_length + RUN_ALIGN - 1) / RUN_ALIGN * RUN_ALIGN;
    for (Py_ssize_t ch = 0; ch < channels; ch++) {
        for (Py_ssize_t dy = 0; dy < size && !contiguous; dy++) s->runs[ch * size + dy] = ch * a->channel_stride + dy * a->row_stride;
        s->centre_offsets[ch] = ch * a->channel_stride + size / 2 * (a->row_stride + 1);
    }
    s->runs[0] = 0;
    for (Py_ssize_t c = 0; c < a->num_clusters; c++) {
        const int64_t *rows = a->visit_rows + a->visit_starts[c];
        const Py_ssize_t last_row = a->visit_starts[c + 1] - a->visit_starts[c];
        for (Py_ssize_t block = 0; block < last_row; block += ROW_BLOCK) {
            const Py_ssize_t count = last_row - block < ROW_BLOCK ? last_row - block : ROW_BLOCK;
            const Py_ssize_t columns = (count + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN; /* as score_block reads */
            for (Py_ssize_t j = 0; j < columns; j++) {
                const int64_t r = j < count ? rows[block + j] : -1;
                s->shift[j] = r < 0 ? -INFINITY : a->max_bits[r];
                s->normaliser[j] = r < 0 ? 0.0f : a->normaliser[r];
                for (Py_ssize_t ch = 0; ch < channels; ch++) s->weighted[ch * ROW_BLOCK + j] = r < 0 ? 0.0f : a->weighted[r * channels + ch];
                s->best[j] = r < 0 ? -INFINITY : a->best_bits[r];
                s->best_entry[j] = -1;
                for (Py_ssize_t d = 0; d < dims; d++)
                    s->queries[(j / ROW_ALIGN * dims + d) * ROW_ALIGN + j % ROW_ALIGN] = r < 0 ? 0.0f : a->queries[r * dims + d];
            }
            for (Py_ssize_t j = count / ROW_ALIGN * ROW_ALIGN; j < count; j++) { /* for the row products */
                float *runs = s->row_queries + (j % ROW_ALIGN) * s->num_runs * s->run_stride;
                memset(runs, 0, (size_t)(s->num_runs * s->run_stride) * sizeof(float));
                for (Py_ssize_t run = 0; run < s->num_runs; run++)
                    memcpy(runs + run * s->run_stride, a->queries + rows[block + j] * dims + run * s->run_length,
                           (size_t)s->run_length * sizeof(float));
            }
            const int64_t end = a->offsets[c + 1];
            prefetch_patches(a, s, a->offsets[c], a->offsets[c] + ENTRY_BLOCK < end ? a->offsets[c] + ENTRY_BLOCK : end);
            for (int64_t first = a->offsets[c]; first < end; first += ENTRY_BLOCK) {
                const int64_t last = first + ENTRY_BLOCK < end ? first + ENTRY_BLOCK : end;
                prefetch_patches(a, s, last, last + ENTRY_BLOCK < end ? last + ENTRY_BLOCK : end);
                score_block(a, s, first, last, count);
            }
            for (Py_ssize_t j = 0; j < count; j++) {
                const int64_t r = rows[block + j];
                a->max_bits[r] = s->shift[j];
                a->normaliser[r] = s->normaliser[j];
                for (Py_ssize_t ch = 0; ch < channels; ch++) a->weighted[r * channels + ch] = s->weighted[ch * ROW_BLOCK + j];
                a->best_bits[r] = s->best[j];
                if (s->best_entry[j] >= 0) a->best_entry[r] = s->best_entry[j];
            }
        }
    }
}

/* Every visit's row and every cluster's entries lie inside their buffers, and so does the patch of every entry that a
 * visit scores (only those: the others may be millions, checked at every call for nothing). */
static int check_layout(const struct fold_args *a, Py_ssize_t num_entries, Py_ssize_t num_visits, Py_ssize_t num_rows,
                        Py_ssize_t patches_size) {
    const Py_ssize_t size = a->patch_size;
    if (a->visit_starts[0] != 0 || a->visit_starts[a->num_clusters] != num_visits || a->offsets[0] < 0 ||
        a->offsets[a->num_clusters] > num_entries) {
        PyErr_SetString(PyExc_ValueError, "offsets and visit_starts must span the entries and the visits");
        return -1;
    }
    for (Py_ssize_t c = 0; c < a->num_clusters; c++)
        if (a->offsets[c + 1] < a->offsets[c] || a->visit_starts[c + 1] < a->visit_starts[c]) {
            PyErr_Format(PyExc_ValueError, "cluster %zd: offsets and visit_starts must not decrease", c);
            return -1;
        }
    for (Py_ssize_t v = 0; v < num_visits; v++)
        if (a->visit_rows[v] < 0 || a->visit_rows[v] >= num_rows) {
            PyErr_Format(PyExc_ValueError, "visit %zd: row %lld is not a query row (0..%zd)", v, (long long)a->visit_rows[v],
                         num_rows - 1);
            return -1;
        }
    const Py_ssize_t extent = (a->channels - 1) * a->channel_stride + (size - 1) * a->row_stride + size;
    for (Py_ssize_t c = 0; c < a->num_clusters; c++)
        for (int64_t e = a->visit_starts[c + 1] > a->visit_starts[c] ? a->offsets[c] : a->offsets[c + 1]; e < a->offsets[c + 1]; e++)
            if (a->starts[e] < 0 || a->starts[e] + extent > patches_size) {
                PyErr_Format(PyExc_ValueError, "entry %lld: its patch leaves the patches buffer", (long long)e);
                return -1;
            }
    return 0;
}

static PyObject *fold(PyObject *self, PyObject *args) {
    enum { PATCHES, STARTS, NORMS, MULTIPLICITY, OFFSETS, VISIT_STARTS, VISIT_ROWS, QUERIES, MAX_BITS, NORMALISER, WEIGHTED,
           BEST_BITS, BEST_ENTRY, NUM_BUFFERS };
    PyObject *objects[NUM_BUFFERS];
    Py_ssize_t channels, patch_size, channel_stride, row_stride;
    double c1, c2;
    const char *isa = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOnnnnOOOOddOOOOO|z", &objects[PATCHES], &objects[STARTS], &objects[NORMS],
                          &objects[MULTIPLICITY], &channels, &patch_size, &channel_stride, &row_stride, &objects[OFFSETS],
                          &objects[VISIT_STARTS], &objects[VISIT_ROWS], &objects[QUERIES], &c1, &c2,
                          &objects[MAX_BITS], &objects[NORMALISER], &objects[WEIGHTED], &objects[BEST_BITS], &objects[BEST_ENTRY],
                          &isa))
        return NULL;
    struct isa_kernel kernels[3];
    const int num_kernels = supported_isas(kernels);
    int chosen = 0;  /* the fastest, unless isa names another */
    while (isa != NULL && chosen < num_kernels && strcmp(kernels[chosen].name, isa) != 0) chosen++;
    if (chosen == num_kernels) {
        PyErr_Format(PyExc_ValueError, "instruction set %s is not one this processor runs (see isas())", isa);
        return NULL;
    }
    static const char *names[NUM_BUFFERS] = {"patches", "starts", "squared_norms", "log_multiplicity", "offsets", "visit_starts",
                                             "visit_rows", "queries", "max_bits", "normaliser", "weighted", "best_bits",
                                             "best_entry"};
    static const char formats[NUM_BUFFERS] = {'f', 'q', 'f', 'f', 'q', 'q', 'q', 'f', 'f', 'f', 'f', 'f', 'q'};
    static const int ndims[NUM_BUFFERS] = {1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 2, 1, 1};
    Py_buffer views[NUM_BUFFERS];
    int held = 0;
    PyObject *result = NULL;
    struct scratch s = {0};
    void *memory = NULL;
    const int weighted_entries = objects[MULTIPLICITY] != Py_None;
    views[MULTIPLICITY].buf = NULL;
    for (; held < NUM_BUFFERS; held++) {
        if (held == MULTIPLICITY && !weighted_entries) continue;
        if (get_buffer(objects[held], &views[held], names[held], formats[held], ndims[held], held >= MAX_BITS) < 0) goto done;
    }
    const Py_ssize_t dims = channels * patch_size * patch_size, num_entries = views[STARTS].shape[0];
    const Py_ssize_t num_rows = views[QUERIES].shape[0], num_clusters = views[OFFSETS].shape[0] - 1;
    const Py_ssize_t row_shape[1] = {num_rows}, entry_shape[1] = {num_entries}, weighted_shape[2] = {num_rows, channels};
    if (channels < 1 || patch_size < 1 || patch_size % 2 == 0 || views[QUERIES].shape[1] != dims || num_clusters < 0 ||
        views[VISIT_STARTS].shape[0] != num_clusters + 1) {
        PyErr_SetString(PyExc_ValueError, "queries must be (Q, C * P * P) for odd P, and visit_starts like offsets");
        goto done;
    }
    if (same_shape(&views[NORMS], names[NORMS], 1, entry_shape) < 0 ||
        (weighted_entries && same_shape(&views[MULTIPLICITY], names[MULTIPLICITY], 1, entry_shape) < 0) ||
        same_shape(&views[WEIGHTED], names[WEIGHTED], 2, weighted_shape) < 0)
        goto done;
    for (int i = MAX_BITS; i < NUM_BUFFERS; i++)
        if (i != WEIGHTED && same_shape(&views[i], names[i], 1, row_shape) < 0) goto done;
    struct fold_args a = {views[PATCHES].buf, views[NORMS].buf, weighted_entries ? views[MULTIPLICITY].buf : NULL,
                          views[QUERIES].buf, views[STARTS].buf, views[OFFSETS].buf, views[VISIT_STARTS].buf,
                          views[VISIT_ROWS].buf, channels, patch_size, channel_stride, row_stride, num_clusters,
                          (float)c1, (float)c2, views[MAX_BITS].buf, views[NORMALISER].buf, views[WEIGHTED].buf,
                          views[BEST_BITS].buf, views[BEST_ENTRY].buf};
    if (check_layout(&a, num_entries, views[VISIT_ROWS].shape[0], num_rows, views[PATCHES].shape[0]) < 0) goto done;
    /* the row queries of either patch layout (fold_clusters): one run of all dims, or one of P pixels per channel and row */
    const Py_ssize_t padded = (patch_size + RUN_ALIGN - 1) / RUN_ALIGN * RUN_ALIGN, padded_dims = (dims + RUN_ALIGN - 1) / RUN_ALIGN * RUN_ALIGN;
    const size_t row_query_floats = (size_t)ROW_ALIGN * (size_t)(channels * patch_size * padded > padded_dims ? channels * patch_size * padded : padded_dims);
    const size_t floats = (size_t)ROW_BLOCK * (4 + (size_t)channels + (size_t)dims) + row_query_floats +
                          (size_t)ENTRY_BLOCK * (ROW_BLOCK + (size_t)channels) + ROW_BLOCK;
    memory = malloc((size_t)ROW_BLOCK * sizeof(int64_t) + (size_t)(channels * patch_size + channels) * sizeof(Py_ssize_t) +
                    floats * sizeof(float));
    if (memory == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    s.best_entry = memory;
    s.runs = (Py_ssize_t *)(s.best_entry + ROW_BLOCK);
    s.centre_offsets = s.runs + channels * patch_size;
    s.shift = (float *)(s.centre_offsets + channels);
    s.normaliser = s.shift + ROW_BLOCK;
    s.best = s.normaliser + ROW_BLOCK;
    s.weighted = s.best + ROW_BLOCK;
    s.queries = s.weighted + ROW_BLOCK * channels;
    s.row_queries = s.queries + ROW_BLOCK * dims;
    s.logits = s.row_queries + row_query_floats;
    s.centres = s.logits + ENTRY_BLOCK * ROW_BLOCK;
    s.biases = s.centres + ENTRY_BLOCK * channels;
    const score_function score_block = kernels[chosen].score_block;
    Py_BEGIN_ALLOW_THREADS
    fold_clusters(&a, &s, score_block);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(memory);
    for (int i = 0; i < held; i++)
        if (i != MULTIPLICITY || weighted_entries) PyBuffer_Release(&views[i]);
    return result;
}

/* fill(sources, patch_strides, patch_offset, norm_maps, norm_strides, offsets, clusters, starts, squared_norms,
 *      multiplicity, log_multiplicity): for every entry e of the clusters listed (offsets[c]:offsets[c + 1] for c in
 * clusters), where its patch starts in the images, starts[e] = patch_offset + <sources[e], patch_strides>, its
 * ||k||^2, squared_norms[e] = norm_maps[<sources[e], norm_strides>], and, unless multiplicity is None, the log2 of
 * its multiplicity (the fold's log_multiplicity), log_multiplicity[e] = log2(multiplicity[e]); sources (K, 3) int32,
 * the strides (3,) int64, offsets (C + 1,) and clusters (n,) int64, multiplicity (K,) int32, starts (K,) int64 and
 * squared_norms and log_multiplicity (K,) float32 written in place, the other entries left as they are (log_multiplicity
 * None with multiplicity). One pass, no temporaries: in torch the same took seconds per scale at 60,000 images
 * (mixed-type strided operations, the index arrays, whole arrays in fresh memory). */
/* How far ahead fill asks for an entry's norm: a cluster's entries come from images all over the norm maps (hundreds of
 * MB), so each read misses the caches; asking 16 entries early, the whole dictionary at P = 9 and 60,000 images
 * (33 million entries) filled in 0.54 s instead of 0.75 s on one thread (8 to 64 ahead: 0.54-0.58 s; measured once,
 * by a throwaway script; benchmarks/bench_fill.py times the fill as it is). */
#define FILL_PREFETCH_ENTRIES 16

static PyObject *fill(PyObject *self, PyObject *args) {
    enum { SOURCES, PATCH_STRIDES, NORM_MAPS, NORM_STRIDES, OFFSETS, CLUSTERS, MULTIPLICITY, STARTS, SQUARED_NORMS,
           LOG_MULTIPLICITY, NUM_BUFFERS };
    static const char *names[NUM_BUFFERS] = {"sources", "patch_strides", "norm_maps", "norm_strides", "offsets", "clusters",
                                             "multiplicity", "starts", "squared_norms", "log_multiplicity"};
    static const char formats[NUM_BUFFERS] = {'i', 'q', 'f', 'q', 'q', 'q', 'i', 'q', 'f', 'f'};
    static const int ndims[NUM_BUFFERS] = {2, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    PyObject *objects[NUM_BUFFERS];
    Py_ssize_t patch_offset;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnOOOOOOOO", &objects[SOURCES], &objects[PATCH_STRIDES], &patch_offset, &objects[NORM_MAPS],
                          &objects[NORM_STRIDES], &objects[OFFSETS], &objects[CLUSTERS], &objects[STARTS], &objects[SQUARED_NORMS],
                          &objects[MULTIPLICITY], &objects[LOG_MULTIPLICITY]))
        return NULL;
    const int weighted_entries = objects[MULTIPLICITY] != Py_None;
    if (weighted_entries != (objects[LOG_MULTIPLICITY] != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "give multiplicity and log_multiplicity together, or neither");
        return NULL;
    }
    Py_buffer views[NUM_BUFFERS];
    int held = 0;
    PyObject *result = NULL;
    for (; held < NUM_BUFFERS; held++) {
        if ((held == MULTIPLICITY || held == LOG_MULTIPLICITY) && !weighted_entries) continue;
        if (get_buffer(objects[held], &views[held], names[held], formats[held], ndims[held], held >= STARTS) < 0) goto done;
    }
    const Py_ssize_t num_entries = views[SOURCES].shape[0], num_clusters = views[OFFSETS].shape[0] - 1;
    const Py_ssize_t entry_shape[1] = {num_entries}, three[1] = {3}, two_d[2] = {num_entries, 3};
    if (same_shape(&views[SOURCES], names[SOURCES], 2, two_d) < 0 || same_shape(&views[PATCH_STRIDES], names[PATCH_STRIDES], 1, three) < 0 ||
        same_shape(&views[NORM_STRIDES], names[NORM_STRIDES], 1, three) < 0 ||
        same_shape(&views[STARTS], names[STARTS], 1, entry_shape) < 0 ||
        same_shape(&views[SQUARED_NORMS], names[SQUARED_NORMS], 1, entry_shape) < 0 ||
        (weighted_entries && (same_shape(&views[MULTIPLICITY], names[MULTIPLICITY], 1, entry_shape) < 0 ||
                              same_shape(&views[LOG_MULTIPLICITY], names[LOG_MULTIPLICITY], 1, entry_shape) < 0)))
        goto done;
    const int32_t *sources = views[SOURCES].buf;
    const int64_t *patch_strides = views[PATCH_STRIDES].buf, *norm_strides = views[NORM_STRIDES].buf;
    const int64_t *offsets = views[OFFSETS].buf, *clusters = views[CLUSTERS].buf;
    const float *norm_maps = views[NORM_MAPS].buf;
    int64_t *starts = views[STARTS].buf;
    float *squared_norms = views[SQUARED_NORMS].buf, *log_multiplicity = weighted_entries ? views[LOG_MULTIPLICITY].buf : NULL;
    const int32_t *multiplicity = weighted_entries ? views[MULTIPLICITY].buf : NULL;
    const Py_ssize_t num_listed = views[CLUSTERS].shape[0], map_size = views[NORM_MAPS].shape[0];
    for (Py_ssize_t i = 0; i < num_listed; i++) {
        const int64_t c = clusters[i];
        if (c < 0 || c >= num_clusters || offsets[c] < 0 || offsets[c] > offsets[c + 1] || offsets[c + 1] > num_entries) {
            PyErr_Format(PyExc_ValueError, "cluster %lld is not one of the %zd clusters of the entries", (long long)c, num_clusters);
            goto done;
        }
    }
    int64_t bad_entry = -1;
    const char *problem = NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < num_listed && bad_entry < 0; i++)
        for (int64_t e = offsets[clusters[i]]; e < offsets[clusters[i] + 1]; e++) {
            const int32_t *source = sources + 3 * e;
            const int64_t norm = source[0] * norm_strides[0] + source[1] * norm_strides[1] + source[2] * norm_strides[2];
            if (norm < 0 || norm >= map_size || (multiplicity != NULL && multiplicity[e] < 1)) {
                bad_entry = e;
                problem = norm < 0 || norm >= map_size ? "its source lies outside the norm maps" : "its multiplicity is below 1";
                break;
            }
            if (e + FILL_PREFETCH_ENTRIES < num_entries) {
                const int32_t *ahead = sources + 3 * (e + FILL_PREFETCH_ENTRIES);
                __builtin_prefetch(norm_maps + ahead[0] * norm_strides[0] + ahead[1] * norm_strides[1] + ahead[2] * norm_strides[2]);
            }
            squared_norms[e] = norm_maps[norm];
            starts[e] = patch_offset + source[0] * patch_strides[0] + source[1] * patch_strides[1] + source[2] * patch_strides[2];
            if (multiplicity != NULL) log_multiplicity[e] = log2f((float)multiplicity[e]);
        }
    Py_END_ALLOW_THREADS
    if (bad_entry >= 0) {
        PyErr_Format(PyExc_ValueError, "entry %lld: %s", (long long)bad_entry, problem);
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < held; i++)
        if (weighted_entries || (i != MULTIPLICITY && i != LOG_MULTIPLICITY)) PyBuffer_Release(&views[i]);
    return result;
}

static PyObject *isas(PyObject *self, PyObject *noargs) {
    struct isa_kernel kernels[3];
    const int count = supported_isas(kernels);
    (void)self;
    (void)noargs;
    PyObject *names = PyList_New(count);
    for (int i = 0; names != NULL && i < count; i++) PyList_SET_ITEM(names, i, PyUnicode_FromString(kernels[i].name));
    return names;
}

static PyMethodDef methods[] = {
    {"fold", fold, METH_VARARGS, "Fold the visited clusters' logits into a running softmax state (see the module's source)."},
    {"fill", fill, METH_VARARGS, "Fill the starts and squared norms of the listed clusters' gathered entries (see the module's source)."},
    {"isas", isas, METH_NOARGS, "The instruction sets fold can use on this processor, fastest (its default) first."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_clusters", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__clusters(void) { return PyModule_Create(&module); }
