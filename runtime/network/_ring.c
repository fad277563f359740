/* Single-producer single-consumer descriptor rings in the shared region (runtime.network.ring).
 *
 * One ring serves one local channel in both directions: the producer writes
 * (buffer index, bytes filled) descriptors forward; the consumer writes the
 * indices of buffers it is done with backward and raises a cumulative count
 * of credits granted. Each counter has exactly one writer, so no lock is
 * shared between the processes, and neither side can wedge the other by dying.
 *
 * Ownership: the producer allocates the ring's block in its own arena, zeroes
 * its header (Ring(..., create=True)) before it announces the ring in its
 * hello, and frees it when its channel closes. The consumer attaches to it
 * (create=False) and never frees it. Who writes what:
 *   producer line: fwd_tail, bwd_head, backlog, and the forward entries;
 *   consumer line: fwd_head, bwd_tail, granted, and the backward entries;
 *   parked words: set by their own side, cleared by either side (exchange).
 * A Ring object holds the region's buffer (and its generation table) until
 * close(); every operation first checks that the ring's block still has the
 * generation it had when the Ring was made, and raises RingGone once the
 * producer has freed it.
 *
 * Memory ordering. Entries are written first, then the tail is published with
 * a release store; the other side loads the tail with an acquire load before
 * it reads the entries. The same pair orders the bytes of a buffer (written by
 * numpy before push) before its descriptor. Two processes mapping the same
 * pages are ordered exactly as two threads are: ordering is a property of the
 * CPU's coherent caches, not of virtual addresses, and every word here is
 * naturally aligned and lock-free (checked at import).
 *   x86-64 (TSO): stores become visible in program order and loads are not
 *   reordered with older loads, so release and acquire are plain moves (the
 *   builtins only stop the compiler from reordering). The one reordering x86
 *   does, a load passing an older store still in the store buffer, is what the
 *   park/notify handshake must exclude: it uses a full fence (mfence) on both
 *   sides.
 *   aarch64 (weakly ordered): a release store is `stlr`, an acquire load `ldar`
 *   (or `ldapr`), which order the entries before the tail and the tail before
 *   the reads; the full fence is `dmb ish`.
 * Park/notify (a Dekker pair): the waiter stores parked = 1, fences, and
 * re-reads the tail; the notifier publishes its tail, fences, and reads
 * parked. With both fences, at least one of them sees the other's store: the
 * waiter finds the new entries and does not sleep, or the notifier finds it
 * parked, exchanges the word back to 0 and sends the one wake-up (the exchange
 * makes it exactly one per park).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LINE 128 /* two 64-byte lines: x86's adjacent-line prefetch pairs them; Apple's aarch64 lines are 128 */
#define OFF_MAGIC 0               /* u32 magic, u32 capacity: written once, before the hello */
#define OFF_FWD_TAIL (1 * LINE)   /* producer line */
#define OFF_BWD_HEAD (1 * LINE + 8)
#define OFF_BACKLOG (1 * LINE + 16)
#define OFF_CLOSED (1 * LINE + 24)
#define OFF_FWD_HEAD (2 * LINE)   /* consumer line */
#define OFF_BWD_TAIL (2 * LINE + 8)
#define OFF_GRANTED (2 * LINE + 16)
#define OFF_CPARK (3 * LINE)      /* the consumer parked: set by it, exchanged back by the producer */
#define OFF_PPARK (4 * LINE)      /* the producer parked: set by it, exchanged back by the consumer */
#define OFF_ENTRIES (5 * LINE)    /* capacity x (u32 index, u32 size) forward, then capacity x u32 backward */
#define MAGIC 0x676e6972u          /* "ring" */
#define MAX_CAPACITY (1u << 24)

static PyObject *RingGone;

typedef struct {
    PyObject_HEAD
    Py_buffer region;   /* the region's usable bytes (writable) */
    Py_buffer gens;     /* the region's generation table, uint32 per granule */
    int held;           /* the two buffers are held until close() */
    char *base;         /* the ring's first byte */
    uint64_t cap;       /* a power of two */
    uint32_t *gen;      /* the generation slot of the ring's block */
    uint32_t generation;
    uint32_t num_buffers; /* consumer: a descriptor's index must be below this ... */
    uint32_t buffer_size; /* ... and its size at most this */
} Ring;

#define P64(self, off) ((uint64_t *)((self)->base + (off)))
#define P32(self, off) ((uint32_t *)((self)->base + (off)))
#define FWD(self) ((uint32_t *)((self)->base + OFF_ENTRIES))
#define BWD(self) ((uint32_t *)((self)->base + OFF_ENTRIES + 8 * (self)->cap))

