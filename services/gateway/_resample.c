/* Pillow 13.0's bicubic resize of 8-bit RGB images, pixel for pixel, in loops the compiler vectorises.
 *
 * The model cards resize with Pillow, so the tiles must be Pillow's pixels exactly. Pillow resamples in two passes,
 * each output value a sum of input values times 22-bit fixed-point coefficients, rounded and clipped to 8 bits
 * (src/libImaging/Resample.c). This file computes the same coefficients with the same double arithmetic and the same
 * integer sums; only the loop order differs, which integer addition does not see. Pillow walks one output pixel at a
 * time, three channels, a few taps: nothing for SIMD to work on. Here the vertical pass adds whole input rows into a
 * row of int32 sums, and the horizontal pass does the same on blocks of BLOCK rows turned on their side, so every
 * inner loop is a long run of uint8 x int32 multiply-adds (AVX-512 or AVX2 clones on x86-64, picked at load time).
 *
 * Python API (the GIL is released while it computes, so one image's rows can be split over threads):
 *   horizontal(src, dst, start, stop)   dst[y] = src[y] resized to dst's width, for start <= y < stop
 *   vertical(src, dst, start, stop)     dst[y] for start <= y < stop, of src resized to dst's height
 * src and dst: C-contiguous uint8 buffers shaped (height, width, 3), e.g. numpy arrays.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)
#define CHANNELS 3
#define BLOCK 32 /* rows the horizontal pass turns on their side at once: 96 sums, whole vector registers */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) /* gcc: clones by x86-64 level */
#define SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SIMD_CLONES
#endif

/* Written as Pillow writes it, so the compiler evaluates (and contracts, or not) the same expression. */
static double
bicubic_filter(double x) {
#define a -0.5
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
#undef a
}

typedef struct {
    int ksize;      /* taps per output line (the unused ones are 0) */
    int *first;     /* first input line of each output line */
    int *count;     /* input lines used by each output line */
    int32_t *coeff; /* [out_size][ksize] */
} Coeffs;

static void
coeffs_free(Coeffs *c) {
    free(c->first);
    free(c->count);
    free(c->coeff);
}

/* Pillow's precompute_coeffs (box = the whole line, filter = bicubic) followed by normalize_coeffs_8bpc. */
static int
coeffs_init(Coeffs *c, int in_size, int out_size) {
    double scale = (double)((float)in_size - 0.0f) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    double inv_filterscale = 1.0 / filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *w = malloc(sizeof(double) * ksize);

    c->ksize = ksize;
    c->first = malloc(sizeof(int) * out_size);
    c->count = malloc(sizeof(int) * out_size);
    c->coeff = calloc((size_t)out_size * ksize, sizeof(int32_t));
    if (!w || !c->first || !c->count || !c->coeff) {
        free(w);
        coeffs_free(c);
        return -1;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = 0.0f + (xx + 0.5) * scale;
        double ww = 0.0;
        int xmin = (int)(center - support + 0.5);
        int xmax = (int)(center + support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        if (xmax > in_size) {
            xmax = in_size;
        }
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            w[x] = bicubic_filter((x + xmin - center + 0.5) * inv_filterscale);
            ww += w[x];
        }
        for (int x = 0; x < xmax; x++) {
            double k = ww != 0.0 ? w[x] / ww : w[x];
            c->coeff[(size_t)xx * ksize + x] =
                k < 0 ? (int)(-0.5 + k * (1 << PRECISION_BITS)) : (int)(0.5 + k * (1 << PRECISION_BITS));
        }
        c->first[xx] = xmin;
        c->count[xx] = xmax;
    }
    free(w);
    return 0;
}

