/* patchdb._windows: the exact patch posterior by sliding-window correlations (patchdb/windows.py).
 *
 * fold(isa, queries, images, squared_norms, tasks, shift, normaliser, weighted, best, best_code,
 *      c1, c2, patch_size, group_offset, track_best)
 * folds every (task, lane group, sample) into a running softmax state kept per pixel and lane, with
 * the kernel of instruction set isa (one of isas()), whose vectors hold LANES = vector bytes / item size:
 *   queries (B, C, H + P - 1, W + P - 1): the noisy batch, padded;
 *   images (G, H + P - 1, W + P - 1, C, LANES): training images, padded, LANES images per group;
 *   squared_norms (G, H, W, LANES): ||k||^2 of the patch centred at each pixel (+inf for absent images);
 *   tasks (T, 6) int64: iy0, iy1, ix0, ix1, sy, sx (see _windows_kernel.h);
 *   shift, normaliser, best (B, H, W, LANES), weighted (B, H, W, C, LANES): the state, in the
 *   images' dtype (float32 or float64); best_code (B, H, W, LANES) int32 (float32) or int64
 *   (float64): (group_offset + g) * T + task of each lane's best entry.
 * The state means: normaliser = sum 2^(l - shift), weighted = sum 2^(l - shift) * centre value,
 * best = the largest logit l seen (bits), kept with best_code only when track_best is true.
 * Start from shift = best = -inf, sums 0. The GIL is
 * released while it runs, so several threads may fold disjoint lane groups into their own states.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_buffers.h"
#include "_exp2.h"

#define EXP2_FLOOR (-96.0)   /* weights below 2^-96 of the shift count as 0 */
#define EXP2_CEILING 30.0    /* a logit may exceed its pixel's shift by this many bits before the shift is raised */

struct fold_args {
    Py_ssize_t batch, channels, height, width, patch_size, groups, num_tasks, group_offset;
    int track_best;
    double c1, c2;
    const void *queries, *images, *squared_norms;
    const int64_t *tasks;
    void *shift, *normaliser, *weighted, *best, *best_code, *scratch;
};

/* The kernels, one per instruction set and scalar type (_windows_isa.h includes both types), each
 * compiled for its instruction set so that a vector is one native register. */
#define ISA generic
#define VECTOR_BYTES 16
#include "_windows_isa.h"
#if X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx,fma")
#define ISA avx
#define VECTOR_BYTES 32
#include "_windows_isa.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA avx2
#define VECTOR_BYTES 32
#include "_windows_isa.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,fma")
#define ISA avx512
#define VECTOR_BYTES 64
#include "_windows_isa.h"
#pragma GCC pop_options
#endif

typedef void (*kernel)(const struct fold_args *);

/* The instruction sets, best first. */
static const struct isa {
    const char *name;
    Py_ssize_t vector_bytes;
    kernel fold_float, fold_double;
} ISAS[] = {
#if X86_ISAS
    {"avx512", 64, fold_windows_favx512, fold_windows_davx512},
    {"avx2", 32, fold_windows_favx2, fold_windows_davx2},
    {"avx", 32, fold_windows_favx, fold_windows_davx},
#endif
    {"generic", 16, fold_windows_fgeneric, fold_windows_dgeneric},
};
#define NUM_ISAS ((int)(sizeof(ISAS) / sizeof(ISAS[0])))