static inline uint64_t load_acquire(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint64_t load_relaxed(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void store_release(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline void full_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static Py_ssize_t ring_bytes(uint64_t cap) { return (Py_ssize_t)(OFF_ENTRIES + 12 * cap); }

static int check(Ring *self) {
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return -1;
    }
    if (__atomic_load_n(self->gen, __ATOMIC_ACQUIRE) != self->generation) {
        PyErr_SetString(RingGone, "the ring's block was freed by its producer");
        return -1;
    }
    return 0;
}

/* Exchange a parked word back to 0 after a fence; 1 if the other side was parked (send one wake-up). */
static inline int take_parked(Ring *self, Py_ssize_t off) {
    full_fence();
    uint32_t *word = P32(self, off);
    if (__atomic_load_n(word, __ATOMIC_RELAXED) == 0) return 0;
    return __atomic_exchange_n(word, 0, __ATOMIC_SEQ_CST) != 0;
}

static void release_buffers(Ring *self) {
    if (self->held) {
        PyBuffer_Release(&self->region);
        PyBuffer_Release(&self->gens);
        self->held = 0;
    }
}

static int Ring_init(Ring *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"region", "generations", "granule", "offset", "capacity", "generation", "create",
                             "num_buffers", "buffer_size", NULL};
    PyObject *region, *gens;
    Py_ssize_t granule, offset, capacity;
    unsigned int generation, num_buffers = 0, buffer_size = 0;
    int create;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOnnnIp|II", kwlist, &region, &gens, &granule, &offset,
                                     &capacity, &generation, &create, &num_buffers, &buffer_size))
        return -1;
    release_buffers(self);
    if (capacity < 2 || capacity > MAX_CAPACITY || (capacity & (capacity - 1))) {
        PyErr_Format(PyExc_ValueError, "ring capacity must be a power of two in [2, %u]; got %zd",
                     MAX_CAPACITY, capacity);
        return -1;
    }
    if (PyObject_GetBuffer(region, &self->region, PyBUF_WRITABLE) < 0) return -1;
    if (PyObject_GetBuffer(gens, &self->gens, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&self->region);
        return -1;
    }
    self->held = 1;
    Py_ssize_t nbytes = ring_bytes((uint64_t)capacity);
    if (offset < 0 || offset % LINE || offset + nbytes > self->region.len) {
        PyErr_Format(PyExc_ValueError, "a ring of %zd bytes at offset %zd does not lie %d-byte aligned in a "
                     "region of %zd bytes", nbytes, offset, LINE, self->region.len);
        release_buffers(self);
        return -1;
    }
    self->base = (char *)self->region.buf + offset;
    self->cap = (uint64_t)capacity;
    self->num_buffers = num_buffers;
    self->buffer_size = buffer_size;
    self->generation = generation;
    /* The generation slot of the block at `offset`: the table has one uint32 per granule. */
    Py_ssize_t slots = self->gens.len / 4;
    if (granule <= 0 || offset % granule || offset / granule >= slots) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not the start of a %zd-byte granule the generation table "
                     "covers", offset, granule);
        release_buffers(self);
        return -1;
    }
    self->gen = (uint32_t *)self->gens.buf + offset / granule;
    if (create) {
        memset(self->base, 0, OFF_ENTRIES);
        *P32(self, OFF_MAGIC + 4) = (uint32_t)capacity;
        __atomic_store_n(P32(self, OFF_MAGIC), MAGIC, __ATOMIC_RELEASE);
    } else {
        if (check(self) < 0) {
            release_buffers(self);
            return -1;
        }
        uint32_t magic = __atomic_load_n(P32(self, OFF_MAGIC), __ATOMIC_ACQUIRE);
        uint32_t cap = *P32(self, OFF_MAGIC + 4);
        if (magic != MAGIC || cap != (uint32_t)capacity) {
            PyErr_Format(PyExc_ValueError, "no ring of capacity %zd at offset %zd (magic %#x, capacity %u)",
                         capacity, offset, magic, cap);
            release_buffers(self);
            return -1;
        }
    }
    return 0;
}