/* Pillow's clip8: the sum's integer part, clipped to a byte. */
static inline uint8_t
clip8(int32_t sum) {
    int32_t v = sum >> PRECISION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

/* out[i] = the rounded sum over `count` lines from line `first` (each `stride` bytes after the last) of line[i] times
 * its coefficient, for i < n: the loop both passes run, inlined into each (n is a constant in the horizontal one). */
static inline __attribute__((always_inline)) void
weighted_lines(const uint8_t *lines, size_t stride, int first, int count, const int32_t *k, int n, int32_t *sum,
               uint8_t *out) {
    /* int indices: with size_t ones gcc vectorises the horizontal pass's 96-lane loops ~1.4x slower (measured) */
    for (int i = 0; i < n; i++) {
        sum[i] = 1 << (PRECISION_BITS - 1);
    }
    for (int t = 0; t < count; t++) {
        const uint8_t *line = lines + (size_t)(first + t) * stride;
        int32_t kt = k[t];
        for (int i = 0; i < n; i++) {
            sum[i] += line[i] * kt;
        }
    }
    for (int i = 0; i < n; i++) {
        out[i] = clip8(sum[i]);
    }
}

/* Output rows start..stop: each the weighted sum of whole input rows (`width` bytes each). */
SIMD_CLONES static void
vertical_rows(const uint8_t *src, uint8_t *dst, int width, const Coeffs *c, int start, int stop, int32_t *sum) {
    for (int y = start; y < stop; y++) {
        weighted_lines(src, width, c->first[y], c->count[y], c->coeff + (size_t)y * c->ksize, width, sum,
                       dst + (size_t)y * width);
    }
}

/* A pixel copied as 4 bytes when another follows it in the line (its first byte is written again after), else as 3:
 * fixed-size copies that compile to single moves. */
static inline void
copy_pixel(uint8_t *to, const uint8_t *from, int followed) {
    if (followed) {
        memcpy(to, from, 4);
    } else {
        memcpy(to, from, CHANNELS);
    }
}

/* Rows start..stop, BLOCK at a time: the block is copied column-major (side[x] = that column's BLOCK pixels), so
 * an output column is a weighted sum of whole columns, as in the vertical pass. */
SIMD_CLONES static void
horizontal_rows(const uint8_t *src, uint8_t *dst, int in_width, int out_width, const Coeffs *c, int start, int stop,
                uint8_t *side) {
    enum { LANES = BLOCK * CHANNELS };
    for (int y0 = start; y0 < stop; y0 += BLOCK) {
        int rows = stop - y0 < BLOCK ? stop - y0 : BLOCK;
        for (int x = 0; x < in_width; x++) {
            for (int r = 0; r < rows; r++) {
                copy_pixel(side + (size_t)x * LANES + r * CHANNELS, src + ((size_t)(y0 + r) * in_width + x) * CHANNELS,
                           x + 1 < in_width);
            }
        }
        for (int x = 0; x < out_width; x++) {
            int32_t sum[LANES];
            uint8_t pixels[LANES + 1] = {0};
            weighted_lines(side, LANES, c->first[x], c->count[x], c->coeff + (size_t)x * c->ksize, LANES, sum, pixels);
            for (int r = 0; r < rows; r++) {
                copy_pixel(dst + ((size_t)(y0 + r) * out_width + x) * CHANNELS, pixels + r * CHANNELS, x + 1 < out_width);
            }
        }
    }
}

/* A (height, width, 3) C-contiguous uint8 buffer. */
static int
get_image(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        return -1;
    }
    if (view->ndim != 3 || view->shape[2] != CHANNELS || view->itemsize != 1 ||
        (view->format && strcmp(view->format, "B") != 0) || view->shape[0] < 1 || view->shape[1] < 1 ||
        view->shape[0] > INT_MAX / 4 || view->shape[1] > INT_MAX / 4 / CHANNELS) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-empty C-contiguous uint8 array shaped (height, width, 3)",
                     name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *
resample(PyObject *args, int is_vertical) {
    PyObject *src_obj, *dst_obj, *result = NULL;
    Py_buffer src, dst;
    Coeffs c;
    int start, stop;
    if (!PyArg_ParseTuple(args, "OOii", &src_obj, &dst_obj, &start, &stop)) {
        return NULL;
    }
    if (get_image(src_obj, &src, 0, "src") < 0) {
        return NULL;
    }
    if (get_image(dst_obj, &dst, 1, "dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    int in_h = (int)src.shape[0], in_w = (int)src.shape[1], out_h = (int)dst.shape[0], out_w = (int)dst.shape[1];
    if (is_vertical ? in_w != out_w : in_h != out_h) {
        PyErr_SetString(PyExc_ValueError, is_vertical ? "vertical: src and dst must have the same width"
                                                      : "horizontal: src and dst must have the same height");
    } else if (start < 0 || stop > out_h || start > stop) {
        PyErr_Format(PyExc_ValueError, "rows %d..%d are outside dst's %d rows", start, stop, out_h);
    } else if (coeffs_init(&c, is_vertical ? in_h : in_w, is_vertical ? out_h : out_w) < 0) {
        PyErr_NoMemory();
    } else {
        /* the vertical pass's row of sums, or the horizontal pass's block on its side */
        void *scratch = is_vertical ? malloc(sizeof(int32_t) * (size_t)in_w * CHANNELS)
                                    : calloc((size_t)in_w * BLOCK * CHANNELS + 1, 1); /* + copy_pixel's 4th */
        if (!scratch) {
            PyErr_NoMemory();
        } else {
            Py_BEGIN_ALLOW_THREADS;
            if (is_vertical) {
                vertical_rows(src.buf, dst.buf, in_w * CHANNELS, &c, start, stop, scratch);
            } else {
                horizontal_rows(src.buf, dst.buf, in_w, out_w, &c, start, stop, scratch);
            }
            Py_END_ALLOW_THREADS;
            free(scratch);
            result = Py_NewRef(Py_None);
        }
        coeffs_free(&c);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *
horizontal(PyObject *self, PyObject *args) {
    return resample(args, 0);
}

static PyObject *
vertical(PyObject *self, PyObject *args) {
    return resample(args, 1);
}

static PyMethodDef methods[] = {
    {"horizontal", horizontal, METH_VARARGS, "horizontal(src, dst, start, stop): rows start..stop of src resized "
                                             "to dst's width, Pillow's bicubic pass pixel for pixel"},
    {"vertical", vertical, METH_VARARGS, "vertical(src, dst, start, stop): rows start..stop of dst, src resized to "
                                         "dst's height, Pillow's bicubic pass pixel for pixel"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resample", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__resample(void) {
    return PyModule_Create(&module);
}
