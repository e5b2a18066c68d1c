/* Checked access to the buffers of the compiled kernels' arguments (_windows.c, _clusters.c), and the macros both
 * use to compile a kernel once per instruction set. */

#ifndef PATCHDB_BUFFERS_H
#define PATCHDB_BUFFERS_H

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* Whether kernels are also compiled for x86's vector instruction sets (GCC's target pragmas), chosen at run time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define X86_ISAS 1
#else
#define X86_ISAS 0
#endif

/* One argument's buffer, checked: C-contiguous, of the expected item format and dimensions. */
static inline int get_buffer(PyObject *object, Py_buffer *view, const char *name, char format, int ndim, int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) < 0) return -1;
    const char *f = view->format;
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    char actual = f[0];
    if (actual == 'l' && view->itemsize == 8) actual = 'q';
    if (actual == 'l' && view->itemsize == 4) actual = 'i';
    if (actual != format || f[1] != '\0' || view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous %d-d array of format '%c', got %d-d '%s'",
                     name, ndim, format, view->ndim, view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline int same_shape(const Py_buffer *view, const char *name, int ndim, const Py_ssize_t *shape) {
    for (int d = 0; d < ndim; d++)
        if (view->shape[d] != shape[d]) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d is %zd, expected %zd", name, d, view->shape[d], shape[d]);
            return -1;
        }
    return 0;
}

#endif