static void Ring_dealloc(Ring *self) {
    release_buffers(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ------------------------------------------------------------------------------------------ producer */
static PyObject *Ring_push(Ring *self, PyObject *args) {
    PyObject *indices, *sizes;
    unsigned long backlog;
    if (!PyArg_ParseTuple(args, "O!O!k", &PyList_Type, &indices, &PyList_Type, &sizes, &backlog)) return NULL;
    if (check(self) < 0) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(indices);
    if (PyList_GET_SIZE(sizes) != n) {
        PyErr_SetString(PyExc_ValueError, "indices and sizes differ in length");
        return NULL;
    }
    uint64_t tail = load_relaxed(P64(self, OFF_FWD_TAIL)); /* ours */
    uint64_t head = load_acquire(P64(self, OFF_FWD_HEAD)); /* the slots before it are free again */
    if (tail - head + (uint64_t)n > self->cap) {
        PyErr_Format(PyExc_OverflowError, "ring full: %llu of %llu slots used, %zd more pushed",
                     (unsigned long long)(tail - head), (unsigned long long)self->cap, n);
        return NULL;
    }
    uint32_t *fwd = FWD(self);
    uint64_t mask = self->cap - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long index = PyLong_AsUnsignedLong(PyList_GET_ITEM(indices, i));
        unsigned long size = PyLong_AsUnsignedLong(PyList_GET_ITEM(sizes, i));
        if (PyErr_Occurred()) return NULL;
        uint64_t slot = (tail + (uint64_t)i) & mask;
        fwd[2 * slot] = (uint32_t)index;
        fwd[2 * slot + 1] = (uint32_t)size;
    }
    __atomic_store_n(P32(self, OFF_BACKLOG), (uint32_t)backlog, __ATOMIC_RELAXED);
    store_release(P64(self, OFF_FWD_TAIL), tail + (uint64_t)n);
    return PyBool_FromLong(take_parked(self, OFF_CPARK));
}

static PyObject *Ring_take_returns(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    uint64_t head = load_relaxed(P64(self, OFF_BWD_HEAD)); /* ours */
    uint64_t tail = load_acquire(P64(self, OFF_BWD_TAIL));
    uint64_t granted = load_acquire(P64(self, OFF_GRANTED));
    if (tail - head > self->cap) {
        PyErr_Format(PyExc_ValueError, "backward ring holds %llu entries, more than its %llu slots",
                     (unsigned long long)(tail - head), (unsigned long long)self->cap);
        return NULL;
    }
    Py_ssize_t n = (Py_ssize_t)(tail - head);
    PyObject *out = PyList_New(n);
    if (out == NULL) return NULL;
    uint32_t *bwd = BWD(self);
    uint64_t mask = self->cap - 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromUnsignedLong(bwd[(head + (uint64_t)i) & mask]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    if (n) store_release(P64(self, OFF_BWD_HEAD), tail);
    PyObject *res = Py_BuildValue("(KN)", (unsigned long long)granted, out);
    return res;
}

static PyObject *Ring_park_producer(Ring *self, PyObject *arg) {
    unsigned long long seen = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (check(self) < 0) return NULL;
    uint32_t *word = P32(self, OFF_PPARK);
    __atomic_store_n(word, 1, __ATOMIC_RELAXED);
    full_fence();
    int idle = load_acquire(P64(self, OFF_GRANTED)) == seen
               && load_acquire(P64(self, OFF_BWD_TAIL)) == load_relaxed(P64(self, OFF_BWD_HEAD));
    if (!idle) __atomic_store_n(word, 0, __ATOMIC_RELAXED);
    return PyBool_FromLong(idle);
}

static PyObject *Ring_unpark_producer(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    __atomic_store_n(P32(self, OFF_PPARK), 0, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *Ring_mark_closed(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    __atomic_store_n(P32(self, OFF_CLOSED), 1, __ATOMIC_RELEASE);
    return PyBool_FromLong(take_parked(self, OFF_CPARK));
}

/* ------------------------------------------------------------------------------------------ consumer */
static PyObject *Ring_pop(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    uint64_t head = load_relaxed(P64(self, OFF_FWD_HEAD)); /* ours */
    uint64_t tail = load_acquire(P64(self, OFF_FWD_TAIL));
    if (tail == head) return Py_BuildValue("(k[][])", 0UL);
    if (tail - head > self->cap) {
        PyErr_Format(PyExc_ValueError, "ring tail %llu is %llu entries ahead of head %llu; it holds %llu",
                     (unsigned long long)tail, (unsigned long long)(tail - head), (unsigned long long)head,
                     (unsigned long long)self->cap);
        return NULL;
    }
    uint32_t backlog = __atomic_load_n(P32(self, OFF_BACKLOG), __ATOMIC_RELAXED);
    Py_ssize_t n = (Py_ssize_t)(tail - head);
    const uint32_t *fwd = FWD(self);
    uint64_t mask = self->cap - 1;
    /* Validate every descriptor before taking any: a torn one is refused, never followed. */
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t slot = (head + (uint64_t)i) & mask;
        uint32_t index = fwd[2 * slot], size = fwd[2 * slot + 1];
        if (index >= self->num_buffers || size > self->buffer_size) {
            PyErr_Format(PyExc_ValueError, "descriptor (%u, %u) at ring position %llu outside the sender's pool "
                         "(%u buffers of %u bytes)", index, size, (unsigned long long)(head + (uint64_t)i),
                         self->num_buffers, self->buffer_size);
            return NULL;
        }
    }
    PyObject *indices = PyList_New(n), *sizes = PyList_New(n);
    if (indices == NULL || sizes == NULL) {
        Py_XDECREF(indices);
        Py_XDECREF(sizes);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t slot = (head + (uint64_t)i) & mask;
        PyObject *a = PyLong_FromUnsignedLong(fwd[2 * slot]);
        PyObject *b = PyLong_FromUnsignedLong(fwd[2 * slot + 1]);
        if (a == NULL || b == NULL) {
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_DECREF(indices);
            Py_DECREF(sizes);
            return NULL;
        }
        PyList_SET_ITEM(indices, i, a);
        PyList_SET_ITEM(sizes, i, b);
    }
    store_release(P64(self, OFF_FWD_HEAD), tail);
    return Py_BuildValue("(kNN)", (unsigned long)backlog, indices, sizes);
}

static PyObject *Ring_give_back(Ring *self, PyObject *args) {
    PyObject *indices;
    unsigned long long credits;
    if (!PyArg_ParseTuple(args, "O!K", &PyList_Type, &indices, &credits)) return NULL;
    if (check(self) < 0) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(indices);
    if (n) {
        uint64_t tail = load_relaxed(P64(self, OFF_BWD_TAIL)); /* ours */
        uint64_t head = load_acquire(P64(self, OFF_BWD_HEAD));
        if (tail - head + (uint64_t)n > self->cap) {
            PyErr_Format(PyExc_OverflowError, "backward ring full: %llu of %llu slots used, %zd more given back",
                         (unsigned long long)(tail - head), (unsigned long long)self->cap, n);
            return NULL;
        }
        uint32_t *bwd = BWD(self);
        uint64_t mask = self->cap - 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned long index = PyLong_AsUnsignedLong(PyList_GET_ITEM(indices, i));
            if (PyErr_Occurred()) return NULL;
            bwd[(tail + (uint64_t)i) & mask] = (uint32_t)index;
        }
        store_release(P64(self, OFF_BWD_TAIL), tail + (uint64_t)n);
    }
    if (credits) store_release(P64(self, OFF_GRANTED), load_relaxed(P64(self, OFF_GRANTED)) + credits);
    if (!n && !credits) Py_RETURN_FALSE;
    return PyBool_FromLong(take_parked(self, OFF_PPARK));
}

static PyObject *Ring_park_consumer(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    uint32_t *word = P32(self, OFF_CPARK);
    __atomic_store_n(word, 1, __ATOMIC_RELAXED);
    full_fence();
    int idle = load_acquire(P64(self, OFF_FWD_TAIL)) == load_relaxed(P64(self, OFF_FWD_HEAD))
               && !__atomic_load_n(P32(self, OFF_CLOSED), __ATOMIC_ACQUIRE);
    if (!idle) __atomic_store_n(word, 0, __ATOMIC_RELAXED);
    return PyBool_FromLong(idle);
}

static PyObject *Ring_unpark_consumer(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    __atomic_store_n(P32(self, OFF_CPARK), 0, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *Ring_closed_and_empty(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    int closed = __atomic_load_n(P32(self, OFF_CLOSED), __ATOMIC_ACQUIRE) != 0;
    return PyBool_FromLong(closed && load_acquire(P64(self, OFF_FWD_TAIL)) == load_relaxed(P64(self, OFF_FWD_HEAD)));
}

/* ------------------------------------------------------------------------------------------ both */
static PyObject *Ring_counters(Ring *self, PyObject *Py_UNUSED(ignored)) {
    if (check(self) < 0) return NULL;
    return Py_BuildValue(
        "{sKsKsKsKsKsIsIsIsI}",
        "fwd_head", (unsigned long long)load_acquire(P64(self, OFF_FWD_HEAD)),
        "fwd_tail", (unsigned long long)load_acquire(P64(self, OFF_FWD_TAIL)),
        "bwd_head", (unsigned long long)load_acquire(P64(self, OFF_BWD_HEAD)),
        "bwd_tail", (unsigned long long)load_acquire(P64(self, OFF_BWD_TAIL)),
        "granted", (unsigned long long)load_acquire(P64(self, OFF_GRANTED)),
        "backlog", __atomic_load_n(P32(self, OFF_BACKLOG), __ATOMIC_ACQUIRE),
        "closed", __atomic_load_n(P32(self, OFF_CLOSED), __ATOMIC_ACQUIRE),
        "consumer_parked", __atomic_load_n(P32(self, OFF_CPARK), __ATOMIC_ACQUIRE),
        "producer_parked", __atomic_load_n(P32(self, OFF_PPARK), __ATOMIC_ACQUIRE));
}

static PyObject *Ring_close(Ring *self, PyObject *Py_UNUSED(ignored)) {
    release_buffers(self);
    Py_RETURN_NONE;
}

static PyObject *Ring_get_capacity(Ring *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(self->cap);
}

static PyMethodDef Ring_methods[] = {
    {"push", (PyCFunction)Ring_push, METH_VARARGS,
     "push(indices, sizes, backlog) -> wake: producer; True if the consumer was parked (send it one wake-up)"},
    {"take_returns", (PyCFunction)Ring_take_returns, METH_NOARGS,
     "take_returns() -> (granted, indices): producer; credits granted so far, and the indices given back since"},
    {"park_producer", (PyCFunction)Ring_park_producer, METH_O,
     "park_producer(granted_seen) -> bool: announce a wait; False (not parked) if returns are already there"},
    {"unpark_producer", (PyCFunction)Ring_unpark_producer, METH_NOARGS, "producer: the wait is over"},
    {"mark_closed", (PyCFunction)Ring_mark_closed, METH_NOARGS,
     "mark_closed() -> wake: producer; nothing more will be pushed"},
    {"pop", (PyCFunction)Ring_pop, METH_NOARGS,
     "pop() -> (backlog, indices, sizes): consumer; every descriptor published since the last pop"},
    {"give_back", (PyCFunction)Ring_give_back, METH_VARARGS,
     "give_back(indices, credits) -> wake: consumer; True if the producer was parked (send it one wake-up)"},
    {"park_consumer", (PyCFunction)Ring_park_consumer, METH_NOARGS,
     "park_consumer() -> bool: announce a wait; False (not parked) if descriptors are already there"},
    {"unpark_consumer", (PyCFunction)Ring_unpark_consumer, METH_NOARGS, "consumer: the wait is over"},
    {"closed_and_empty", (PyCFunction)Ring_closed_and_empty, METH_NOARGS,
     "consumer: the producer closed the ring and every descriptor was popped"},
    {"counters", (PyCFunction)Ring_counters, METH_NOARGS, "every counter and flag (tests, diagnostics)"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "release the region's buffer (idempotent)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"capacity", (getter)Ring_get_capacity, NULL, "slots in each direction", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "runtime.network._ring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One SPSC descriptor ring in a shared region (see the module's comment).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

static PyObject *ring_nbytes(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_ssize_t cap = PyLong_AsSsize_t(arg);
    if (cap == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromSsize_t(ring_bytes((uint64_t)cap));
}

static PyMethodDef module_methods[] = {
    {"ring_bytes", ring_nbytes, METH_O, "ring_bytes(capacity) -> bytes a ring of that capacity takes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ring_module = {
    PyModuleDef_HEAD_INIT, "_ring", "SPSC descriptor rings in shared memory (see runtime.network.ring).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__ring(void) {
    if (!__atomic_always_lock_free(8, 0) || !__atomic_always_lock_free(4, 0)) {
        PyErr_SetString(PyExc_ImportError, "the ring needs lock-free 4- and 8-byte atomics");
        return NULL;
    }
    if (PyType_Ready(&RingType) < 0) return NULL;
    PyObject *m = PyModule_Create(&ring_module);
    if (m == NULL) return NULL;
    RingGone = PyErr_NewExceptionWithDoc("runtime.network._ring.RingGone",
                                         "the ring's block was freed by its producer", NULL, NULL);
    if (RingGone == NULL || PyModule_AddObjectRef(m, "RingGone", RingGone) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "Ring", (PyObject *)&RingType) < 0) goto fail;
    if (PyModule_AddIntConstant(m, "LINE", LINE) < 0 || PyModule_AddIntConstant(m, "ENTRIES", OFF_ENTRIES) < 0
        || PyModule_AddIntConstant(m, "FWD_TAIL", OFF_FWD_TAIL) < 0
        || PyModule_AddIntConstant(m, "FWD_HEAD", OFF_FWD_HEAD) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
