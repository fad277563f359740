/* Compiled probe loops of the fixed-width managed hash tables (runtime.managed.hash_table, .streaming_table).
 *
 * The numpy version of FixedHashTable.upsert probes every row of a batch in
 * lock step: each probing round is a dozen numpy calls over the rows still
 * looking, and a batch of a few thousand rows per partition needs tens of
 * rounds, so its cost is per call, not per row. This loop takes one row at a
 * time to its slot (find, merge or insert) in a few nanoseconds.
 *
 * upsert_emit is the streaming form (runtime.managed.streaming_table): rows
 * are single records in input order, a key may repeat, and the accumulators
 * after each record's merge are written out, one set per row.
 *
 * Ownership: the caller owns every buffer. The table buffer is a block of
 * managed memory that only the calling table writes; rows are read only;
 * `left` and `out` are the caller's scratch. Nothing here allocates or keeps
 * a reference.
 *
 * Layout (see hash_table.py): the table is `capacity` rows of `width` uint64
 * words, [h, key words..., accumulators...]; h == 0 marks an empty slot; the
 * home slot of a row is h & (capacity - 1), then linear probing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Accumulator codes (one char per accumulator column, see hash_table.FixedHashTable):
 * 'i' int64 add (count, int sum; wraps as numpy does), 'f' float64 add,
 * 'n'/'x' int64 min/max, 'N'/'X' float64 min/max (NaN propagates, as np.minimum); 'r' replace (a
 * changelog's replay: the row holds the accumulator itself). */
static inline void merge_row(uint64_t *dst, const uint64_t *src, const char *codes, Py_ssize_t n_accs) {
    for (Py_ssize_t j = 0; j < n_accs; j++) {
        switch (codes[j]) {
        case 'i':
            dst[j] = dst[j] + src[j];
            break;
        case 'f': {
            double a, b;
            memcpy(&a, &dst[j], 8);
            memcpy(&b, &src[j], 8);
            a += b;
            memcpy(&dst[j], &a, 8);
            break;
        }
        case 'r':
            dst[j] = src[j];
            break;
        case 'n':
            if ((int64_t)src[j] < (int64_t)dst[j]) dst[j] = src[j];
            break;
        case 'x':
            if ((int64_t)src[j] > (int64_t)dst[j]) dst[j] = src[j];
            break;
        case 'N':
        case 'X': {
            double a, b;
            memcpy(&a, &dst[j], 8);
            memcpy(&b, &src[j], 8);
            int keep_a = (a != a) || (codes[j] == 'N' ? a < b : a > b);
            if (!keep_a) memcpy(&dst[j], &b, 8);
            break;
        }
        default:
            break;
        }
    }
}

static int check_buffer(Py_buffer *buf, Py_ssize_t need, const char *what) {
    if (buf->len < need) {
        PyErr_Format(PyExc_ValueError, "%s buffer holds %zd bytes; needs %zd", what, buf->len, need);
        return -1;
    }
    if (((uintptr_t)buf->buf) % 8) {
        PyErr_Format(PyExc_ValueError, "%s buffer must be 8-byte aligned", what);
        return -1;
    }
    return 0;
}

/* The arguments both calls share, checked: the table's shape, one code per accumulator, whole rows. */
static int check_shape(const char *fn, Py_ssize_t capacity, Py_ssize_t width, Py_ssize_t key_words,
                       const Py_buffer *codes, const Py_buffer *rows, Py_ssize_t start) {
    Py_ssize_t n_accs = width - 1 - key_words;
    if (capacity <= 0 || (capacity & (capacity - 1)) || width < 2 || key_words < 0 || n_accs < 1 ||
        codes->len != n_accs || rows->len % (8 * width) || start < 0) {
        PyErr_Format(PyExc_ValueError, "%s: inconsistent table shape, accumulator codes or rows", fn);
        return -1;
    }
    return 0;
}