/* Whether this processor (and its operating system) runs the instruction set. */
static int supported(const struct isa *isa) {
#if X86_ISAS
    __builtin_cpu_init();
    if (strcmp(isa->name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    if (strcmp(isa->name, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(isa->name, "avx") == 0) return __builtin_cpu_supports("avx") && __builtin_cpu_supports("fma");
#endif
    (void)isa;
    return 1;
}

/* Every task's pixels and partners lie inside the image (so every read stays inside the buffers). */
static int check_tasks(const int64_t *tasks, Py_ssize_t count, Py_ssize_t height, Py_ssize_t width) {
    for (Py_ssize_t t = 0; t < count; t++) {
        const int64_t *r = tasks + 6 * t;
        if (r[0] < 0 || r[1] > height || r[0] >= r[1] || r[2] < 0 || r[3] > width || r[2] >= r[3] ||
            r[0] + r[4] < 0 || r[1] + r[4] > height || r[2] + r[5] < 0 || r[3] + r[5] > width) {
            PyErr_Format(PyExc_ValueError, "task %zd (%lld, %lld, %lld, %lld, shift %lld, %lld) leaves the %zdx%zd image",
                         t, (long long)r[0], (long long)r[1], (long long)r[2], (long long)r[3], (long long)r[4],
                         (long long)r[5], height, width);
            return -1;
        }
    }
    return 0;
}

static PyObject *fold(PyObject *self, PyObject *args) {
    PyObject *objects[9];
    const char *isa_name;
    double c1, c2;
    Py_ssize_t patch_size, group_offset;
    int track_best;
    (void)self;
    if (!PyArg_ParseTuple(args, "sOOOOOOOOOddnnp", &isa_name, &objects[0], &objects[1], &objects[2], &objects[3],
                          &objects[4], &objects[5], &objects[6], &objects[7], &objects[8], &c1, &c2, &patch_size,
                          &group_offset, &track_best))
        return NULL;
    const struct isa *isa = NULL;
    for (int i = 0; i < NUM_ISAS; i++)
        if (strcmp(ISAS[i].name, isa_name) == 0 && supported(&ISAS[i])) isa = &ISAS[i];
    if (isa == NULL) {
        PyErr_Format(PyExc_ValueError, "instruction set '%s' is not compiled in or not supported here (see isas())", isa_name);
        return NULL;
    }
    static const char *names[9] = {"queries", "images", "squared_norms", "tasks", "shift", "normaliser", "weighted",
                                   "best", "best_code"};
    static const int ndims[9] = {4, 5, 4, 2, 4, 4, 5, 4, 4};
    Py_buffer views[9];
    int held = 0;
    PyObject *result = NULL;
    void *scratch = NULL;

    if (PyObject_GetBuffer(objects[0], &views[0], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) return NULL;
    const char *qformat = views[0].format;
    char scalar = qformat[strlen(qformat) - 1];
    PyBuffer_Release(&views[0]);
    if (scalar != 'f' && scalar != 'd') {
        PyErr_SetString(PyExc_ValueError, "queries: expected float32 or float64");
        return NULL;
    }
    const char integer = scalar == 'f' ? 'i' : 'q';
    const size_t itemsize = scalar == 'f' ? sizeof(float) : sizeof(double);
    const Py_ssize_t lanes = isa->vector_bytes / (Py_ssize_t)itemsize;
    for (; held < 9; held++) {
        char format = held == 3 ? 'q' : held == 8 ? integer : scalar;
        if (get_buffer(objects[held], &views[held], names[held], format, ndims[held], held >= 4) < 0) goto done;
    }
    const Py_ssize_t *q = views[0].shape, *im = views[1].shape;
    const Py_ssize_t batch = q[0], channels = q[1], size = patch_size;
    const Py_ssize_t height = q[2] - size + 1, width = q[3] - size + 1, groups = im[0];
    if (size < 1 || size % 2 == 0 || height < 1 || width < 1) {
        PyErr_Format(PyExc_ValueError, "patch size %zd does not fit queries of shape (%zd, %zd, %zd, %zd)", size, q[0], q[1],
                     q[2], q[3]);
        goto done;
    }
    const Py_ssize_t images_shape[5] = {groups, q[2], q[3], channels, lanes};
    const Py_ssize_t norms_shape[4] = {groups, height, width, lanes};
    const Py_ssize_t state_shape[4] = {batch, height, width, lanes};
    const Py_ssize_t weighted_shape[5] = {batch, height, width, channels, lanes};
    if (same_shape(&views[1], names[1], 5, images_shape) < 0 || same_shape(&views[2], names[2], 4, norms_shape) < 0 ||
        views[3].shape[1] != 6 || same_shape(&views[6], names[6], 5, weighted_shape) < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "tasks: expected shape (T, 6)");
        goto done;
    }
    for (int i = 4; i < 9; i++)
        if (i != 6 && same_shape(&views[i], names[i], 4, state_shape) < 0) goto done;
    const Py_ssize_t num_tasks = views[3].shape[0];
    if (check_tasks(views[3].buf, num_tasks, height, width) < 0) goto done;
    if ((group_offset + groups) * num_tasks > (scalar == 'f' ? (Py_ssize_t)INT32_MAX : PY_SSIZE_T_MAX)) {
        PyErr_SetString(PyExc_ValueError, "too many lane groups x tasks for int32 source codes");
        goto done;
    }
    const size_t scratch_vectors = (size_t)q[2] * width + 2 * (size_t)width;
    scratch = malloc(scratch_vectors * (size_t)isa->vector_bytes);
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    struct fold_args fold_args = {batch, channels, height, width, size, groups, num_tasks, group_offset, track_best, c1, c2,
                                  views[0].buf, views[1].buf, views[2].buf, views[3].buf, views[4].buf, views[5].buf,
                                  views[6].buf, views[7].buf, views[8].buf, scratch};
    Py_BEGIN_ALLOW_THREADS
    (scalar == 'f' ? isa->fold_float : isa->fold_double)(&fold_args);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(scratch);
    for (int i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    return result;
}

static PyObject *isas(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *list = PyList_New(0);
    for (int i = 0; list != NULL && i < NUM_ISAS; i++) {
        if (!supported(&ISAS[i])) continue;
        PyObject *item = Py_BuildValue("(sn)", ISAS[i].name, ISAS[i].vector_bytes);
        if (item == NULL || PyList_Append(list, item) < 0) Py_CLEAR(list);
        Py_XDECREF(item);
    }
    return list;
}

static PyMethodDef methods[] = {
    {"fold", fold, METH_VARARGS, "Fold sliding-window logits into a running softmax state (see the module's source)."},
    {"isas", isas, METH_NOARGS, "[(name, vector bytes)] of the instruction sets this processor runs, best first."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_windows", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__windows(void) { return PyModule_Create(&module); }