/* The slot of `row`'s key: the slot holding it, or the first empty slot on its probe path (slot[0] == 0).
 * Rows never have h == 0, so an empty slot never matches. */
static inline uint64_t *probe(uint64_t *T, uint64_t mask, Py_ssize_t width, size_t key_bytes, const uint64_t *row) {
    const uint64_t h = row[0];
    uint64_t pos = h & mask;
    for (;;) {
        uint64_t *slot = T + pos * width;
        const uint64_t cur = slot[0];
        if (cur == 0 || (cur == h && (key_bytes == 0 || memcmp(slot + 1, row + 1, key_bytes) == 0)))
            return slot;
        pos = (pos + 1) & mask;
    }
}

/* upsert(table, capacity, width, key_words, codes, rows, start, room, stop_when_full, left)
 *     -> (next_row, inserted, n_left)
 *
 * Merges rows[start:] (C-contiguous uint64, `width` words each, none with h == 0) into the table:
 * a row whose key is present merges into its slot; a new key is inserted while fewer than `room`
 * were inserted by this call. The first new key past `room` either stops the call (stop_when_full:
 * next_row is its index, so the caller can grow the table and call again from there) or is
 * recorded in `left` (int64 indices; n_left of them) and skipped. Returns next_row == n when done.
 */
static PyObject *upsert(PyObject *self, PyObject *args) {
    Py_buffer table, codes, rows, left;
    Py_ssize_t capacity, width, key_words, start, room;
    int stop_when_full;
    if (!PyArg_ParseTuple(args, "w*nnny*y*nnpw*", &table, &capacity, &width, &key_words, &codes, &rows, &start,
                          &room, &stop_when_full, &left))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n_accs = width - 1 - key_words;
    if (check_shape("upsert", capacity, width, key_words, &codes, &rows, start))
        goto done;
    Py_ssize_t n = rows.len / (8 * width);
    if (check_buffer(&table, capacity * width * 8, "table") || check_buffer(&rows, 0, "rows") ||
        check_buffer(&left, n * 8, "left"))
        goto done;
    uint64_t *T = (uint64_t *)table.buf;
    const uint64_t *R = (const uint64_t *)rows.buf;
    int64_t *L = (int64_t *)left.buf;
    const char *cs = (const char *)codes.buf;
    const uint64_t mask = (uint64_t)capacity - 1;
    const size_t key_bytes = (size_t)key_words * 8;
    Py_ssize_t inserted = 0, n_left = 0, i = start;
    Py_BEGIN_ALLOW_THREADS
    for (; i < n; i++) {
        const uint64_t *row = R + i * width;
        uint64_t *slot = probe(T, mask, width, key_bytes, row);
        if (slot[0] != 0) {
            merge_row(slot + 1 + key_words, row + 1 + key_words, cs, n_accs);
        } else if (inserted < room) {
            memcpy(slot, row, (size_t)width * 8);
            inserted++;
        } else if (stop_when_full) {
            break;
        } else {
            L[n_left++] = i;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nnn", i, inserted, n_left);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&left);
    return result;
}

/* upsert_emit(table, capacity, width, key_words, codes, rows, start, room, out) -> (next_row, inserted)
 *
 * Merges rows[start:] into the table strictly in row order (rows are single records: a key may
 * repeat) and writes each row's accumulators after its merge to out[i * n_accs ...] (uint64 bits).
 * A new key is inserted while fewer than `room` were inserted by this call; the first new key past
 * `room` stops the call with next_row at it (its accumulators not written), so the caller can grow
 * the table and call again from there. Returns next_row == n when done.
 */
static PyObject *upsert_emit(PyObject *self, PyObject *args) {
    Py_buffer table, codes, rows, out;
    Py_ssize_t capacity, width, key_words, start, room;
    if (!PyArg_ParseTuple(args, "w*nnny*y*nnw*", &table, &capacity, &width, &key_words, &codes, &rows, &start,
                          &room, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n_accs = width - 1 - key_words;
    if (check_shape("upsert_emit", capacity, width, key_words, &codes, &rows, start))
        goto done;
    Py_ssize_t n = rows.len / (8 * width);
    if (check_buffer(&table, capacity * width * 8, "table") || check_buffer(&rows, 0, "rows") ||
        check_buffer(&out, n * n_accs * 8, "out"))
        goto done;
    uint64_t *T = (uint64_t *)table.buf;
    const uint64_t *R = (const uint64_t *)rows.buf;
    uint64_t *O = (uint64_t *)out.buf;
    const char *cs = (const char *)codes.buf;
    const uint64_t mask = (uint64_t)capacity - 1;
    const size_t key_bytes = (size_t)key_words * 8;
    const size_t acc_bytes = (size_t)n_accs * 8;
    Py_ssize_t inserted = 0, i = start;
    Py_BEGIN_ALLOW_THREADS
    for (; i < n; i++) {
        const uint64_t *row = R + i * width;
        uint64_t *slot = probe(T, mask, width, key_bytes, row);
        if (slot[0] != 0) {
            merge_row(slot + 1 + key_words, row + 1 + key_words, cs, n_accs);
        } else if (inserted < room) {
            memcpy(slot, row, (size_t)width * 8);
            inserted++;
        } else {
            break;  /* the first new key past room: the caller grows the table and goes on from here */
        }
        memcpy(O + i * n_accs, slot + 1 + key_words, acc_bytes);
    }
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("nn", i, inserted);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&codes);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&out);
    return result;
}

/*
 * pack_rows(table, capacity, width, out) -> rows: copy the occupied rows (first word != 0) of a table of
 * `capacity` rows of `width` words to the start of `out`, in slot order; returns how many. `out` may be the
 * table's own buffer (rows only move towards its start). One pass at memory speed: numpy's boolean
 * indexing made a mask and a gather copy, four times slower.
 */
static PyObject *pack_rows(PyObject *self, PyObject *args) {
    Py_buffer table, out;
    Py_ssize_t capacity, width;
    if (!PyArg_ParseTuple(args, "y*nnw*", &table, &capacity, &width, &out))
        return NULL;
    PyObject *result = NULL;
    if (capacity < 0 || width < 1) {
        PyErr_Format(PyExc_ValueError, "pack_rows: capacity must be >= 0 and width >= 1; got %zd, %zd",
                     capacity, width);
        goto done;
    }
    if (check_buffer(&table, capacity * width * 8, "table"))
        goto done;
    const uint64_t *T = (const uint64_t *)table.buf;
    uint64_t *O = (uint64_t *)out.buf;
    const size_t row_bytes = (size_t)width * 8;
    Py_ssize_t n = 0;
    Py_ssize_t room = out.len / (Py_ssize_t)row_bytes;
    int overflow = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < capacity; i++) {
        const uint64_t *row = T + i * width;
        if (row[0] == 0)
            continue;
        if (n >= room) {
            overflow = 1;
            break;
        }
        if (O + n * width != row)
            memmove(O + n * width, row, row_bytes);
        n++;
    }
    Py_END_ALLOW_THREADS
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "pack_rows: out holds %zd rows; the table has more", room);
        goto done;
    }
    result = PyLong_FromSsize_t(n);
done:
    PyBuffer_Release(&table);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_rows", pack_rows, METH_VARARGS,
     "pack_rows(table, capacity, width, out) -> rows: copy a table's occupied rows to the start of out."},
    {"upsert", upsert, METH_VARARGS,
     "upsert(table, capacity, width, key_words, codes, rows, start, room, stop_when_full, left)"
     " -> (next_row, inserted, n_left): merge or insert rows into a fixed-width hash table."},
    {"upsert_emit", upsert_emit, METH_VARARGS,
     "upsert_emit(table, capacity, width, key_words, codes, rows, start, room, out)"
     " -> (next_row, inserted): merge single records in order, writing each one's accumulators after it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "Compiled probe loops of runtime.managed.hash_table and runtime.managed.streaming_table.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
