/* cachescope._speedups: the common case of push, pop and get in C.
 *
 * InstrumentedCache (cachescope/_instrumented.py) is the specification; this file only takes
 * its fast path, for the case a decode loop hits on every op:
 *   - a str queue name, a list queue, and an owner found by one frame lookup: the caller is a
 *     method of an already-labelled nn.Module (or a watch() hook named it, or attribution is off);
 *   - push: the value is measured here when it is a (Tensor, Tensor) tuple, else by measure();
 *   - pop: the popped item was pushed by the same owner (no violation).
 * Anything else (a new call site or module, an empty or missing queue, a mismatch, odd names or
 * values) returns the call to the Python method, which then does all of the work. Both paths
 * update the same Python objects under the cache's lock, so reports, metrics and replays cannot
 * tell which one ran; tests run the suite's equivalence checks with and without this module.
 *
 * Reading the caller's `self` needs the interpreter's frame layout, so this is built for
 * CPython 3.11 only; elsewhere AVAILABLE is False and the pure-Python path runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <time.h>

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000 && !defined(PYPY_VERSION)
#define CS_ACCEL 1
#define Py_BUILD_CORE 1
#include "internal/pycore_code.h"
#include "internal/pycore_frame.h"
#undef Py_BUILD_CORE
#else
#define CS_ACCEL 0
#endif

#if CS_ACCEL

/* Branch hints: error and fallback paths are laid out away from the common path, so an op
 * touches fewer instruction cache lines (inside a decode step they are all cold). */
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

#define MEMO_SIZE 1024      /* call sites remembered (direct-mapped) */
#define STEP_MEMORY 4096    /* as _STEP_MEMORY in _instrumented.py */
#define MAX_FRAMES 6        /* as _MAX_FRAMES in _owners.py */
#define CODE_MEMO_SIZE 512
#define LABEL_MEMO_SIZE 64  /* modules remembered by labelled() (direct-mapped) */
#define FS_MEMO_SIZE 4096     /* as in InstrumentedCache._fstats */
#define MAX_LABEL_LEN 64      /* as in _families.py */
#define CLEARED_MEMORY 256    /* as _CLEARED_MEMORY in _instrumented.py */
#define DURATIONS_LIMIT 4096  /* as _PENDING_STEPS in metrics.py */  /* code objects remembered by code_kind (direct-mapped) */

typedef struct {
    PyCodeObject *code;     /* strong reference: the pointer cannot be reused while cached */
    int lasti;
    int is_method;          /* first argument is named self */
    int self_is_cell;
    PyObject *site;         /* "file.py:123" */
} SiteEntry;

typedef struct {
    void *obj;              /* the module (compared by address only; its weakref is checked) */
    uint64_t version;       /* the labels dict's ma_version_tag when the entry was read */
    PyObject *entry;        /* strong reference to the dict's (weakref, label) tuple */
} LabelEntry;

/* Offsets of __slots__ members, read once from the classes' member descriptors. */
static Py_ssize_t off_fs_family;
static Py_ssize_t off_st_ops, off_st_pushed, off_st_popped, off_st_index, off_st_prev, off_st_next,
    off_st_start, off_st_start_time, off_st_end, off_st_tokens, off_st_violations;
static Py_ssize_t off_at_mode, off_at_watching;
static PyTypeObject *FamilyStatsType, *StepType, *AttribStateType;
static PyTypeObject *RecordType, *MeasureType, *TensorType;
static PyObject *ModuleType;   /* torch.nn.Module */
static int configured = 0;

static PyObject *s_set, *s_emit_step_start, *s_on_step_end, *s_zero, *s_one;
static PyObject *s_clear, *s_families;
static PyObject *s_push, *s_pop, *s_append, *s_stack, *s_tuple2, *s_nbytes,
    *s_untyped_storage, *s_cdata, *s_on_op;

typedef struct {
    PyObject_HEAD
    PyObject *cache;         /* the seed's dict (InstrumentedCache._cache) */
    PyObject *queues;        /* name -> _Queue (provenance) */
    PyObject *fs_memo;       /* name -> FamilyStats */
    PyObject *timeline;      /* a Timeline */
    PyObject *labels;        /* Attributor._labels: id(module) -> (weakref, label) */
    PyObject *local;         /* Attributor._local (threading.local with .stack) */
    PyObject *astate;        /* Attributor.state (mode, watching) */
    PyObject *lock;          /* the cache's lock: an RLockObject, or any lock with acquire/release */
    PyObject *acquire, *release;   /* its methods, used when it is not an RLockObject */
    PyObject *slow_push, *slow_pop, *slow_get, *slow_set, *slow_end_step, *slow_clear, *fstats, *emit,
        *measure, *short_path;
    PyObject *cleared;       /* InstrumentedCache._cleared: key -> (seq, step, owner, site) */
    PyObject *state_key;     /* InstrumentedCache.state_key */
    PyObject *families_seen; /* FamilyMap._families: the labels in use */
    int default_families;    /* the FamilyMap uses _families.default_family */
    PyObject *step;          /* StepInfo or None */
    PyObject *step_pops;     /* set of (name, owner) popped in this step */
    PyObject **sp;           /* (name, owner) of the C path's pops not yet in step_pops */
    Py_ssize_t sp_len, sp_cap;   /* pairs pending, pairs allocated */
    PyObject *memo_step, *last_pushed, *last_popped;   /* step_note: last names added to step */
    PyObject *durations;     /* a sink's deque of step durations (metrics), or None */
    PyObject *stats;         /* InstrumentedCache.stats (a Stats) */
    int loop_ends_steps;     /* InstrumentedCache._loop_ends_steps */
    long long seq;
    long long step_index;
    int op_sinks;            /* some sink wants on_op now */
    int full_measure;        /* some sink needs full Measure summaries */
    int enabled;
    int step_sinks;          /* bit 1: some sink wants on_step_start now; bit 2: on_step_end */
    SiteEntry memo[MEMO_SIZE];
    LabelEntry label_memo[LABEL_MEMO_SIZE];
} Hot;

/* ------------------------------------------------------------------ the cache's lock */

/* A reentrant lock with threading.RLock's Python interface that the fast path takes without a
 * Python call. Waiting releases the GIL. The owner and count are only read and written with the
 * GIL held; the mutex is what a second thread blocks on. A POSIX mutex, not a PyThread lock:
 * CPython 3.11's PyThread_acquire_lock_timed reads the monotonic clock to compute a deadline
 * even for a non-blocking try, which the fast path would pay on every op. */
#ifndef _WIN32
#include <pthread.h>
#include <errno.h>
typedef pthread_mutex_t cs_mutex;
static int mutex_init(cs_mutex *m) { return pthread_mutex_init(m, NULL) == 0; }
static int mutex_try(cs_mutex *m) { return pthread_mutex_trylock(m) == 0; }
static void mutex_wait(cs_mutex *m) { pthread_mutex_lock(m); }
static void mutex_unlock(cs_mutex *m) { pthread_mutex_unlock(m); }
static void mutex_free(cs_mutex *m) { pthread_mutex_destroy(m); }
/* 1: acquired within `seconds` (< 0: wait forever) */
static int
mutex_wait_for(cs_mutex *m, double seconds)
{
    if (seconds < 0) {
        pthread_mutex_lock(m);
        return 1;
    }
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    long long ns = (long long)t.tv_nsec + (long long)((seconds - (long long)seconds) * 1e9);
    t.tv_sec += (time_t)seconds + (time_t)(ns / 1000000000LL);
    t.tv_nsec = (long)(ns % 1000000000LL);
    int r;
    while ((r = pthread_mutex_timedlock(m, &t)) == EINTR)
        ;
    return r == 0;
}
#else
typedef PyThread_type_lock cs_mutex;
static int mutex_init(cs_mutex *m) { return (*m = PyThread_allocate_lock()) != NULL; }
static int mutex_try(cs_mutex *m) { return PyThread_acquire_lock(*m, NOWAIT_LOCK); }
static void mutex_wait(cs_mutex *m) { PyThread_acquire_lock(*m, WAIT_LOCK); }
static void mutex_unlock(cs_mutex *m) { PyThread_release_lock(*m); }
static void mutex_free(cs_mutex *m) { PyThread_free_lock(*m); }
static int
mutex_wait_for(cs_mutex *m, double seconds)
{
    PY_TIMEOUT_T us = seconds < 0 ? -1 : (PY_TIMEOUT_T)(seconds * 1e6);
    return PyThread_acquire_lock_timed(*m, us, 0) == PY_LOCK_ACQUIRED;
}
#endif

typedef struct {
    PyObject_HEAD
    cs_mutex mutex;
    int ready;
    unsigned long owner;
    unsigned long count;
} RLockObject;

static PyTypeObject RLockType;

static int
rlock_acquire(RLockObject *l)
{
    unsigned long me = PyThread_get_thread_ident();
    if (l->count > 0 && l->owner == me) {
        l->count++;
        return 0;
    }
    if (!mutex_try(&l->mutex)) {
        Py_BEGIN_ALLOW_THREADS
        mutex_wait(&l->mutex);
        Py_END_ALLOW_THREADS
    }
    l->owner = me;
    l->count = 1;
    return 0;
}

static int
rlock_release(RLockObject *l)
{
    if (l->count == 0 || l->owner != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return -1;
    }
    if (--l->count == 0) {
        l->owner = 0;
        mutex_unlock(&l->mutex);
    }
    return 0;
}

static PyObject *
RLock_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    RLockObject *l = (RLockObject *)type->tp_alloc(type, 0);
    if (l == NULL)
        return NULL;
    if (!mutex_init(&l->mutex)) {
        Py_DECREF(l);
        return PyErr_NoMemory();
    }
    l->ready = 1;
    return (PyObject *)l;
}

static void
RLock_dealloc(RLockObject *l)
{
    if (l->ready) {
        if (l->count > 0)
            mutex_unlock(&l->mutex);
        mutex_free(&l->mutex);
    }
    Py_TYPE(l)->tp_free((PyObject *)l);
}

static PyObject *
RLock_acquire(RLockObject *l, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pd", kw, &blocking, &timeout))
        return NULL;
    unsigned long me = PyThread_get_thread_ident();
    if (l->count > 0 && l->owner == me) {
        l->count++;
        Py_RETURN_TRUE;
    }
    if (!mutex_try(&l->mutex)) {
        if (!blocking)
            Py_RETURN_FALSE;
        int got;
        Py_BEGIN_ALLOW_THREADS
        got = mutex_wait_for(&l->mutex, timeout);
        Py_END_ALLOW_THREADS
        if (!got)
            Py_RETURN_FALSE;
    }
    l->owner = me;
    l->count = 1;
    Py_RETURN_TRUE;
}

static PyObject *
RLock_release(RLockObject *l, PyObject *unused)
{
    if (rlock_release(l) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
RLock_exit(RLockObject *l, PyObject *args)
{
    return RLock_release(l, NULL);
}

static PyObject *
RLock_is_owned(RLockObject *l, PyObject *unused)
{
    return PyBool_FromLong(l->count > 0 && l->owner == PyThread_get_thread_ident());
}

static PyMethodDef RLock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))RLock_acquire, METH_VARARGS | METH_KEYWORDS, NULL},
    {"release", (PyCFunction)RLock_release, METH_NOARGS, NULL},
    {"__enter__", (PyCFunction)(void (*)(void))RLock_acquire, METH_VARARGS | METH_KEYWORDS, NULL},
    {"__exit__", (PyCFunction)RLock_exit, METH_VARARGS, NULL},
    {"_is_owned", (PyCFunction)RLock_is_owned, METH_NOARGS, NULL},
    {NULL}
};

static PyTypeObject RLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.RLock",
    .tp_basicsize = sizeof(RLockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reentrant lock (threading.RLock's interface) that C code takes without a call.",
    .tp_new = RLock_new,
    .tp_dealloc = (destructor)RLock_dealloc,
    .tp_methods = RLock_methods,
};

/* ------------------------------------------------------------------ family counters */

/* The numeric fields of FamilyStats (cachescope/_accounting.py subclasses this type when the
 * extension is built): plain C integers, so counting an op allocates nothing. Python reads and
 * writes them as int attributes (T_LONGLONG members). */
typedef struct {
    PyObject_HEAD
    long long push, pop, set, get, clear, clear_all, depth, peak_depth, logical, storage,
        peak_logical, peak_storage, live, empty;
    /* The storages held by this family's queued items (FamilyStats.hold/release): an open
     * addressing table of storage key -> (nbytes, holders), so that shared storages are counted
     * once. holders == 0: an empty slot. */
    Py_ssize_t st_cap, st_used;
    struct StSlot *st;
} FamilyCounters;

typedef struct StSlot {
    uintptr_t key;
    long long nbytes;
    long long holders;
} StSlot;

#define FC(obj) ((FamilyCounters *)(obj))

static inline size_t
st_hash(uintptr_t key, Py_ssize_t cap)
{
    return (size_t)(((uint64_t)key >> 4) * 0x9E3779B97F4A7C15ull >> 20) & (size_t)(cap - 1);
}

/* The slot of `key`, or of the empty slot where it would go. */
static inline StSlot *
st_lookup(FamilyCounters *c, uintptr_t key)
{
    size_t mask = (size_t)c->st_cap - 1, i = st_hash(key, c->st_cap);
    while (c->st[i].holders != 0 && c->st[i].key != key)
        i = (i + 1) & mask;
    return &c->st[i];
}

static int
st_grow(FamilyCounters *c)
{
    Py_ssize_t cap = c->st_cap ? c->st_cap * 2 : 16;
    StSlot *old = c->st, *n = PyMem_Calloc((size_t)cap, sizeof(StSlot));
    if (n == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t oldcap = c->st_cap;
    c->st = n;
    c->st_cap = cap;
    for (Py_ssize_t i = 0; i < oldcap; i++)
        if (old[i].holders != 0)
            *st_lookup(c, old[i].key) = old[i];
    PyMem_Free(old);
    return 0;
}

/* One storage of an item that entered a queue: counted in `storage` by its first holder. */
static inline int
st_hold(FamilyCounters *c, uintptr_t key, long long nbytes)
{
    if (UNLIKELY(2 * (c->st_used + 1) > c->st_cap) && st_grow(c) < 0)
        return -1;
    StSlot *s = st_lookup(c, key);
    if (s->holders == 0) {
        s->key = key;
        s->nbytes = nbytes;
        s->holders = 1;
        c->st_used++;
        c->storage += nbytes;
    }
    else {
        s->holders++;
    }
    return 0;
}

/* One storage of an item that left a queue: uncounted when its last holder leaves. */
static inline void
st_release(FamilyCounters *c, uintptr_t key)
{
    if (c->st_used == 0)
        return;
    StSlot *s = st_lookup(c, key);
    if (s->holders == 0 || --s->holders > 0)
        return;
    c->storage -= s->nbytes;
    c->st_used--;
    /* backward-shift deletion: no tombstones, probes stay short */
    size_t mask = (size_t)c->st_cap - 1, i = (size_t)(s - c->st), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (c->st[j].holders == 0)
            break;
        size_t home = st_hash(c->st[j].key, c->st_cap);
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            c->st[i] = c->st[j];
            i = j;
        }
    }
    c->st[i].holders = 0;
}

static void
FamilyCounters_dealloc(PyObject *self)
{
    PyMem_Free(FC(self)->st);
    FC(self)->st = NULL;
    Py_TYPE(self)->tp_free(self);
}

/* A storage key from Python (an int: a storage's _cdata or a tensor's id). */
static int
st_key(PyObject *k, uintptr_t *out)
{
    if (!PyLong_Check(k)) {
        PyErr_SetString(PyExc_TypeError, "cachescope: a storage key must be an int");
        return -1;
    }
    *out = (uintptr_t)PyLong_AsUnsignedLongLongMask(k);
    return PyErr_Occurred() ? -1 : 0;
}

static void
hold_counts(FamilyCounters *c, long long lg)
{
    if (++c->depth > c->peak_depth)
        c->peak_depth = c->depth;
    c->logical += lg;
    if (c->logical > c->peak_logical)
        c->peak_logical = c->logical;
}

/* hold(logical, storages): an item entered a queue of this family (FamilyStats.hold). */
static PyObject *
FamilyCounters_hold(PyObject *self, PyObject *args)
{
    FamilyCounters *c = FC(self);
    long long lg;
    PyObject *storages;
    if (!PyArg_ParseTuple(args, "LO:hold", &lg, &storages))
        return NULL;
    PyObject *seq = PySequence_Fast(storages, "storages must be a sequence of (key, nbytes)");
    if (seq == NULL)
        return NULL;
    hold_counts(c, lg);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        uintptr_t key;
        long long nb;
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "storages must be (key, nbytes) pairs");
            goto fail;
        }
        if (st_key(PyTuple_GET_ITEM(pair, 0), &key) < 0)
            goto fail;
        nb = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
        if ((nb == -1 && PyErr_Occurred()) || st_hold(c, key, nb) < 0)
            goto fail;
    }
    Py_DECREF(seq);
    if (c->storage > c->peak_storage)
        c->peak_storage = c->storage;
    Py_RETURN_NONE;
fail:
    Py_DECREF(seq);
    return NULL;
}

/* release(logical, storages): an item left a queue of this family (popped or cleared). */
static PyObject *
FamilyCounters_release(PyObject *self, PyObject *args)
{
    FamilyCounters *c = FC(self);
    long long lg;
    PyObject *storages;
    if (!PyArg_ParseTuple(args, "LO:release", &lg, &storages))
        return NULL;
    PyObject *seq = PySequence_Fast(storages, "storages must be a sequence of (key, nbytes)");
    if (seq == NULL)
        return NULL;
    c->depth -= 1;
    c->logical -= lg;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        uintptr_t key;
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) < 1) {
            PyErr_SetString(PyExc_TypeError, "storages must be (key, nbytes) pairs");
            Py_DECREF(seq);
            return NULL;
        }
        if (st_key(PyTuple_GET_ITEM(pair, 0), &key) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        st_release(c, key);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

/* drop_all(): clear_all, nothing is held any more. */
static PyObject *
FamilyCounters_drop_all(PyObject *self, PyObject *unused)
{
    FamilyCounters *c = FC(self);
    c->depth = c->logical = c->storage = c->live = c->empty = 0;
    if (c->st != NULL)
        memset(c->st, 0, (size_t)c->st_cap * sizeof(StSlot));
    c->st_used = 0;
    Py_RETURN_NONE;
}

/* held_storages(): sorted (holders, nbytes) of the storages held now (for tests). */
static PyObject *
FamilyCounters_held_storages(PyObject *self, PyObject *unused)
{
    FamilyCounters *c = FC(self);
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out != NULL && i < c->st_cap; i++) {
        if (c->st[i].holders == 0)
            continue;
        PyObject *t = Py_BuildValue("(LL)", c->st[i].holders, c->st[i].nbytes);
        if (t == NULL || PyList_Append(out, t) < 0)
            Py_CLEAR(out);
        Py_XDECREF(t);
    }
    if (out != NULL && PyList_Sort(out) < 0)
        Py_CLEAR(out);
    return out;
}

static PyMethodDef FamilyCounters_methods[] = {
    {"hold", FamilyCounters_hold, METH_VARARGS, "hold(logical, storages): an item entered a queue"},
    {"release", FamilyCounters_release, METH_VARARGS,
     "release(logical, storages): an item left a queue (popped or cleared)"},
    {"drop_all", FamilyCounters_drop_all, METH_NOARGS, "drop_all(): clear_all, nothing is held"},
    {"held_storages", FamilyCounters_held_storages, METH_NOARGS,
     "held_storages(): sorted (holders, nbytes) of the storages held now"},
    {NULL}
};

static PyMemberDef FamilyCounters_members[] = {
#define FCM(name) {#name, T_LONGLONG, offsetof(FamilyCounters, name), 0, NULL}
    FCM(push), FCM(pop), FCM(set), FCM(get), FCM(clear), FCM(clear_all), FCM(depth),
    FCM(peak_depth), FCM(logical), FCM(storage), FCM(peak_logical), FCM(peak_storage), FCM(live),
    FCM(empty),
#undef FCM
    {NULL}
};

static PyTypeObject FamilyCountersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.FamilyCounters",
    .tp_basicsize = sizeof(FamilyCounters),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The numeric fields of FamilyStats, as C integers, and the storages its items hold.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = FamilyCounters_dealloc,
    .tp_members = FamilyCounters_members,
    .tp_methods = FamilyCounters_methods,
};

/* Stats.steps and Stats.tokens (cachescope/_accounting.py), as C integers for end_step. */
typedef struct {
    PyObject_HEAD
    long long steps, tokens;
} StepCounters;

static PyMemberDef StepCounters_members[] = {
    {"steps", T_LONGLONG, offsetof(StepCounters, steps), 0, NULL},
    {"tokens", T_LONGLONG, offsetof(StepCounters, tokens), 0, NULL},
    {NULL}
};

static PyTypeObject StepCountersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.StepCounters",
    .tp_basicsize = sizeof(StepCounters),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Stats.steps and Stats.tokens, as C integers.",
    .tp_new = PyType_GenericNew,
    .tp_members = StepCounters_members,
};

/* ------------------------------------------------------------------ small helpers */


/* An internal failure after the seed's op succeeded: reported, never raised. */
static void __attribute__((cold, noinline))
report(PyObject *obj)
{
    PyErr_WriteUnraisable(obj);
}


#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

static int
slot_add(PyObject *obj, Py_ssize_t off, long long d)
{
    PyObject *old = SLOT(obj, off);
    if (old == NULL || !PyLong_CheckExact(old)) {
        PyErr_SetString(PyExc_TypeError, "cachescope: counter slot is not an int");
        return -1;
    }
    long long v = PyLong_AsLongLong(old);
    if (v == -1 && PyErr_Occurred())
        return -1;
    PyObject *nv = PyLong_FromLongLong(v + d);
    if (nv == NULL)
        return -1;
    SLOT(obj, off) = nv;
    Py_DECREF(old);
    return 0;
}

static long long
slot_get(PyObject *obj, Py_ssize_t off)
{
    PyObject *v = SLOT(obj, off);
    if (v == NULL || !PyLong_CheckExact(v))
        return 0;
    return PyLong_AsLongLong(v);
}

/* time.time() and time.perf_counter(), computed the way CPython computes them */
static double
clock_seconds(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    long long ns = (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    return (double)ns / 1e9;
}

static double now(void) { return clock_seconds(CLOCK_REALTIME); }
static double perf_counter(void) { return clock_seconds(CLOCK_MONOTONIC); }

static PyObject *
new_tuple_of(PyTypeObject *type, Py_ssize_t n)
{
    return type->tp_alloc(type, n);   /* a tuple subclass: items are set with PyTuple_SET_ITEM */
}

static int
lock(Hot *h)
{
    if (Py_TYPE(h->lock) == &RLockType)
        return rlock_acquire((RLockObject *)h->lock);
    PyObject *r = PyObject_CallNoArgs(h->acquire);
    if (UNLIKELY(r == NULL))
        return -1;
    Py_DECREF(r);
    return 0;
}

static void
unlock(Hot *h)
{
    if (Py_TYPE(h->lock) == &RLockType) {
        rlock_release((RLockObject *)h->lock);   /* held by this thread: cannot fail */
        return;
    }
    PyObject *exc_t, *exc_v, *exc_tb;
    PyErr_Fetch(&exc_t, &exc_v, &exc_tb);
    PyObject *r = PyObject_CallNoArgs(h->release);
    if (r == NULL)
        PyErr_WriteUnraisable(h->release);
    Py_XDECREF(r);
    PyErr_Restore(exc_t, exc_v, exc_tb);
}

/* ------------------------------------------------------------------ attribution */

/* Whether a code object's first argument is `self`, and whether `self` is a cell variable. */
typedef struct {
    PyCodeObject *code;     /* strong reference */
    int is_method;
    int self_is_cell;
} CodeEntry;

static CodeEntry code_memo[CODE_MEMO_SIZE];

static int
code_kind(PyCodeObject *code, int *is_method, int *is_cell)
{
    CodeEntry *c = &code_memo[(((size_t)code) >> 4) & (CODE_MEMO_SIZE - 1)];
    if (c->code != code) {
        int m = 0, cell = 0;
        if (code->co_argcount > 0) {
            PyObject *names = PyCode_GetVarnames(code);
            if (names == NULL)
                return -1;
            if (PyTuple_GET_SIZE(names) > 0 &&
                PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(names, 0), "self") == 0) {
                m = 1;
                cell = (_PyLocals_GetKind(code->co_localspluskinds, 0) & CO_FAST_CELL) != 0;
            }
            Py_DECREF(names);
        }
        Py_XSETREF(c->code, (PyCodeObject *)Py_NewRef((PyObject *)code));
        c->is_method = m;
        c->self_is_cell = cell;
    }
    *is_method = c->is_method;
    *is_cell = c->self_is_cell;
    return 0;
}

/* The label of an already-labelled module: 1 (new reference in *owner), 0 unknown, -1 error. */
static int
labelled(Hot *h, PyObject *obj, PyObject **owner)
{
    /* A small memo of the labels dict's answers, valid while the dict is unchanged (its version
     * tag moves on every insert or delete): no int key is built and no dict is read per op. */
    LabelEntry *m = &h->label_memo[(((size_t)obj) >> 4) & (LABEL_MEMO_SIZE - 1)];
    uint64_t version = ((PyDictObject *)h->labels)->ma_version_tag;
    PyObject *entry;
    if (m->obj == obj && m->version == version && m->entry != NULL) {
        entry = m->entry;
    }
    else {
        PyObject *key = PyLong_FromVoidPtr(obj);
        if (UNLIKELY(key == NULL))
            return -1;
        entry = PyDict_GetItemWithError(h->labels, key);   /* borrowed */
        Py_DECREF(key);
        if (entry == NULL)
            return PyErr_Occurred() ? -1 : 0;
        if (UNLIKELY(!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2))
            return 0;
        Py_XSETREF(m->entry, Py_NewRef(entry));
        m->obj = obj;
        m->version = version;
    }
    PyObject *ref = PyTuple_GET_ITEM(entry, 0);
    if (UNLIKELY(!PyWeakref_Check(ref) || PyWeakref_GET_OBJECT(ref) != obj))
        return 0;
    *owner = Py_NewRef(PyTuple_GET_ITEM(entry, 1));
    return 1;
}

/* 1: found (new references in *owner, *site); 0: take the Python path; -1: error. */
static int
attribute(Hot *h, PyObject **owner, PyObject **site, int skip)
{
    long mode = (long)slot_get(h->astate, off_at_mode);   /* 0 off, 1 auto, 2 stack */
    if (mode == 0) {
        *owner = Py_NewRef(Py_None);
        *site = Py_NewRef(Py_None);
        return 1;
    }
    PyThreadState *ts = PyThreadState_Get();
    _PyInterpreterFrame *f = ts->cframe->current_frame;
    while (f != NULL && _PyFrame_IsIncomplete(f))
        f = f->previous;
    for (; f != NULL && skip > 0; skip--) {   /* frames of Python callers inside cachescope */
        f = f->previous;
        while (f != NULL && _PyFrame_IsIncomplete(f))
            f = f->previous;
    }
    if (UNLIKELY(f == NULL))
        return 0;
    PyCodeObject *code = f->f_code;
    int lasti = _PyInterpreterFrame_LASTI(f);
    size_t slot = ((((size_t)code) >> 4) ^ ((size_t)lasti * 2654435761u)) & (MEMO_SIZE - 1);
    SiteEntry *e = &h->memo[slot];
    if (e->code != code || e->lasti != lasti) {
        int line = PyCode_Addr2Line(code, lasti * (int)sizeof(_Py_CODEUNIT));
        PyObject *path = PyObject_CallOneArg(h->short_path, code->co_filename);
        if (UNLIKELY(path == NULL))
            return -1;
        PyObject *s = PyUnicode_FromFormat("%U:%d", path, line);
        Py_DECREF(path);
        if (UNLIKELY(s == NULL))
            return -1;
        int is_method = 0, is_cell = 0;
        if (code->co_argcount > 0) {
            PyObject *names = PyCode_GetVarnames(code);
            if (UNLIKELY(names == NULL)) {
                Py_DECREF(s);
                return -1;
            }
            if (PyTuple_GET_SIZE(names) > 0 &&
                PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(names, 0), "self") == 0) {
                is_method = 1;
                is_cell = (_PyLocals_GetKind(code->co_localspluskinds, 0) & CO_FAST_CELL) != 0;
            }
            Py_DECREF(names);
        }
        Py_XDECREF(e->code);
        Py_XDECREF(e->site);
        e->code = (PyCodeObject *)Py_NewRef((PyObject *)code);
        e->lasti = lasti;
        e->site = s;
        e->is_method = is_method;
        e->self_is_cell = is_cell;
    }
    if (mode == 1 && slot_get(h->astate, off_at_watching) > 0) {
        PyObject *stack = PyObject_GetAttr(h->local, s_stack);
        if (stack == NULL) {
            if (UNLIKELY(!PyErr_ExceptionMatches(PyExc_AttributeError)))
                return -1;
            PyErr_Clear();
        }
        else {
            if (LIKELY(PyList_CheckExact(stack) && PyList_GET_SIZE(stack) > 0)) {
                PyObject *top = PyList_GET_ITEM(stack, PyList_GET_SIZE(stack) - 1);
                if (PyTuple_CheckExact(top) && PyTuple_GET_SIZE(top) == 2) {
                    *owner = Py_NewRef(PyTuple_GET_ITEM(top, 1));
                    *site = Py_NewRef(e->site);
                    Py_DECREF(stack);
                    return 1;
                }
                Py_DECREF(stack);
                return 0;
            }
            Py_DECREF(stack);
        }
    }
    /* The first of up to MAX_FRAMES frames (from the call site up) whose `self` is an nn.Module,
     * as Attributor._from_frames: a labelled one is the owner; an unlabelled one is labelled by
     * the Python path; none at all means no owner. */
    int is_method = e->is_method, is_cell = e->self_is_cell;
    for (int depth = 0; f != NULL && depth < MAX_FRAMES; depth++) {
        if (UNLIKELY(depth > 0 && code_kind(f->f_code, &is_method, &is_cell) < 0))
            return -1;
        if (is_method) {
            PyObject *obj = f->localsplus[0];
            if (obj != NULL && is_cell)
                obj = PyCell_Check(obj) ? PyCell_GET(obj) : NULL;
            if (obj != NULL) {
                int r = labelled(h, obj, owner);
                if (r != 0) {
                    if (r > 0)
                        *site = Py_NewRef(e->site);
                    return r;
                }
                r = PyObject_IsInstance(obj, ModuleType);
                if (r != 0)
                    return r < 0 ? -1 : 0;
            }
        }
        f = f->previous;
        while (f != NULL && _PyFrame_IsIncomplete(f))
            f = f->previous;
    }
    *owner = Py_NewRef(Py_None);
    *site = Py_NewRef(e->site);
    return 1;
}

/* ------------------------------------------------------------------ storage accounting */

/* An item measured as a Measure entered a queue: its storages are (key, nbytes) pairs. */
static int
hold(PyObject *fs, long long lg, PyObject *storages)
{
    FamilyCounters *c = FC(fs);
    if (UNLIKELY(!PyTuple_Check(storages)))
        return -1;
    hold_counts(c, lg);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(storages); i++) {
        PyObject *pair = PyTuple_GET_ITEM(storages, i);
        uintptr_t key;
        long long nb = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
        if (UNLIKELY((nb == -1 && PyErr_Occurred()) || st_key(PyTuple_GET_ITEM(pair, 0), &key) < 0 ||
                     st_hold(c, key, nb) < 0))
            return -1;
    }
    if (c->storage > c->peak_storage)
        c->peak_storage = c->storage;
    return 0;
}

/* A compactly measured (k, v) item entered a queue. */
static int
hold_kv(PyObject *fs, long long lg, int nst, void **skey, long long *snb)
{
    FamilyCounters *c = FC(fs);
    hold_counts(c, lg);
    for (int i = 0; i < nst; i++)
        if (UNLIKELY(st_hold(c, (uintptr_t)skey[i], snb[i]) < 0))
            return -1;
    if (c->storage > c->peak_storage)
        c->peak_storage = c->storage;
    return 0;
}

static int
release(PyObject *fs, long long lg, PyObject *storages)
{
    if (UNLIKELY(!PyTuple_Check(storages)))
        return -1;
    FC(fs)->depth -= 1;
    FC(fs)->logical -= lg;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(storages); i++) {
        uintptr_t key;
        if (UNLIKELY(st_key(PyTuple_GET_ITEM(PyTuple_GET_ITEM(storages, i), 0), &key) < 0))
            return -1;
        st_release(FC(fs), key);
    }
    return 0;
}

static int
release_kv(PyObject *fs, long long lg, int nst, void **skey)
{
    FC(fs)->depth -= 1;
    FC(fs)->logical -= lg;
    for (int i = 0; i < nst; i++)
        st_release(FC(fs), (uintptr_t)skey[i]);
    return 0;
}

/* ------------------------------------------------------------------ measure */

/* (storage key, storage nbytes) of a plain tensor, as _values._storage_of. New ref or NULL. */
static PyObject *
storage_of(PyObject *t)
{
    PyObject *st = PyObject_CallMethodNoArgs(t, s_untyped_storage);
    if (st == NULL)
        return NULL;
    PyObject *key = PyObject_GetAttr(st, s_cdata);
    PyObject *nb = key ? PyObject_CallMethodNoArgs(st, s_nbytes) : NULL;
    Py_DECREF(st);
    if (nb == NULL) {
        Py_XDECREF(key);
        return NULL;
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(key);
        Py_DECREF(nb);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, key);
    PyTuple_SET_ITEM(pair, 1, nb);
    return pair;
}

/* ------------------------------------------------------------------ raw tensor sizes
 *
 * Reading `t.nbytes` and `t.untyped_storage()` through torch's Python bindings costs eight calls
 * per (k, v) push, and inside a decode step (the model's matmuls have just evicted the CPU caches)
 * they are the largest part of the fast path's cost. cachescope/_layout.py finds, once per process,
 * where a plain tensor keeps its TensorImpl, storage, element count and dtype, and where a storage
 * keeps its byte size; it checks the reader below against the Python API on a battery of tensors
 * before enabling it (set_tensor_layout). Every read is guarded: the tensor's exact type is
 * torch.Tensor, its TensorImpl and StorageImpl are of the plain classes probed (their vtables),
 * the dtype is one probed, and the values are in range; anything else, or no layout, goes to the
 * Python API. Nothing here reads tensor data. */
static int raw_ok = 0;
static Py_ssize_t raw_off_impl, raw_off_storage, raw_off_numel, raw_off_dtype, raw_off_snbytes;
static void *raw_impl_vt, *raw_storage_vt;
static unsigned char raw_itemsize[256];   /* dtype index -> element size; 0: not probed */

/* 1: *nbytes (logical), *skey (StorageImpl address) and *snbytes read; 0: use the Python API. */
static int
raw_tensor(PyObject *t, long long *nbytes, void **skey, long long *snbytes)
{
    if (UNLIKELY(!raw_ok || Py_TYPE(t) != TensorType))
        return 0;
    char *impl = *(char **)((char *)t + raw_off_impl);
    if (UNLIKELY(impl == NULL || *(void **)impl != raw_impl_vt))
        return 0;
    char *st = *(char **)(impl + raw_off_storage);
    if (UNLIKELY(st == NULL || *(void **)st != raw_storage_vt))
        return 0;
    long long numel = *(long long *)(impl + raw_off_numel);
    unsigned short dt = *(unsigned short *)(impl + raw_off_dtype);
    long long sn = *(long long *)(st + raw_off_snbytes);
    if (dt >= 256 || raw_itemsize[dt] == 0 || numel < 0 || numel > (1LL << 56) ||
        sn < 0 || sn > (1LL << 60))
        return 0;
    *nbytes = numel * raw_itemsize[dt];
    *skey = st;
    *snbytes = sn;
    return 1;
}

/* set_tensor_layout(off_impl, off_storage, off_numel, off_dtype, off_snbytes, impl_vtable,
 * storage_vtable, itemsizes: bytes of 256) enables the reader; set_tensor_layout(None) disables it. */
static PyObject *
set_tensor_layout(PyObject *mod, PyObject *args)
{
    if (PyTuple_GET_SIZE(args) == 1 && PyTuple_GET_ITEM(args, 0) == Py_None) {
        raw_ok = 0;
        Py_RETURN_NONE;
    }
    Py_ssize_t a, b, c, d, e;
    unsigned long long ivt, svt;
    const char *sizes;
    Py_ssize_t nsizes;
    if (!PyArg_ParseTuple(args, "nnnnnKKy#", &a, &b, &c, &d, &e, &ivt, &svt, &sizes, &nsizes))
        return NULL;
    if (nsizes != 256 || a < (Py_ssize_t)sizeof(PyObject) || b < 8 || c < 8 || d < 8 || e < 8 ||
        !ivt || !svt) {
        PyErr_SetString(PyExc_ValueError, "set_tensor_layout: bad layout");
        return NULL;
    }
    raw_ok = 0;
    raw_off_impl = a; raw_off_storage = b; raw_off_numel = c; raw_off_dtype = d; raw_off_snbytes = e;
    raw_impl_vt = (void *)(uintptr_t)ivt;
    raw_storage_vt = (void *)(uintptr_t)svt;
    memcpy(raw_itemsize, sizes, 256);
    raw_ok = configured && TensorType != NULL;
    return PyBool_FromLong(raw_ok);
}

/* raw_sizes(t) -> (nbytes, storage key, storage nbytes) from the reader, or None (for tests). */
static PyObject *
raw_sizes(PyObject *mod, PyObject *t)
{
    long long n, sn;
    void *key;
    if (!raw_tensor(t, &n, &key, &sn))
        Py_RETURN_NONE;
    return Py_BuildValue("(LNL)", n, PyLong_FromVoidPtr(key), sn);
}

/* (storage key, storage nbytes), as _values._storage_of gives it. New reference or NULL. */
static PyObject *
pair_of(void *key, long long nbytes)
{
    PyObject *k = PyLong_FromVoidPtr(key), *n = k ? PyLong_FromLongLong(nbytes) : NULL;
    PyObject *pair = n ? PyTuple_New(2) : NULL;
    if (UNLIKELY(pair == NULL)) {
        Py_XDECREF(k);
        Py_XDECREF(n);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, k);
    PyTuple_SET_ITEM(pair, 1, n);
    return pair;
}

/* The Measure of a (Tensor, Tensor) pair from the reader; NULL (no error) when it cannot. */
static PyObject *
measure_kv_raw(PyObject *a, PyObject *b)
{
    long long na, nb, sna, snb;
    void *ka, *kb;
    if (UNLIKELY(!raw_tensor(a, &na, &ka, &sna) || !raw_tensor(b, &nb, &kb, &snb)))
        return NULL;
    PyObject *logical = PyLong_FromLongLong(na + nb);
    PyObject *sa = pair_of(ka, sna);
    PyObject *sb = ka == kb ? NULL : pair_of(kb, snb);
    PyObject *storages = NULL, *m = NULL;
    if (UNLIKELY(logical == NULL || sa == NULL || (ka != kb && sb == NULL)))
        goto fail;
    storages = ka == kb ? PyTuple_Pack(1, sa) : PyTuple_Pack(2, sa, sb);
    if (UNLIKELY(storages == NULL || (m = new_tuple_of(MeasureType, 5)) == NULL))
        goto fail;
    PyTuple_SET_ITEM(m, 0, logical);
    PyTuple_SET_ITEM(m, 1, storages);
    PyTuple_SET_ITEM(m, 2, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(m, 3, Py_NewRef(s_tuple2));
    PyTuple_SET_ITEM(m, 4, Py_NewRef(Py_False));
    PyObject_GC_UnTrack(sa);   /* numbers only: no cycles (see make_record) */
    if (sb != NULL)
        PyObject_GC_UnTrack(sb);
    PyObject_GC_UnTrack(storages);
    PyObject_GC_UnTrack(m);
    Py_DECREF(sa);
    Py_XDECREF(sb);
    return m;
fail:
    PyErr_Clear();
    Py_XDECREF(logical);
    Py_XDECREF(sa);
    Py_XDECREF(sb);
    Py_XDECREF(storages);
    return NULL;
}

/* Measure of a (Tensor, Tensor) tuple without shapes (summary None: reports that need them
 * re-measure the value they hold). NULL with no error set: not that shape, use measure(). */
static PyObject *
measure_kv(PyObject *value)
{
    if (UNLIKELY(!PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 2))
        return NULL;
    PyObject *a = PyTuple_GET_ITEM(value, 0), *b = PyTuple_GET_ITEM(value, 1);
    if (UNLIKELY(Py_TYPE(a) != TensorType || Py_TYPE(b) != TensorType))
        return NULL;
    PyObject *raw = measure_kv_raw(a, b);
    if (raw != NULL)
        return raw;
    PyObject *na = PyObject_GetAttr(a, s_nbytes);
    PyObject *nb = na ? PyObject_GetAttr(b, s_nbytes) : NULL;
    PyObject *sa = nb ? storage_of(a) : NULL;
    PyObject *sb = sa ? storage_of(b) : NULL;
    PyObject *logical = NULL, *storages = NULL, *m = NULL;
    if (UNLIKELY(sb == NULL))
        goto fail;
    logical = PyNumber_Add(na, nb);
    if (UNLIKELY(logical == NULL))
        goto fail;
    int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(sa, 0), PyTuple_GET_ITEM(sb, 0), Py_EQ);
    if (UNLIKELY(same < 0))
        goto fail;
    storages = same ? PyTuple_Pack(1, sa) : PyTuple_Pack(2, sa, sb);
    if (UNLIKELY(storages == NULL))
        goto fail;
    m = new_tuple_of(MeasureType, 5);
    if (UNLIKELY(m == NULL))
        goto fail;
    PyTuple_SET_ITEM(m, 0, logical);
    PyTuple_SET_ITEM(m, 1, storages);
    PyTuple_SET_ITEM(m, 2, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(m, 3, Py_NewRef(s_tuple2));
    PyTuple_SET_ITEM(m, 4, Py_NewRef(Py_False));
    Py_DECREF(na);
    Py_DECREF(nb);
    Py_DECREF(sa);
    Py_DECREF(sb);
    return m;
fail:
    PyErr_Clear();   /* exotic tensors: measure() has the per-tensor fallbacks */
    Py_XDECREF(na);
    Py_XDECREF(nb);
    Py_XDECREF(sa);
    Py_XDECREF(sb);
    Py_XDECREF(logical);
    Py_XDECREF(storages);
    return NULL;
}


/* ------------------------------------------------------------------ compact op entries
 *
 * The timeline and each queue's provenance hold their ops as Entry structs, not OpRecord
 * tuples: an op writes a few words into a ring slot and allocates nothing, and an entry that
 * leaves the ring frees nothing but its references to long-lived strings. OpRecords are built
 * from entries when Python reads them (reports, tracing's batches, timeline()); an entry keeps
 * the record it built, so reading it twice gives the same object. An op recorded by the Python
 * path, or while a sink wants on_op, is kept as its OpRecord (`rec`). */
typedef struct {
    PyObject *rec;        /* the OpRecord, or NULL: the compact fields below */
    PyObject *op, *name, *family, *owner, *site, *producer;   /* strong references */
    PyObject *value;      /* the Measure (or None), or NULL: a (k, v) measure from nst/skey/snb */
    long long seq, step, depth, logical, storage;   /* depth < 0: None */
    double t;
    int nst;              /* distinct storages of a compact measure (1 or 2) */
    void *skey[2];
    long long snb[2];
} Entry;

static void
entry_release(Entry *e)
{
    Py_CLEAR(e->rec);
    Py_CLEAR(e->op);
    Py_CLEAR(e->name);
    Py_CLEAR(e->family);
    Py_CLEAR(e->owner);
    Py_CLEAR(e->site);
    Py_CLEAR(e->producer);
    Py_CLEAR(e->value);
}

/* The Measure of an entry (new reference): its object, or one built from the compact fields. */
static PyObject *
entry_measure(Entry *e)
{
    if (e->value != NULL)
        return Py_NewRef(e->value);
    PyObject *logical = PyLong_FromLongLong(e->logical);
    PyObject *storages = logical ? PyTuple_New(e->nst) : NULL;
    PyObject *m = storages ? new_tuple_of(MeasureType, 5) : NULL;
    if (UNLIKELY(m == NULL)) {
        Py_XDECREF(logical);
        Py_XDECREF(storages);
        return NULL;
    }
    PyTuple_SET_ITEM(m, 0, logical);
    PyTuple_SET_ITEM(m, 1, storages);
    PyTuple_SET_ITEM(m, 2, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(m, 3, Py_NewRef(s_tuple2));
    PyTuple_SET_ITEM(m, 4, Py_NewRef(Py_False));
    for (int i = 0; i < e->nst; i++) {
        PyObject *pair = pair_of(e->skey[i], e->snb[i]);
        if (UNLIKELY(pair == NULL)) {
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(storages, i, pair);
    }
    return m;
}

/* The OpRecord of an entry (new reference), built once and kept. */
static PyObject *
entry_record(Entry *e)
{
    if (e->rec != NULL)
        return Py_NewRef(e->rec);
    PyObject *seq = PyLong_FromLongLong(e->seq);
    PyObject *t = PyFloat_FromDouble(e->t);
    PyObject *step = PyLong_FromLongLong(e->step);
    PyObject *d = e->depth < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(e->depth);
    PyObject *lg = PyLong_FromLongLong(e->logical), *sg = PyLong_FromLongLong(e->storage);
    PyObject *m = entry_measure(e);
    PyObject *rec = (seq && t && step && d && lg && sg && m) ? new_tuple_of(RecordType, 14) : NULL;
    if (UNLIKELY(rec == NULL)) {
        Py_XDECREF(seq);
        Py_XDECREF(t);
        Py_XDECREF(step);
        Py_XDECREF(d);
        Py_XDECREF(lg);
        Py_XDECREF(sg);
        Py_XDECREF(m);
        return NULL;
    }
    PyTuple_SET_ITEM(rec, 0, seq);
    PyTuple_SET_ITEM(rec, 1, t);
    PyTuple_SET_ITEM(rec, 2, step);
    PyTuple_SET_ITEM(rec, 3, Py_NewRef(e->op));
    PyTuple_SET_ITEM(rec, 4, Py_NewRef(e->name));
    PyTuple_SET_ITEM(rec, 5, Py_NewRef(e->family));
    PyTuple_SET_ITEM(rec, 6, Py_NewRef(e->owner));
    PyTuple_SET_ITEM(rec, 7, Py_NewRef(e->site));
    PyTuple_SET_ITEM(rec, 8, d);
    PyTuple_SET_ITEM(rec, 9, lg);
    PyTuple_SET_ITEM(rec, 10, sg);
    PyTuple_SET_ITEM(rec, 11, m);
    PyTuple_SET_ITEM(rec, 12, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(rec, 13, Py_NewRef(e->producer));
    Py_XSETREF(e->value, Py_NewRef(m));   /* the pop of this item shares the Measure */
    e->rec = Py_NewRef(rec);
    return rec;
}

/* Fill a released entry with an op's fields (new references are taken). */
static inline void
entry_fill(Entry *e, PyObject *op, PyObject *name, PyObject *family, PyObject *owner,
           PyObject *site, PyObject *producer, long long seq, long long step, long long depth,
           double t)
{
    e->op = Py_NewRef(op);
    e->name = Py_NewRef(name);
    e->family = Py_NewRef(family);
    e->owner = Py_NewRef(owner);
    e->site = Py_NewRef(site);
    e->producer = Py_NewRef(producer);
    e->seq = seq;
    e->step = step;
    e->depth = depth;
    e->t = t;
}

static void
entry_copy(Entry *dst, const Entry *src)
{
    *dst = *src;
    Py_XINCREF(dst->rec);
    Py_XINCREF(dst->op);
    Py_XINCREF(dst->name);
    Py_XINCREF(dst->family);
    Py_XINCREF(dst->owner);
    Py_XINCREF(dst->site);
    Py_XINCREF(dst->producer);
    Py_XINCREF(dst->value);
}

/* An entry holding an OpRecord the Python path made. */
static int
entry_box(Entry *e, PyObject *rec)
{
    if (!PyObject_TypeCheck(rec, RecordType)) {
        PyErr_SetString(PyExc_TypeError, "cachescope: the timeline holds OpRecords only");
        return -1;
    }
    memset(e, 0, sizeof(*e));
    e->rec = Py_NewRef(rec);
    return 0;
}

static long long
entry_seq(Entry *e)
{
    if (e->rec == NULL)
        return e->seq;
    return PyLong_AsLongLong(PyTuple_GET_ITEM(e->rec, 0));
}

/* ------------------------------------------------------------------ the timeline ring */

typedef struct {
    PyObject_HEAD
    Py_ssize_t cap, start, len;
    unsigned long long version;   /* moves on every change: iterators check it */
    Entry *e;
} Timeline;

static PyTypeObject TimelineType, TimelineIterType;

/* The slot for the next op (released; the oldest entry leaves when the ring is full). */
static inline Entry *
timeline_slot(Timeline *tl)
{
    Entry *e;
    tl->version++;
    if (tl->len == tl->cap) {
        e = &tl->e[tl->start];
        entry_release(e);
        tl->start = tl->start + 1 == tl->cap ? 0 : tl->start + 1;
    }
    else {
        Py_ssize_t i = tl->start + tl->len;
        e = &tl->e[i >= tl->cap ? i - tl->cap : i];
        tl->len++;
    }
    return e;
}

static Entry *
timeline_at(Timeline *tl, Py_ssize_t i)
{
    Py_ssize_t j = tl->start + i;
    return &tl->e[j >= tl->cap ? j - tl->cap : j];
}

static PyObject *
Timeline_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"maxlen", NULL};
    Py_ssize_t cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:Timeline", kw, &cap))
        return NULL;
    if (cap < 1 || cap > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "Timeline(maxlen): 1 <= maxlen <= 2**24");
        return NULL;
    }
    Timeline *tl = (Timeline *)type->tp_alloc(type, 0);
    if (tl == NULL)
        return NULL;
    tl->e = PyMem_Calloc((size_t)cap, sizeof(Entry));
    if (tl->e == NULL) {
        Py_DECREF(tl);
        return PyErr_NoMemory();
    }
    tl->cap = cap;
    return (PyObject *)tl;
}

static void
timeline_clear_all(Timeline *tl)
{
    /* release from a copy: a string freed here cannot reach this timeline again, but keep the
     * ring consistent whatever a destructor does */
    Py_ssize_t n = tl->len;
    tl->version++;
    tl->len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t j = tl->start + i;
        entry_release(&tl->e[j >= tl->cap ? j - tl->cap : j]);
    }
    tl->start = 0;
}

static void
Timeline_dealloc(Timeline *tl)
{
    if (tl->e != NULL) {
        timeline_clear_all(tl);
        PyMem_Free(tl->e);
        tl->e = NULL;
    }
    Py_TYPE(tl)->tp_free((PyObject *)tl);
}

static PyObject *
Timeline_append(Timeline *tl, PyObject *rec)
{
    Entry tmp;
    if (entry_box(&tmp, rec) < 0)
        return NULL;
    *timeline_slot(tl) = tmp;
    Py_RETURN_NONE;
}

static PyObject *
Timeline_clear(Timeline *tl, PyObject *unused)
{
    timeline_clear_all(tl);
    Py_RETURN_NONE;
}

/* The index of the oldest entry with an op number above `last` (tl->len if none; -1 with an
 * error set). */
static Py_ssize_t
timeline_first_after(Timeline *tl, long long last)
{
    Py_ssize_t first = tl->len;
    while (first > 0) {
        long long s = entry_seq(timeline_at(tl, first - 1));
        if (s == -1 && PyErr_Occurred())
            return -1;
        if (s <= last)
            break;
        first--;
    }
    return first;
}

/* A string the tracer may use as an attribute value unchanged: an exact str of at most `limit`
 * characters (anything else goes to Python, which cuts or converts it). */
static inline int
plain_str(PyObject *s, Py_ssize_t limit)
{
    return PyUnicode_CheckExact(s) && PyUnicode_GET_LENGTH(s) <= limit;
}

/* events_since(last, upto, keys, state_key, mark, limit) -> (first_seq, items)
 *
 * The tracer's batch of op events, built from compact entries without making their OpRecords:
 * for each op with last < seq <= upto, oldest first, an item (op, attributes, timestamp_ns) in
 * the form TracingSink._op_event gives Span.add_event, or the OpRecord itself where that method
 * must decide (an entry the Python path recorded, a string it would cut). A violation-free
 * `set` of `state_key` or `mark` (mark_step's name) has no item: it opens a step, whose span
 * shows it.
 * keys: the attribute names (queue, family, seq, owner, depth, bytes.logical, bytes.storage,
 * producer). first_seq: the seq of the oldest op after `last` still in the ring, 0 if none. */
static PyObject *
Timeline_events_since(Timeline *tl, PyObject *args)
{
    long long last, upto;
    PyObject *keys, *state_key, *mark;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "LLO!OOn", &last, &upto, &PyTuple_Type, &keys, &state_key, &mark,
                          &limit))
        return NULL;
    if (PyTuple_GET_SIZE(keys) != 8) {
        PyErr_SetString(PyExc_ValueError, "events_since: keys must hold 8 attribute names");
        return NULL;
    }
    PyObject *k_queue = PyTuple_GET_ITEM(keys, 0), *k_family = PyTuple_GET_ITEM(keys, 1),
             *k_seq = PyTuple_GET_ITEM(keys, 2), *k_owner = PyTuple_GET_ITEM(keys, 3),
             *k_depth = PyTuple_GET_ITEM(keys, 4), *k_logical = PyTuple_GET_ITEM(keys, 5),
             *k_storage = PyTuple_GET_ITEM(keys, 6), *k_producer = PyTuple_GET_ITEM(keys, 7);
    Py_ssize_t first = timeline_first_after(tl, last);
    if (first < 0)
        return NULL;
    long long first_seq = 0;
    if (first < tl->len) {
        first_seq = entry_seq(timeline_at(tl, first));
        if (first_seq == -1 && PyErr_Occurred())
            return NULL;
    }
    PyObject *items = PyList_New(0);
    if (items == NULL)
        return NULL;
    for (Py_ssize_t i = first; i < tl->len; i++) {
        Entry *e = timeline_at(tl, i);
        PyObject *item = NULL;
        if (e->rec != NULL) {
            long long s = entry_seq(e);
            if (s == -1 && PyErr_Occurred())
                goto fail;
            if (s > upto)
                break;
            item = Py_NewRef(e->rec);
        }
        else {
            if (e->seq > upto)
                break;
            if (e->op == s_set) {
                int boundary = PyObject_RichCompareBool(e->name, state_key, Py_EQ);
                if (boundary == 0)
                    boundary = PyObject_RichCompareBool(e->name, mark, Py_EQ);
                if (boundary < 0)
                    goto fail;
                if (boundary)
                    continue;
            }
            int own_producer = 0;
            if (e->producer != Py_None && e->producer != e->owner) {
                own_producer = PyObject_RichCompareBool(e->producer, e->owner, Py_EQ);
                if (own_producer < 0)
                    goto fail;
                own_producer = !own_producer;   /* 1: a producer the event names */
            }
            if (!plain_str(e->name, limit) || !PyUnicode_CheckExact(e->family)
                || (e->owner != Py_None && !plain_str(e->owner, limit))
                || (own_producer && !plain_str(e->producer, limit))) {
                item = entry_record(e);   /* the tracer cuts or converts it */
            }
            else {
                PyObject *attrs = PyDict_New(), *v;
                if (attrs == NULL)
                    goto fail;
#define SET_ATTR(key, value) \
                if ((v = (value)) == NULL || PyDict_SetItem(attrs, key, v) < 0) { \
                    Py_XDECREF(v); Py_DECREF(attrs); goto fail; } \
                Py_DECREF(v);
                SET_ATTR(k_queue, Py_NewRef(e->name));
                SET_ATTR(k_family, Py_NewRef(e->family));
                SET_ATTR(k_seq, PyLong_FromLongLong(e->seq));
                if (e->owner != Py_None) {
                    SET_ATTR(k_owner, Py_NewRef(e->owner));
                }
                if (e->depth >= 0) {
                    SET_ATTR(k_depth, PyLong_FromLongLong(e->depth));
                }
                if (e->logical) {
                    SET_ATTR(k_logical, PyLong_FromLongLong(e->logical));
                    if (e->storage != e->logical) {
                        SET_ATTR(k_storage, PyLong_FromLongLong(e->storage));
                    }
                }
                if (own_producer) {
                    SET_ATTR(k_producer, Py_NewRef(e->producer));
                }
#undef SET_ATTR
                PyObject *ts = PyLong_FromDouble(e->t * 1e9);
                item = ts ? PyTuple_New(3) : NULL;
                if (item == NULL) {
                    Py_XDECREF(ts);
                    Py_DECREF(attrs);
                    goto fail;
                }
                PyTuple_SET_ITEM(item, 0, Py_NewRef(e->op));
                PyTuple_SET_ITEM(item, 1, attrs);
                PyTuple_SET_ITEM(item, 2, ts);
            }
        }
        if (item == NULL)
            goto fail;
        int rc = PyList_Append(items, item);
        Py_DECREF(item);
        if (rc < 0)
            goto fail;
    }
    return Py_BuildValue("(LN)", first_seq, items);
fail:
    Py_DECREF(items);
    return NULL;
}

static Py_ssize_t Timeline_len(Timeline *tl) { return tl->len; }

static PyObject *
Timeline_item(Timeline *tl, Py_ssize_t i)
{
    if (i < 0 || i >= tl->len) {
        PyErr_SetString(PyExc_IndexError, "timeline index out of range");
        return NULL;
    }
    return entry_record(timeline_at(tl, i));
}

typedef struct {
    PyObject_HEAD
    Timeline *tl;
    Py_ssize_t i;
    int step;                     /* +1 forward, -1 reversed */
    unsigned long long version;
} TimelineIter;

static PyObject *
timeline_iter(Timeline *tl, int reverse)
{
    TimelineIter *it = PyObject_New(TimelineIter, &TimelineIterType);
    if (it == NULL)
        return NULL;
    it->tl = (Timeline *)Py_NewRef(tl);
    it->step = reverse ? -1 : 1;
    it->i = reverse ? tl->len - 1 : 0;
    it->version = tl->version;
    return (PyObject *)it;
}

static PyObject *Timeline_iter(Timeline *tl) { return timeline_iter(tl, 0); }
static PyObject *Timeline_reversed(Timeline *tl, PyObject *unused) { return timeline_iter(tl, 1); }

static PyObject *
TimelineIter_next(TimelineIter *it)
{
    if (it->tl->version != it->version) {
        PyErr_SetString(PyExc_RuntimeError, "timeline mutated during iteration");
        return NULL;
    }
    if (it->i < 0 || it->i >= it->tl->len)
        return NULL;
    PyObject *r = entry_record(timeline_at(it->tl, it->i));
    it->i += it->step;
    return r;
}

static void
TimelineIter_dealloc(TimelineIter *it)
{
    Py_DECREF(it->tl);
    PyObject_Free(it);
}

static PyObject *Timeline_maxlen(Timeline *tl, void *c) { return PyLong_FromSsize_t(tl->cap); }

static PyMethodDef Timeline_methods[] = {
    {"append", (PyCFunction)Timeline_append, METH_O, "append(record): add an OpRecord"},
    {"clear", (PyCFunction)Timeline_clear, METH_NOARGS, "clear(): drop every entry"},
    {"events_since", (PyCFunction)Timeline_events_since, METH_VARARGS,
     "events_since(last, upto, keys, state_key, mark, limit): the tracer's op events after op last"},
    {"__reversed__", (PyCFunction)Timeline_reversed, METH_NOARGS, NULL},
    {NULL}
};

static PyGetSetDef Timeline_getset[] = {
    {"maxlen", (getter)Timeline_maxlen, NULL, "capacity of the ring", NULL},
    {NULL}
};

static PySequenceMethods Timeline_seq = {
    .sq_length = (lenfunc)Timeline_len,
    .sq_item = (ssizeargfunc)Timeline_item,
};

static PyTypeObject TimelineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.Timeline",
    .tp_basicsize = sizeof(Timeline),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The last maxlen ops of a cache, oldest first: a ring of compact entries that reads "
              "as OpRecords (the deque interface the cache uses: append, clear, len, [i], "
              "iteration, reversed, maxlen).",
    .tp_new = Timeline_new,
    .tp_dealloc = (destructor)Timeline_dealloc,
    .tp_iter = (getiterfunc)Timeline_iter,
    .tp_methods = Timeline_methods,
    .tp_getset = Timeline_getset,
    .tp_as_sequence = &Timeline_seq,
};

static PyTypeObject TimelineIterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.TimelineIterator",
    .tp_basicsize = sizeof(TimelineIter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)TimelineIter_dealloc,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)TimelineIter_next,
};

/* ------------------------------------------------------------------ queue provenance */

/* The push entries of one live queue not yet popped, oldest first, and how many pops it has
 * seen (the C counterpart of _records._Queue, with the same interface). */
typedef struct {
    PyObject_HEAD
    Py_ssize_t pops;
    Py_ssize_t head, len, cap;
    Entry *e;
} Queue;

static PyTypeObject CQueueType;

static PyObject *
Queue_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!_PyArg_NoPositional("Queue", args) || !_PyArg_NoKeywords("Queue", kwds))
        return NULL;
    return type->tp_alloc(type, 0);
}

/* A released slot at the tail (NULL with MemoryError set). */
static Entry *
queue_slot(Queue *q)
{
    if (q->head + q->len == q->cap) {
        if (q->head > 0) {   /* slide the live entries to the front */
            memmove(q->e, q->e + q->head, (size_t)q->len * sizeof(Entry));
            q->head = 0;
        }
        else {
            Py_ssize_t cap = q->cap < 4 ? 4 : q->cap * 2;
            Entry *n = PyMem_Realloc(q->e, (size_t)cap * sizeof(Entry));
            if (n == NULL) {
                PyErr_NoMemory();
                return NULL;
            }
            q->e = n;
            q->cap = cap;
        }
    }
    Entry *e = &q->e[q->head + q->len];
    q->len++;
    return e;
}

/* Drop the head entry (its references are the caller's to release or keep). */
static inline void
queue_advance(Queue *q)
{
    q->head++;
    if (--q->len == 0)
        q->head = 0;
}

static void
Queue_dealloc(Queue *q)
{
    Py_ssize_t n = q->len, h = q->head;
    q->len = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        entry_release(&q->e[h + i]);
    PyMem_Free(q->e);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static PyObject *
Queue_append(Queue *q, PyObject *rec)
{
    Entry tmp;
    if (entry_box(&tmp, rec) < 0)
        return NULL;
    Entry *e = queue_slot(q);
    if (e == NULL) {
        entry_release(&tmp);
        return NULL;
    }
    *e = tmp;
    Py_RETURN_NONE;
}

static PyObject *
Queue_popleft(Queue *q, PyObject *unused)
{
    if (q->len == 0) {
        PyErr_SetString(PyExc_IndexError, "pop from an empty queue");
        return NULL;
    }
    Entry *e = &q->e[q->head];
    PyObject *r = entry_record(e);
    if (r == NULL)
        return NULL;
    Entry tmp = *e;
    queue_advance(q);
    entry_release(&tmp);
    return r;
}

static PyObject *
Queue_items(Queue *q, void *c)
{
    PyObject *out = PyList_New(q->len);
    for (Py_ssize_t i = 0; out != NULL && i < q->len; i++) {
        PyObject *r = entry_record(&q->e[q->head + i]);
        if (r == NULL)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, i, r);
    }
    return out;
}

static Py_ssize_t Queue_len(Queue *q) { return q->len; }

static PyMethodDef Queue_methods[] = {
    {"append", (PyCFunction)Queue_append, METH_O, "append(record): a push not yet popped"},
    {"popleft", (PyCFunction)Queue_popleft, METH_NOARGS, "popleft(): the oldest push record"},
    {NULL}
};

static PyMemberDef Queue_members[] = {
    {"pops", T_PYSSIZET, offsetof(Queue, pops), 0, "pops this queue has seen"},
    {NULL}
};

static PyGetSetDef Queue_getset[] = {
    {"items", (getter)Queue_items, NULL, "the push records not yet popped, oldest first (a copy)", NULL},
    {NULL}
};

static PySequenceMethods Queue_seq = {
    .sq_length = (lenfunc)Queue_len,
};

static PyTypeObject CQueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.Queue",
    .tp_basicsize = sizeof(Queue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Provenance of one live queue: the pushes not yet popped (compact entries).",
    .tp_new = Queue_new,
    .tp_dealloc = (destructor)Queue_dealloc,
    .tp_methods = Queue_methods,
    .tp_members = Queue_members,
    .tp_getset = Queue_getset,
    .tp_as_sequence = &Queue_seq,
};

/* Record a set or clear in the timeline; while a sink wants ops, its OpRecord (new reference in
 * *rec, else NULL). */
static int
record_plain(Hot *h, PyObject *op, PyObject *key, PyObject *fs, PyObject *owner, PyObject *site,
             PyObject **rec)
{
    Entry *te = timeline_slot((Timeline *)h->timeline);
    entry_fill(te, op, key, SLOT(fs, off_fs_family), owner, site, Py_None, h->seq, h->step_index,
               -1, now());
    te->value = Py_NewRef(Py_None);
    te->logical = te->storage = 0;
    te->nst = 0;
    *rec = NULL;
    if (h->op_sinks) {
        *rec = entry_record(te);
        return *rec == NULL ? -1 : 0;
    }
    return 0;
}

static void
dispatch_op(Hot *h, PyObject *cache, PyObject *rec)
{
    PyObject *args[3] = {cache, s_on_op, rec};
    PyObject *r = PyObject_Vectorcall(h->emit, args, 3, NULL);
    if (r == NULL)
        PyErr_WriteUnraisable(h->emit);   /* _emit already swallows sink errors */
    Py_XDECREF(r);
}

static int
step_note(Hot *h, Py_ssize_t off_set, PyObject *name)
{
    PyObject *step = h->step;
    if (UNLIKELY(step == Py_None || step == NULL))
        return 0;
    if (UNLIKELY(!PyObject_TypeCheck(step, StepType)))
        return -1;
    if (UNLIKELY(slot_add(step, off_st_ops, 1) < 0))
        return -1;
    /* Every layer pushes (pops) the same queue name in a step: remember the last name added
     * to this step's set and skip adding an equal one again. */
    PyObject **last = off_set == off_st_pushed ? &h->last_pushed : &h->last_popped;
    if (h->memo_step == step && *last != NULL &&
        (*last == name || (((PyASCIIObject *)*last)->hash == ((PyASCIIObject *)name)->hash &&
                           PyUnicode_Compare(*last, name) == 0)))
        return 0;
    PyObject *names = SLOT(step, off_set);
    if (names != NULL && PySet_Check(names) && PySet_GET_SIZE(names) < STEP_MEMORY) {
        if (UNLIKELY(PySet_Add(names, name) < 0))
            return -1;
        if (h->memo_step != step) {
            Py_XSETREF(h->memo_step, Py_NewRef(step));   /* strong: its address cannot be reused */
            Py_CLEAR(h->last_pushed);
            Py_CLEAR(h->last_popped);
        }
        Py_XSETREF(*last, Py_NewRef(name));
    }
    return 0;
}

/* The C path's pops go to a pending array of (name, owner) references, and into the step_pops
 * set only when Python reads it (the Python path's pop, the step_pops getter) or the array is
 * full: a step boundary drops them unread, so a decode builds no key tuple. The set ends up as
 * if each pop had added its key at once (cleared when it reached STEP_MEMORY). */
static void
sp_drop(Hot *h)
{
    Py_ssize_t n = h->sp_len;
    h->sp_len = 0;
    for (Py_ssize_t i = 0; i < 2 * n; i++)
        Py_DECREF(h->sp[i]);
}

static int
sp_flush(Hot *h)
{
    int bad = 0;
    PyObject *set = h->step_pops;
    for (Py_ssize_t i = 0; i < h->sp_len && !bad; i++) {
        PyObject *key = PyTuple_Pack(2, h->sp[2 * i], h->sp[2 * i + 1]);
        if (key == NULL || set == NULL || !PySet_Check(set)) {
            Py_XDECREF(key);
            bad = 1;
            break;
        }
        PyObject_GC_UnTrack(key);   /* two strings (or None): no cycles */
        if (PySet_GET_SIZE(set) >= STEP_MEMORY)
            PySet_Clear(set);
        bad = PySet_Add(set, key) < 0;
        Py_DECREF(key);
    }
    sp_drop(h);
    return bad ? -1 : 0;
}

static int
sp_note(Hot *h, PyObject *name, PyObject *owner)
{
    if (UNLIKELY(h->sp_len == h->sp_cap)) {
        if (h->sp_cap >= 256) {
            if (sp_flush(h) < 0)
                return -1;
        }
        else {
            Py_ssize_t cap = h->sp_cap ? 2 * h->sp_cap : 16;
            PyObject **n = PyMem_Realloc(h->sp, (size_t)(2 * cap) * sizeof(PyObject *));
            if (n == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            h->sp = n;
            h->sp_cap = cap;
        }
    }
    h->sp[2 * h->sp_len] = Py_NewRef(name);
    h->sp[2 * h->sp_len + 1] = Py_NewRef(owner);
    h->sp_len++;
    return 0;
}

/* list.pop(0) of a non-empty list, without the generic slice code (the list keeps its
 * capacity): the first item, a new reference. */
static PyObject *
list_pop_front(PyObject *list)
{
    PyListObject *l = (PyListObject *)list;
    Py_ssize_t n = Py_SIZE(l);
    PyObject *first = l->ob_item[0];
    memmove(&l->ob_item[0], &l->ob_item[1], (size_t)(n - 1) * sizeof(PyObject *));
    Py_SET_SIZE(l, n - 1);
    return first;   /* the list's reference, now the caller's */
}

/* ------------------------------------------------------------------ the three fast paths */

/* The family of a new queue name under the default normaliser, as _families.default_family
 * computes it (strip trailing ids: `(?:[_.:/-]?\d+)+$`), when that is an existing family with
 * plain characters; its FamilyStats is memoised in fs_memo as _fstats does. NULL with no error:
 * ask Python (another normaliser, a new family, odd characters). A new reference otherwise. */
static PyObject *
default_family_stats(Hot *h, PyObject *name)
{
    if (!h->default_families || h->families_seen == NULL || !PyAnySet_Check(h->families_seen) ||
        h->stats == NULL || !PyUnicode_IS_ASCII(name))
        return NULL;
    const char *c = (const char *)PyUnicode_DATA(name);
    Py_ssize_t pos = PyUnicode_GET_LENGTH(name);
#define DIGIT(ch) ((ch) >= '0' && (ch) <= '9')
#define SEP(ch) ((ch) == '_' || (ch) == '.' || (ch) == ':' || (ch) == '/' || (ch) == '-')
    while (pos > 0 && DIGIT(c[pos - 1])) {   /* groups of digits, each after an optional separator */
        while (pos > 0 && DIGIT(c[pos - 1]))
            pos--;
        if (pos > 0 && SEP(c[pos - 1]))
            pos--;
    }
#undef SEP
    if (UNLIKELY(pos == 0 || pos > MAX_LABEL_LEN))
        return NULL;
    for (Py_ssize_t i = 0; i < pos; i++) {   /* characters _UNSAFE would replace */
        char ch = c[i];
        if (!(DIGIT(ch) || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_' ||
              ch == '.' || ch == ':' || ch == '-'))
            return NULL;
    }
#undef DIGIT
    PyObject *family = PyUnicode_FromStringAndSize(c, pos);
    if (UNLIKELY(family == NULL))
        return NULL;
    int known = PySet_Contains(h->families_seen, family);
    PyObject *families = known > 0 ? PyObject_GetAttr(h->stats, s_families) : NULL;
    PyObject *fs = families && PyDict_CheckExact(families) ?
        PyDict_GetItemWithError(families, family) : NULL;
    Py_DECREF(family);
    Py_XDECREF(families);   /* the stats object holds it: fs stays valid */
    if (UNLIKELY(fs == NULL || !PyObject_TypeCheck(fs, FamilyStatsType))) {
        PyErr_Clear();
        return NULL;
    }
    Py_INCREF(fs);
    if (PyDict_GET_SIZE(h->fs_memo) >= FS_MEMO_SIZE)   /* bounded, as in _fstats */
        PyDict_Clear(h->fs_memo);
    if (UNLIKELY(PyDict_SetItem(h->fs_memo, name, fs) < 0)) {
        Py_DECREF(fs);
        return NULL;
    }
    return fs;
}

/* FamilyStats of a queue name (new reference): the memo, else InstrumentedCache._fstats.
 * On a memo miss, NULL with no error (take the Python path) unless the op can succeed here:
 * `_fstats` creates the family, which the Python path does not do when the seed's op raises
 * (a push or pop of a plain value, e.g. state_ids after reset()). `nonempty_list`: pop needs
 * a non-empty list; push a list or no value. */
static PyObject *
family_stats(Hot *h, PyObject *cache, PyObject *name, int nonempty_list)
{
    PyObject *fs = PyDict_GetItemWithError(h->fs_memo, name);
    if (fs != NULL)
        return Py_NewRef(fs);
    if (UNLIKELY(PyErr_Occurred()))
        return NULL;
    PyObject *cur = nonempty_list == 2 ? NULL : PyDict_GetItemWithError(h->cache, name);
    if (nonempty_list == 2)   /* set: any value; the caller checked the old one */
        ;
    else if (cur == NULL ? (PyErr_Occurred() || nonempty_list)
                    : (!PyList_CheckExact(cur) || (nonempty_list && PyList_GET_SIZE(cur) == 0)))
        return NULL;
    PyObject *fast = default_family_stats(h, name);
    if (fast != NULL || PyErr_Occurred())
        return fast;
    return PyObject_CallMethodOneArg(cache, h->fstats, name);
}

/* The Python method, with the same arguments (args[0] is the cache). */
static PyObject *__attribute__((cold, noinline))
slow(PyObject *fn, PyObject *const *all, Py_ssize_t nall, PyObject *kwnames)
{
    return PyObject_Vectorcall(fn, all, nall, kwnames);
}

/* A (Tensor, Tensor) push measured from the raw reader into the entry's compact fields: 1 done,
 * 0 not that shape (or not readable: the API or measure() does it). */
static int
measure_kv_compact(PyObject *value, Entry *e)
{
    if (UNLIKELY(!PyTuple_CheckExact(value) || PyTuple_GET_SIZE(value) != 2))
        return 0;
    long long na, nb, sna, snb;
    void *ka, *kb;
    if (UNLIKELY(!raw_tensor(PyTuple_GET_ITEM(value, 0), &na, &ka, &sna) ||
                 !raw_tensor(PyTuple_GET_ITEM(value, 1), &nb, &kb, &snb)))
        return 0;
    e->value = NULL;
    e->logical = na + nb;
    e->skey[0] = ka;
    e->snb[0] = sna;
    if (ka == kb) {
        e->nst = 1;
        e->storage = sna;
    }
    else {
        e->nst = 2;
        e->skey[1] = kb;
        e->snb[1] = snb;
        e->storage = sna + snb;
    }
    return 1;
}

/* The measure of a pushed value as an entry's fields: compact, or a Measure object (value,
 * logical and storage set). 0: done; -1: take the Python path (error cleared). */
static int
measure_push(Hot *h, PyObject *value, Entry *e)
{
    if (LIKELY(!h->full_measure) && measure_kv_compact(value, e))
        return 0;
    PyObject *m = h->full_measure ? NULL : measure_kv(value);
    if (m == NULL) {
        m = PyObject_CallOneArg(h->measure, value);
        if (UNLIKELY(m == NULL || !PyObject_TypeCheck(m, MeasureType)))
            goto fail;
    }
    e->value = m;
    e->nst = 0;
    e->logical = PyLong_AsLongLong(PyTuple_GET_ITEM(m, 0));
    if (UNLIKELY(e->logical == -1 && PyErr_Occurred()))
        goto fail;
    PyObject *storages = PyTuple_GET_ITEM(m, 1);
    if (UNLIKELY(!PyTuple_Check(storages)))
        goto fail;
    long long sum = 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(storages); i++) {
        PyObject *pair = PyTuple_GET_ITEM(storages, i);
        if (UNLIKELY(!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2))
            goto fail;
        long long n = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
        if (UNLIKELY((n == -1 && PyErr_Occurred()) || __builtin_add_overflow(sum, n, &sum)))
            goto fail;   /* beyond 64 bits: Python integers, on the Python path */
    }
    e->storage = sum;
    return 0;
fail:
    PyErr_Clear();
    Py_XDECREF(m);
    e->value = NULL;
    return -1;
}

static PyObject *
Hot_push(Hot *h, PyObject *const *all, Py_ssize_t nall, PyObject *kwnames)
{
    PyObject *cache = all[0];
    PyObject *const *args = all + 1;
    Py_ssize_t nargs = nall - 1;
    if (UNLIKELY(!h->enabled || nargs != 2 || kwnames != NULL || !PyUnicode_CheckExact(args[0])))
        return slow(h->slow_push, all, nall, kwnames);
    PyObject *name = args[0], *value = args[1];
    PyObject *owner = NULL, *site = NULL;
    int found = attribute(h, &owner, &site, 0);
    if (UNLIKELY(found <= 0)) {
        PyErr_Clear();
        return slow(h->slow_push, all, nall, kwnames);
    }
    Entry m;   /* the measure: compact fields, or a Measure in m.value */
    if (UNLIKELY(measure_push(h, value, &m) < 0)) {
        Py_DECREF(owner);
        Py_DECREF(site);
        return slow(h->slow_push, all, nall, kwnames);
    }
    PyObject *result = NULL, *rec = NULL;
    if (UNLIKELY(lock(h) < 0))
        goto done;
    /* everything that can send us back to Python happens before the cache changes */
    PyObject *fs = family_stats(h, cache, name, 0);
    PyObject *queue = fs ? PyDict_GetItemWithError(h->cache, name) : NULL;
    PyObject *q = fs ? PyDict_GetItemWithError(h->queues, name) : NULL;
    if (UNLIKELY(PyErr_Occurred() || fs == NULL || !PyObject_TypeCheck(fs, FamilyStatsType) ||
                 (queue != NULL && !PyList_CheckExact(queue)) ||
                 (q != NULL && Py_TYPE(q) != &CQueueType))) {
        Py_XDECREF(fs);
        unlock(h);
        PyErr_Clear();
        result = slow(h->slow_push, all, nall, kwnames);
        goto done;
    }
    int existed = queue != NULL;
    if (!existed) {
        queue = PyList_New(0);
        if (UNLIKELY(queue == NULL || PyDict_SetItem(h->cache, name, queue) < 0)) {
            Py_XDECREF(queue);
            Py_DECREF(fs);
            unlock(h);
            goto done;
        }
        Py_DECREF(queue);   /* the dict holds it */
    }
    if (UNLIKELY(PyList_Append(queue, value) < 0)) {
        Py_DECREF(fs);
        unlock(h);
        goto done;
    }
    /* the seed's push is done: from here on a failure is reported, never raised */
    Py_ssize_t depth = PyList_GET_SIZE(queue);
    int bad = 0;
    FC(fs)->push += 1;
    if (depth == 1) {
        if (existed && --FC(fs)->empty < 0)
            FC(fs)->empty = 0;
        FC(fs)->live += 1;
    }
    h->seq += 1;
    Entry *te = timeline_slot((Timeline *)h->timeline);
    entry_fill(te, s_push, name, SLOT(fs, off_fs_family), owner, site, Py_None, h->seq,
               h->step_index, depth, now());
    te->value = Py_XNewRef(m.value);
    te->logical = m.logical;
    te->storage = m.storage;
    te->nst = m.nst;
    te->skey[0] = m.skey[0];
    te->skey[1] = m.skey[1];
    te->snb[0] = m.snb[0];
    te->snb[1] = m.snb[1];
    if (q == NULL) {
        q = CQueueType.tp_alloc(&CQueueType, 0);
        bad = q == NULL || PyDict_SetItem(h->queues, name, q) < 0;
        Py_XDECREF(q);   /* the dict holds it */
    }
    Entry *qe = bad ? NULL : queue_slot((Queue *)q);
    if (qe == NULL)
        bad = 1;
    else
        entry_copy(qe, te);
    if (!bad && h->op_sinks) {   /* a sink gets the record now: the entries keep that object */
        rec = entry_record(te);
        if (rec == NULL)
            bad = 1;
        else
            Py_XSETREF(qe->rec, Py_NewRef(rec));
    }
    if (!bad)
        bad = (m.value == NULL ? hold_kv(fs, m.logical, m.nst, m.skey, m.snb)
                               : hold(fs, m.logical, PyTuple_GET_ITEM(m.value, 1))) < 0;
    if (!bad)
        bad = step_note(h, off_st_pushed, name) < 0;
    Py_DECREF(fs);
    unlock(h);
    if (bad)
        report(name);
    else if (rec != NULL)
        dispatch_op(h, cache, rec);
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(rec);
    Py_XDECREF(m.value);
    Py_DECREF(owner);
    Py_DECREF(site);
    return result;
}

/* Whether a push record of the Python path can be popped here: its byte counts fit in 64 bits
 * and its value is a Measure. 0 yes, -1 no (no error set). */
static int
boxed_push_ok(Entry *e)
{
    PyObject *rec = e->rec;
    if (rec == NULL || !PyObject_TypeCheck(rec, RecordType) || PyTuple_GET_SIZE(rec) != 14 ||
        !PyObject_TypeCheck(PyTuple_GET_ITEM(rec, 11), MeasureType) ||
        !PyTuple_Check(PyTuple_GET_ITEM(PyTuple_GET_ITEM(rec, 11), 1)))
        return -1;
    int overflow = 0;
    PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(rec, 9), &overflow);
    if (overflow || PyErr_Occurred())
        goto no;
    PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(rec, 10), &overflow);
    if (overflow || PyErr_Occurred())
        goto no;
    return 0;
no:
    PyErr_Clear();
    return -1;
}

static PyObject *
Hot_pop(Hot *h, PyObject *const *all, Py_ssize_t nall, PyObject *kwnames)
{
    PyObject *cache = all[0];
    PyObject *const *args = all + 1;
    Py_ssize_t nargs = nall - 1;
    if (UNLIKELY(!h->enabled || nargs != 1 || kwnames != NULL || !PyUnicode_CheckExact(args[0])))
        return slow(h->slow_pop, all, nall, kwnames);
    PyObject *name = args[0];
    PyObject *owner = NULL, *site = NULL;
    int found = attribute(h, &owner, &site, 0);
    if (UNLIKELY(found <= 0)) {
        PyErr_Clear();
        return slow(h->slow_pop, all, nall, kwnames);
    }
    PyObject *result = NULL, *rec = NULL, *fs = NULL;
    if (UNLIKELY(lock(h) < 0))
        goto done;
    fs = family_stats(h, cache, name, 1);
    PyObject *queue = fs ? PyDict_GetItemWithError(h->cache, name) : NULL;
    PyObject *q = fs ? PyDict_GetItemWithError(h->queues, name) : NULL;
    Entry *he = NULL;   /* the provenance of the item this pop takes: a compact push entry */
    if (LIKELY(!PyErr_Occurred() && fs != NULL && PyObject_TypeCheck(fs, FamilyStatsType) &&
               queue != NULL && PyList_CheckExact(queue) && PyList_GET_SIZE(queue) > 0 &&
               q != NULL && Py_TYPE(q) == &CQueueType && ((Queue *)q)->len > 0)) {
        he = &((Queue *)q)->e[((Queue *)q)->head];
        if (UNLIKELY(he->op == NULL) && boxed_push_ok(he) < 0)   /* the Python path's record */
            he = NULL;
    }
    int same = 0;
    if (he != NULL) {
        PyObject *producer = he->op ? he->owner : PyTuple_GET_ITEM(he->rec, 6);
        if (producer == owner || producer == Py_None || owner == Py_None)
            same = 1;
        else if (PyUnicode_CheckExact(producer) && PyUnicode_CheckExact(owner))
            same = PyUnicode_Compare(producer, owner) == 0;
    }
    if (UNLIKELY(!same)) {   /* a violation, or something unusual: the Python path decides */
        Py_CLEAR(fs);
        unlock(h);
        PyErr_Clear();
        result = slow(h->slow_pop, all, nall, kwnames);
        goto done;
    }
    Entry head = *he;   /* its references are ours now */
    if (head.op == NULL) {   /* a record: the fields the pop needs */
        head.owner = Py_NewRef(PyTuple_GET_ITEM(head.rec, 6));
        head.value = Py_NewRef(PyTuple_GET_ITEM(head.rec, 11));
        head.logical = PyLong_AsLongLong(PyTuple_GET_ITEM(head.rec, 9));
        head.storage = PyLong_AsLongLong(PyTuple_GET_ITEM(head.rec, 10));
        head.nst = 0;
    }
    Py_INCREF(q);
    queue_advance((Queue *)q);
    ((Queue *)q)->pops += 1;
    result = list_pop_front(queue);     /* the seed's pop(0) */
    Py_ssize_t depth = PyList_GET_SIZE(queue);
    int bad = 0;
    FC(fs)->pop += 1;
    if (depth == 0) {
        if (--FC(fs)->live < 0)
            FC(fs)->live = 0;
        FC(fs)->empty += 1;
    }
    if (((Queue *)q)->len == 0)
        bad = PyDict_DelItem(h->queues, name) < 0;   /* drained: free the bookkeeping */
    Py_DECREF(q);
    if (!bad)
        bad = (head.value == NULL ? release_kv(fs, head.logical, head.nst, head.skey)
                                  : release(fs, head.logical, PyTuple_GET_ITEM(head.value, 1))) < 0;
    h->seq += 1;
    Entry *te = timeline_slot((Timeline *)h->timeline);
    entry_fill(te, s_pop, name, SLOT(fs, off_fs_family), owner, site, head.owner, h->seq,
               h->step_index, depth, now());
    te->value = head.value;   /* moved: the pop shares the push's measure */
    head.value = NULL;
    te->logical = head.logical;
    te->storage = head.storage;
    te->nst = head.nst;
    te->skey[0] = head.skey[0];
    te->skey[1] = head.skey[1];
    te->snb[0] = head.snb[0];
    te->snb[1] = head.snb[1];
    if (head.rec != NULL && te->value == NULL)   /* read as a record already: share its Measure */
        te->value = Py_NewRef(PyTuple_GET_ITEM(head.rec, 11));
    entry_release(&head);
    if (!bad && h->op_sinks) {
        rec = entry_record(te);
        bad = rec == NULL;
    }
    if (!bad)
        bad = sp_note(h, name, owner) < 0;
    if (!bad)
        bad = step_note(h, off_st_popped, name) < 0;
    unlock(h);
    if (bad)
        report(name);
    else if (rec != NULL)
        dispatch_op(h, cache, rec);
done:
    Py_XDECREF(fs);
    Py_XDECREF(rec);
    Py_DECREF(owner);
    Py_DECREF(site);
    return result;
}

static PyObject *
Hot_get(Hot *h, PyObject *const *all, Py_ssize_t nall, PyObject *kwnames)
{
    PyObject *cache = all[0];
    (void)cache;
    PyObject *const *args = all + 1;
    Py_ssize_t nargs = nall - 1;
    if (UNLIKELY(!h->enabled || nargs < 1 || nargs > 2 || kwnames != NULL || !PyUnicode_CheckExact(args[0])))
        return slow(h->slow_get, all, nall, kwnames);
    PyObject *fs = PyDict_GetItemWithError(h->fs_memo, args[0]);
    if (UNLIKELY(fs == NULL || !PyObject_TypeCheck(fs, FamilyStatsType))) {
        PyErr_Clear();
        return slow(h->slow_get, all, nall, kwnames);
    }
    Py_INCREF(fs);
    if (UNLIKELY(lock(h) < 0)) {
        Py_DECREF(fs);
        return NULL;
    }
    FC(fs)->get += 1;
    unlock(h);
    Py_DECREF(fs);
    PyObject *v = PyDict_GetItemWithError(h->cache, args[0]);
    if (v == NULL) {
        if (UNLIKELY(PyErr_Occurred()))
            return NULL;
        return Py_NewRef(nargs == 2 ? args[1] : Py_None);
    }
    return Py_NewRef(v);
}

/* ------------------------------------------------------------------ the type */

static int
Hot_traverse(Hot *h, visitproc visit, void *arg)
{
    Py_VISIT(h->cache);
    Py_VISIT(h->queues);
    Py_VISIT(h->fs_memo);
    Py_VISIT(h->timeline);
    Py_VISIT(h->labels);
    Py_VISIT(h->local);
    Py_VISIT(h->astate);
    Py_VISIT(h->lock);
    Py_VISIT(h->acquire);
    Py_VISIT(h->release);
    Py_VISIT(h->slow_push);
    Py_VISIT(h->slow_pop);
    Py_VISIT(h->slow_get);
    Py_VISIT(h->slow_set);
    Py_VISIT(h->slow_end_step);
    Py_VISIT(h->slow_clear);
    Py_VISIT(h->cleared);
    Py_VISIT(h->state_key);
    Py_VISIT(h->families_seen);
    Py_VISIT(h->fstats);
    Py_VISIT(h->emit);
    Py_VISIT(h->measure);
    Py_VISIT(h->short_path);
    Py_VISIT(h->step);
    Py_VISIT(h->step_pops);
    Py_VISIT(h->memo_step);
    Py_VISIT(h->durations);
    Py_VISIT(h->stats);
    return 0;
}

static int
Hot_clear(Hot *h)
{
    Py_CLEAR(h->cache);
    Py_CLEAR(h->queues);
    Py_CLEAR(h->fs_memo);
    Py_CLEAR(h->timeline);
    Py_CLEAR(h->labels);
    Py_CLEAR(h->local);
    Py_CLEAR(h->astate);
    Py_CLEAR(h->lock);
    Py_CLEAR(h->acquire);
    Py_CLEAR(h->release);
    Py_CLEAR(h->slow_push);
    Py_CLEAR(h->slow_pop);
    Py_CLEAR(h->slow_get);
    Py_CLEAR(h->slow_set);
    Py_CLEAR(h->slow_end_step);
    Py_CLEAR(h->slow_clear);
    Py_CLEAR(h->cleared);
    Py_CLEAR(h->state_key);
    Py_CLEAR(h->families_seen);
    Py_CLEAR(h->fstats);
    Py_CLEAR(h->emit);
    Py_CLEAR(h->measure);
    Py_CLEAR(h->short_path);
    Py_CLEAR(h->step);
    Py_CLEAR(h->step_pops);
    sp_drop(h);
    PyMem_Free(h->sp);
    h->sp = NULL;
    h->sp_cap = 0;
    Py_CLEAR(h->memo_step);
    Py_CLEAR(h->last_pushed);
    Py_CLEAR(h->last_popped);
    Py_CLEAR(h->durations);
    Py_CLEAR(h->stats);
    for (int i = 0; i < MEMO_SIZE; i++) {
        Py_CLEAR(h->memo[i].code);
        Py_CLEAR(h->memo[i].site);
    }
    for (int i = 0; i < LABEL_MEMO_SIZE; i++)
        Py_CLEAR(h->label_memo[i].entry);
    return 0;
}

static void
Hot_dealloc(Hot *h)
{
    PyObject_GC_UnTrack(h);
    Hot_clear(h);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static int
Hot_init(Hot *h, PyObject *args, PyObject *kwds)
{
    static char *kw[] = {"cache_dict", "queues", "fs_memo", "timeline", "labels", "local",
                         "astate", "lock", "slow_push", "slow_pop", "slow_get", "slow_set",
                         "slow_end_step", "fstats", "emit", "measure", "short_path", NULL};
    PyObject *cache_dict, *queues, *fs_memo, *timeline, *labels, *local, *astate, *lk;
    PyObject *sp, *so, *sg, *sset, *send, *fstats, *emit, *measure, *short_path;
    if (!configured) {
        PyErr_SetString(PyExc_RuntimeError, "cachescope._speedups.configure() was not called");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!OO!OOOOOOOOOOOO", kw,
                                     &PyDict_Type, &cache_dict, &PyDict_Type, &queues,
                                     &PyDict_Type, &fs_memo, &timeline, &PyDict_Type, &labels,
                                     &local, &astate, &lk, &sp, &so, &sg, &sset, &send, &fstats,
                                     &emit, &measure,
                                     &short_path))
        return -1;
    if (!PyObject_TypeCheck(astate, AttribStateType)) {
        PyErr_SetString(PyExc_TypeError, "astate must be an AttribState");
        return -1;
    }
    if (Py_TYPE(timeline) != &TimelineType) {
        PyErr_SetString(PyExc_TypeError, "timeline must be a _speedups.Timeline");
        return -1;
    }
    Hot_clear(h);
    h->lock = Py_NewRef(lk);
    h->acquire = PyObject_GetAttrString(lk, "acquire");
    h->release = PyObject_GetAttrString(lk, "release");
    if (h->acquire == NULL || h->release == NULL)
        return -1;
    h->cache = Py_NewRef(cache_dict);
    h->queues = Py_NewRef(queues);
    h->fs_memo = Py_NewRef(fs_memo);
    h->timeline = Py_NewRef(timeline);
    h->labels = Py_NewRef(labels);
    h->local = Py_NewRef(local);
    h->astate = Py_NewRef(astate);
    h->slow_push = Py_NewRef(sp);
    h->slow_pop = Py_NewRef(so);
    h->slow_get = Py_NewRef(sg);
    h->slow_set = Py_NewRef(sset);
    h->slow_end_step = Py_NewRef(send);
    h->fstats = Py_NewRef(fstats);
    h->emit = Py_NewRef(emit);
    h->measure = Py_NewRef(measure);
    h->short_path = Py_NewRef(short_path);
    h->step = Py_NewRef(Py_None);
    h->step_pops = PySet_New(NULL);
    if (h->step_pops == NULL)
        return -1;
    h->seq = 0;
    h->step_index = -1;
    h->enabled = 1;
    return 0;
}

static int
set_dict_member(PyObject **field, PyObject *value, PyTypeObject *type, const char *what)
{
    if (value == NULL || !PyObject_TypeCheck(value, type)) {
        PyErr_Format(PyExc_TypeError, "%s must be a %s", what, type->tp_name);
        return -1;
    }
    Py_XSETREF(*field, Py_NewRef(value));
    return 0;
}

static PyObject *Hot_get_cache(Hot *h, void *c) { return Py_NewRef(h->cache); }
static int Hot_set_cache(Hot *h, PyObject *v, void *c)
{
    return set_dict_member(&h->cache, v, &PyDict_Type, "cache_dict");
}
static PyObject *Hot_get_step_pops(Hot *h, void *c)
{
    if (h->sp_len && sp_flush(h) < 0)
        return NULL;
    return Py_NewRef(h->step_pops);
}
static int Hot_set_step_pops(Hot *h, PyObject *v, void *c)
{
    if (set_dict_member(&h->step_pops, v, &PySet_Type, "step_pops") < 0)
        return -1;
    sp_drop(h);
    return 0;
}
static PyObject *Hot_get_step(Hot *h, void *c) { return Py_NewRef(h->step); }
static int Hot_set_step(Hot *h, PyObject *v, void *c)
{
    if (v == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete step");
        return -1;
    }
    if (v != Py_None && !PyObject_TypeCheck(v, StepType)) {
        PyErr_SetString(PyExc_TypeError, "step must be a StepInfo or None");
        return -1;
    }
    Py_XSETREF(h->step, Py_NewRef(v));
    return 0;
}

static PyGetSetDef Hot_getset[] = {
    {"cache_dict", (getter)Hot_get_cache, (setter)Hot_set_cache, NULL, NULL},
    {"step_pops", (getter)Hot_get_step_pops, (setter)Hot_set_step_pops, NULL, NULL},
    {"step", (getter)Hot_get_step, (setter)Hot_set_step, NULL, NULL},
    {NULL}
};

static PyMemberDef Hot_members[] = {
    {"seq", T_LONGLONG, offsetof(Hot, seq), 0, NULL},
    {"step_index", T_LONGLONG, offsetof(Hot, step_index), 0, NULL},
    {"op_sinks", T_INT, offsetof(Hot, op_sinks), 0, NULL},
    {"full_measure", T_INT, offsetof(Hot, full_measure), 0, NULL},
    {"enabled", T_INT, offsetof(Hot, enabled), 0, NULL},
    {"step_sinks", T_INT, offsetof(Hot, step_sinks), 0, NULL},
    {"durations", T_OBJECT, offsetof(Hot, durations), 0, NULL},
    {"stats", T_OBJECT, offsetof(Hot, stats), 0, NULL},
    {"slow_clear", T_OBJECT, offsetof(Hot, slow_clear), 0, NULL},
    {"cleared", T_OBJECT, offsetof(Hot, cleared), 0, NULL},
    {"state_key", T_OBJECT, offsetof(Hot, state_key), 0, NULL},
    {"families_seen", T_OBJECT, offsetof(Hot, families_seen), 0, NULL},
    {"default_families", T_INT, offsetof(Hot, default_families), 0, NULL},
    {"loop_ends_steps", T_INT, offsetof(Hot, loop_ends_steps), 0, NULL},
    {NULL}
};

/* lookup(skip): (owner, site) of the frame `skip` levels above the Python caller, as
 * Attributor.lookup(skip); None when only the Python path can tell (e.g. a new module). */
static PyObject *
Hot_lookup(Hot *h, PyObject *arg)
{
    long skip = PyLong_AsLong(arg);
    if (skip == -1 && PyErr_Occurred())
        return NULL;
    PyObject *owner = NULL, *site = NULL;
    int found = attribute(h, &owner, &site, (int)skip);
    if (found < 0) {
        PyErr_Clear();
        found = 0;
    }
    if (found == 0)
        Py_RETURN_NONE;
    PyObject *r = PyTuple_Pack(2, owner, site);
    Py_DECREF(owner);
    Py_DECREF(site);
    return r;
}

static PyMethodDef Hot_methods[] = {
    {"lookup", (PyCFunction)Hot_lookup, METH_O,
     "lookup(skip): (owner, site) as Attributor.lookup(skip), or None to ask it"},
    {NULL}
};

static PyTypeObject HotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.Hot",
    .tp_basicsize = sizeof(Hot),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Fast path of one InstrumentedCache's push, pop and get.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Hot_init,
    .tp_dealloc = (destructor)Hot_dealloc,
    .tp_traverse = (traverseproc)Hot_traverse,
    .tp_clear = (inquiry)Hot_clear,
    .tp_methods = Hot_methods,
    .tp_members = Hot_members,
    .tp_getset = Hot_getset,
};

/* set(key, value) of a key that is not the state key: the seed's set, counted and recorded,
 * when neither the old nor the new value is a queue (list). */
static PyObject *
plain_set(Hot *h, PyObject *const *all, Py_ssize_t nall)
{
    PyObject *cache = all[0], *key = all[1], *value = all[2];
    if (UNLIKELY(PyList_CheckExact(value)))
        return slow(h->slow_set, all, nall, NULL);
    PyObject *owner = NULL, *site = NULL;
    int found = attribute(h, &owner, &site, 0);
    if (UNLIKELY(found <= 0)) {
        PyErr_Clear();
        return slow(h->slow_set, all, nall, NULL);
    }
    PyObject *result = NULL, *rec = NULL, *fs = NULL;
    if (UNLIKELY(lock(h) < 0))
        goto done;
    PyObject *old = PyDict_GetItemWithError(h->cache, key);
    fs = (old == NULL && PyErr_Occurred()) || (old != NULL && PyList_CheckExact(old)) ? NULL
         : family_stats(h, cache, key, 2);
    if (UNLIKELY(fs == NULL || !PyObject_TypeCheck(fs, FamilyStatsType))) {
        Py_CLEAR(fs);
        unlock(h);
        PyErr_Clear();
        result = slow(h->slow_set, all, nall, NULL);
        goto done;
    }
    if (PyDict_SetItem(h->cache, key, value) < 0) {   /* the seed's set */
        unlock(h);
        goto done;
    }
    int bad = 0;
    FC(fs)->set += 1;
    h->seq += 1;
    if (record_plain(h, s_set, key, fs, owner, site, &rec) < 0)
        bad = 1;
    if (!bad) {
        PyObject *step = h->step;
        if (step != Py_None && PyObject_TypeCheck(step, StepType))
            bad = slot_add(step, off_st_ops, 1) < 0;
    }
    unlock(h);
    if (bad)
        report(key);
    else if (rec != NULL)
        dispatch_op(h, cache, rec);
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(rec);
    Py_XDECREF(fs);
    Py_DECREF(owner);
    Py_DECREF(site);
    return result;
}

/* clear(key): the seed's clear of a str key that holds a plain value or an empty queue with no
 * items in flight (what a decode loop's cleanup clears), counted and recorded as _clear does. */
static PyObject *
Hot_clear_op(Hot *h, PyObject *const *all, Py_ssize_t nall, PyObject *kwnames)
{
    PyObject *cache = all[0];
    if (h->slow_clear == NULL)
        return PyErr_Format(PyExc_RuntimeError, "cachescope: the fast path has no slow clear");
    if (!h->enabled || nall != 2 || kwnames != NULL || !PyUnicode_CheckExact(all[1]) ||
        h->cleared == NULL || !PyDict_CheckExact(h->cleared))
        return slow(h->slow_clear, all, nall, kwnames);
    PyObject *key = all[1];
    PyObject *owner = NULL, *site = NULL;
    int found = attribute(h, &owner, &site, 0);
    if (UNLIKELY(found <= 0)) {
        PyErr_Clear();
        return slow(h->slow_clear, all, nall, kwnames);
    }
    PyObject *result = NULL, *rec = NULL, *fs = NULL;
    if (UNLIKELY(lock(h) < 0))
        goto done;
    PyObject *old = PyDict_GetItemWithError(h->cache, key);
    int queue = old != NULL && PyList_CheckExact(old);
    fs = old == NULL ? NULL : PyDict_GetItemWithError(h->fs_memo, key);
    int unusual = fs == NULL || !PyObject_TypeCheck(fs, FamilyStatsType) ||
                  (queue && (PyList_GET_SIZE(old) != 0 || PyDict_Contains(h->queues, key) != 0));
    if (unusual) {   /* missing (KeyError), a queue with items, a new family: the Python path */
        fs = NULL;   /* borrowed */
        unlock(h);
        PyErr_Clear();
        result = slow(h->slow_clear, all, nall, kwnames);
        goto done;
    }
    Py_INCREF(fs);
    Py_INCREF(old);
    if (PyDict_DelItem(h->cache, key) < 0) {   /* the seed's clear */
        Py_DECREF(old);
        unlock(h);
        goto done;
    }
    Py_DECREF(old);   /* the value goes now, as with the seed (a tensor is freed here) */
    /* the seed's clear is done: from here on a failure is reported, never raised */
    FC(fs)->clear += 1;
    if (queue && --FC(fs)->empty < 0)   /* FamilyStats.queue_removed(0) */
        FC(fs)->empty = 0;
    h->seq += 1;
    int bad = record_plain(h, s_clear, key, fs, owner, site, &rec) < 0;
    if (!bad) {
        PyObject *step = h->step;
        if (step != Py_None && PyObject_TypeCheck(step, StepType))
            bad = slot_add(step, off_st_ops, 1) < 0;
    }
    if (!bad) {   /* _cleared: the last CLEARED_MEMORY keys cleared, oldest first */
        if (PyDict_GET_SIZE(h->cleared) >= CLEARED_MEMORY) {
            Py_ssize_t pos = 0;
            PyObject *first, *v;
            if (PyDict_Next(h->cleared, &pos, &first, &v)) {
                Py_INCREF(first);
                bad = PyDict_DelItem(h->cleared, first) < 0;
                Py_DECREF(first);
            }
        }
        PyObject *entry = bad ? NULL : Py_BuildValue("(LLOO)", h->seq, h->step_index, owner, site);
        bad = entry == NULL || PyDict_SetItem(h->cleared, key, entry) < 0;
        Py_XDECREF(entry);
    }
    unlock(h);
    if (bad)
        report(key);
    else if (rec != NULL)
        dispatch_op(h, cache, rec);
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(rec);
    Py_XDECREF(fs);
    Py_DECREF(owner);
    Py_DECREF(site);
    return result;
}

/* set(key, value): the fast path takes only the decode loop's step boundary in its usual
 * form: set(state_key, (prev, next)) after end_step() closed the previous step, with new state
 * ids and every queue the previous step popped drained (no violation is possible). */
static PyObject *
Hot_set(Hot *h, PyObject *const *all, Py_ssize_t nall, PyObject *kwnames)
{
    PyObject *cache = all[0];
    if (UNLIKELY(!h->enabled || nall != 3 || kwnames != NULL || !PyUnicode_CheckExact(all[1])))
        return slow(h->slow_set, all, nall, kwnames);
    PyObject *key = all[1], *pair = all[2];
    PyObject *state_key = h->state_key;
    int is_state = state_key != NULL && PyUnicode_CheckExact(state_key) &&
                   (key == state_key || PyUnicode_Compare(key, state_key) == 0);
    if (!is_state)
        return plain_set(h, all, nall);
    if (UNLIKELY(!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2))
        return slow(h->slow_set, all, nall, kwnames);
    /* the previous step: closed, other state ids, its popped queues drained */
    PyObject *cur = h->step;
    if (cur != Py_None) {
        if (!PyObject_TypeCheck(cur, StepType) || SLOT(cur, off_st_end) != Py_None)
            ;
        else
            return slow(h->slow_set, all, nall, kwnames);
        PyObject *prev = SLOT(cur, off_st_prev), *next = SLOT(cur, off_st_next);
        int same_prev = PyObject_RichCompareBool(prev, PyTuple_GET_ITEM(pair, 0), Py_EQ);
        int same_next = same_prev >= 0 ? PyObject_RichCompareBool(next, PyTuple_GET_ITEM(pair, 1), Py_EQ) : -1;
        if (UNLIKELY(same_prev < 0 || same_next < 0)) {
            PyErr_Clear();
            return slow(h->slow_set, all, nall, kwnames);
        }
        if (UNLIKELY(same_prev && same_next))
            return slow(h->slow_set, all, nall, kwnames);
        PyObject *popped = SLOT(cur, off_st_popped);
        if (UNLIKELY(popped == NULL || !PyAnySet_Check(popped)))
            return slow(h->slow_set, all, nall, kwnames);
        Py_ssize_t pos = 0;
        PyObject *name;
        Py_hash_t hash;
        while (_PySet_NextEntry(popped, &pos, &name, &hash)) {
            int held = PyDict_Contains(h->queues, name);
            if (UNLIKELY(held != 0)) {
                PyErr_Clear();
                return slow(h->slow_set, all, nall, kwnames);
            }
        }
    }
    PyObject *owner = NULL, *site = NULL;
    int found = attribute(h, &owner, &site, 0);
    if (UNLIKELY(found <= 0)) {
        PyErr_Clear();
        return slow(h->slow_set, all, nall, kwnames);
    }
    PyObject *result = NULL, *rec = NULL, *fs = NULL, *step = NULL;
    if (UNLIKELY(lock(h) < 0))
        goto done;
    PyObject *old = PyDict_GetItemWithError(h->cache, key);
    if (UNLIKELY(old == NULL && PyErr_Occurred())) {
        unlock(h);
        goto done;
    }
    fs = (old != NULL && PyList_CheckExact(old)) ? NULL : family_stats(h, cache, key, 2);
    if (fs == NULL || !PyObject_TypeCheck(fs, FamilyStatsType)) {   /* a queue under the state key */
        Py_CLEAR(fs);
        unlock(h);
        PyErr_Clear();
        result = slow(h->slow_set, all, nall, kwnames);
        goto done;
    }
    double start = perf_counter(), start_time = now();
    /* The closing step's StepInfo is reused when nothing but the cache holds it (no sink or
     * caller kept it): a decode allocates no StepInfo and no sets per step. */
    PyObject *pushed = NULL, *popped = NULL;
    int reuse = 0;
    if (cur != Py_None && Py_TYPE(cur) == StepType &&
        Py_REFCNT(cur) == 1 + (h->memo_step == cur)) {
        pushed = SLOT(cur, off_st_pushed);
        popped = SLOT(cur, off_st_popped);
        reuse = pushed != NULL && popped != NULL && PySet_CheckExact(pushed) &&
                PySet_CheckExact(popped) && Py_REFCNT(pushed) == 1 && Py_REFCNT(popped) == 1;
    }
    if (reuse) {
        step = Py_NewRef(cur);
        pushed = Py_NewRef(pushed);
        popped = Py_NewRef(popped);
    }
    else {
        step = StepType->tp_alloc(StepType, 0);
        pushed = step ? PySet_New(NULL) : NULL;
        popped = pushed ? PySet_New(NULL) : NULL;
    }
    if (UNLIKELY(popped == NULL)) {
        Py_XDECREF(pushed);
        unlock(h);
        goto done;
    }
    if (PyDict_SetItem(h->cache, key, pair) < 0) {   /* the seed's set */
        Py_DECREF(pushed);
        Py_DECREF(popped);
        unlock(h);
        goto done;
    }
    /* the seed's set is done: from here on a failure is reported, never raised */
    int bad = 0;
    sp_drop(h);   /* the new step starts with no pops */
    PyObject *pops;
    if (PySet_CheckExact(h->step_pops) && Py_REFCNT(h->step_pops) == 1 &&
        PySet_Clear(h->step_pops) == 0)
        pops = Py_NewRef(h->step_pops);   /* only we hold it: emptied in place */
    else
        pops = PySet_New(NULL);
    if (pops == NULL)
        bad = 1;
    FC(fs)->set += 1;
    h->seq += 1;
    if (record_plain(h, s_set, key, fs, owner, site, &rec) < 0)
        bad = 1;
    if (!bad && cur != Py_None)   /* the set is the closing step's last op, as in _record */
        bad = slot_add(cur, off_st_ops, 1) < 0;
    h->step_index += 1;
    if (reuse) {   /* emptied in place; step_note's memo of what they hold goes too */
        PySet_Clear(pushed);
        PySet_Clear(popped);
        Py_CLEAR(h->memo_step);
        Py_CLEAR(h->last_pushed);
        Py_CLEAR(h->last_popped);
    }
    Py_XSETREF(SLOT(step, off_st_index), PyLong_FromLongLong(h->step_index));
    Py_XSETREF(SLOT(step, off_st_prev), Py_NewRef(PyTuple_GET_ITEM(pair, 0)));
    Py_XSETREF(SLOT(step, off_st_next), Py_NewRef(PyTuple_GET_ITEM(pair, 1)));
    Py_XSETREF(SLOT(step, off_st_start), PyFloat_FromDouble(start));
    Py_XSETREF(SLOT(step, off_st_start_time), PyFloat_FromDouble(start_time));
    Py_XSETREF(SLOT(step, off_st_end), Py_NewRef(Py_None));
    Py_XSETREF(SLOT(step, off_st_tokens), PyLong_FromLong(0));
    Py_XSETREF(SLOT(step, off_st_ops), PyLong_FromLong(0));
    Py_XSETREF(SLOT(step, off_st_violations), PyLong_FromLong(0));
    Py_XSETREF(SLOT(step, off_st_popped), popped);
    Py_XSETREF(SLOT(step, off_st_pushed), pushed);
    if (SLOT(step, off_st_index) == NULL || SLOT(step, off_st_start) == NULL ||
        SLOT(step, off_st_start_time) == NULL || SLOT(step, off_st_tokens) == NULL ||
        SLOT(step, off_st_ops) == NULL || SLOT(step, off_st_violations) == NULL)
        bad = 1;
    Py_XSETREF(h->step, Py_NewRef(step));
    if (pops != NULL)
        Py_XSETREF(h->step_pops, pops);
    unlock(h);
    if (bad)
        report(key);
    else if (rec != NULL)
        dispatch_op(h, cache, rec);
    if (h->step_sinks & 1) {
        PyObject *r = PyObject_CallMethodNoArgs(cache, s_emit_step_start);
        if (r == NULL)
            report(cache);
        Py_XDECREF(r);
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(step);
    Py_XDECREF(rec);
    Py_XDECREF(fs);
    Py_DECREF(owner);
    Py_DECREF(site);
    return result;
}

/* end_step(tokens=0): close the current step (the decode loop calls it after its forward). */
static PyObject *
Hot_end_step(Hot *h, PyObject *const *all, Py_ssize_t nall, PyObject *kwnames)
{
    PyObject *cache = all[0];
    PyObject *tokens = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nall == 2 && nkw == 0)
        tokens = all[1];
    else if (nall == 1 && nkw == 1 &&
             PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "tokens") == 0)
        tokens = all[1];
    else if (nall == 1 && nkw == 0)
        tokens = s_zero;
    if (UNLIKELY(!h->enabled || tokens == NULL || !PyLong_CheckExact(tokens)))
        return slow(h->slow_end_step, all, nall, kwnames);
    PyObject *stats = h->stats;
    long long ntok = PyLong_AsLongLong(tokens);
    if (stats == NULL || !PyObject_TypeCheck(stats, &StepCountersType) ||
        (ntok == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return slow(h->slow_end_step, all, nall, kwnames);
    }
    if (UNLIKELY(lock(h) < 0))
        return NULL;
    PyObject *step = h->step;
    int closes = step != Py_None && PyObject_TypeCheck(step, StepType) &&
                 SLOT(step, off_st_end) == Py_None;
    int bad = 0;
    h->loop_ends_steps = 1;
    Py_INCREF(step);
    if (closes) {
        PyObject *end = PyFloat_FromDouble(perf_counter());
        if (end == NULL) {
            bad = 1;
        }
        else {
            Py_SETREF(SLOT(step, off_st_end), end);
            Py_SETREF(SLOT(step, off_st_tokens), Py_NewRef(tokens));
            ((StepCounters *)stats)->steps += 1;
            ((StepCounters *)stats)->tokens += ntok;
        }
    }
    unlock(h);
    if (bad)
        report(cache);
    int dispatch = closes && (h->step_sinks & 2);
    if (closes && !dispatch && !bad && h->durations != NULL && h->durations != Py_None) {
        /* the metrics sink's pending durations, as MetricsSink.on_step_end appends them */
        Py_ssize_t n = PyObject_Length(h->durations);
        PyObject *d = n >= 0 && n + 1 < DURATIONS_LIMIT ?
            PyFloat_FromDouble(PyFloat_AsDouble(SLOT(step, off_st_end)) -
                               PyFloat_AsDouble(SLOT(step, off_st_start))) : NULL;
        PyObject *r = d ? PyObject_CallMethodOneArg(h->durations, s_append, d) : NULL;
        Py_XDECREF(d);
        if (r == NULL) {   /* full (or odd): on_step_end folds the deque into the histogram */
            PyErr_Clear();
            dispatch = 1;
        }
        Py_XDECREF(r);
    }
    if (dispatch) {
        PyObject *args[3] = {cache, s_on_step_end, step};
        PyObject *r = PyObject_Vectorcall(h->emit, args, 3, NULL);
        if (r == NULL)
            report(h->emit);
        Py_XDECREF(r);
    }
    Py_DECREF(step);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ the method descriptor */

/* InstrumentedCache.push/pop/get: a method descriptor that runs the fast path when the
 * instance's `_hot` is an enabled Hot, else the Python method it wraps. Like a Python function
 * it binds to the instance (a bound op keeps its cache alive) and `cache.push(...)` calls it
 * without creating a bound object. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;          /* 0 push, 1 pop, 2 get, 3 set, 4 end_step, 5 clear */
    PyObject *func;    /* the Python method */
} FastOp;

static PyTypeObject *hot_type;   /* InstrumentedCache: instances keep `_hot` in a slot */
static Py_ssize_t hot_offset;

/* set_hot_slot(InstrumentedCache, its `_hot` member descriptor) */
static PyObject *
set_hot_slot(PyObject *mod, PyObject *args)
{
    PyObject *cls, *descr;
    if (!PyArg_ParseTuple(args, "O!O", &PyType_Type, &cls, &descr))
        return NULL;
    if (Py_TYPE(descr) != &PyMemberDescr_Type ||
        ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_SetString(PyExc_TypeError, "set_hot_slot: `_hot` must be a __slots__ member");
        return NULL;
    }
    Py_XSETREF(hot_type, (PyTypeObject *)Py_NewRef(cls));
    hot_offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_RETURN_NONE;
}

static PyObject *
FastOp_vectorcall(FastOp *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (LIKELY(nargs >= 1)) {
        PyObject *hot = hot_type != NULL && PyObject_TypeCheck(args[0], hot_type) ?
            *(PyObject **)((char *)args[0] + hot_offset) : NULL;
        if (hot != NULL && Py_TYPE(hot) == &HotType && ((Hot *)hot)->enabled) {
            Py_INCREF(hot);
            PyObject *r = op->kind == 0 ? Hot_push((Hot *)hot, args, nargs, kwnames)
                        : op->kind == 1 ? Hot_pop((Hot *)hot, args, nargs, kwnames)
                        : op->kind == 2 ? Hot_get((Hot *)hot, args, nargs, kwnames)
                        : op->kind == 3 ? Hot_set((Hot *)hot, args, nargs, kwnames)
                        : op->kind == 4 ? Hot_end_step((Hot *)hot, args, nargs, kwnames)
                                        : Hot_clear_op((Hot *)hot, args, nargs, kwnames);
            Py_DECREF(hot);
            return r;
        }
        if (UNLIKELY(hot == NULL && PyErr_Occurred()))
            return NULL;
    }
    return PyObject_Vectorcall(op->func, args, nargsf, kwnames);
}

static PyObject *
FastOp_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    int kind;
    PyObject *func;
    if (!PyArg_ParseTuple(args, "iO:FastOp", &kind, &func))
        return NULL;
    if (kind < 0 || kind > 5 || !PyCallable_Check(func)) {
        PyErr_SetString(PyExc_ValueError, "FastOp(kind in 0..5, callable)");
        return NULL;
    }
    FastOp *op = (FastOp *)type->tp_alloc(type, 0);
    if (op == NULL)
        return NULL;
    op->vectorcall = (vectorcallfunc)FastOp_vectorcall;
    op->kind = kind;
    op->func = Py_NewRef(func);
    return (PyObject *)op;
}

static void
FastOp_dealloc(FastOp *op)
{
    Py_CLEAR(op->func);
    Py_TYPE(op)->tp_free((PyObject *)op);
}

static PyObject *
FastOp_descr_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None)
        return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *
FastOp_getattr_of_func(FastOp *op, void *name)
{
    return PyObject_GetAttrString(op->func, (const char *)name);
}

static PyGetSetDef FastOp_getset[] = {
    {"__doc__", (getter)FastOp_getattr_of_func, NULL, NULL, "__doc__"},
    {"__name__", (getter)FastOp_getattr_of_func, NULL, NULL, "__name__"},
    {"__qualname__", (getter)FastOp_getattr_of_func, NULL, NULL, "__qualname__"},
    {"__module__", (getter)FastOp_getattr_of_func, NULL, NULL, "__module__"},
    {NULL}
};

static PyMemberDef FastOp_members[] = {
    {"__wrapped__", T_OBJECT_EX, offsetof(FastOp, func), READONLY, NULL},
    {NULL}
};

static PyTypeObject FastOpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "cachescope._speedups.FastOp",
    .tp_basicsize = sizeof(FastOp),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "InstrumentedCache.push/pop/get: the C fast path, else the Python method.",
    .tp_new = FastOp_new,
    .tp_dealloc = (destructor)FastOp_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FastOp, vectorcall),
    .tp_descr_get = FastOp_descr_get,
    .tp_getset = FastOp_getset,
    .tp_members = FastOp_members,
};

/* configure(FamilyStats, StepInfo, AttribState, OpRecord, Measure, Tensor, nn.Module) */
static int
offset_of(PyTypeObject *type, const char *name, Py_ssize_t *out)
{
    PyObject *d = PyDict_GetItemString(type->tp_dict, name);
    if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ member", type->tp_name, name);
        return -1;
    }
    PyMemberDef *def = ((PyMemberDescrObject *)d)->d_member;
    if (def->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    *out = def->offset;
    return 0;
}

static PyObject *
configure(PyObject *mod, PyObject *args)
{
    PyObject *fs, *st, *at, *rec, *meas, *tensor, *module;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!O!", &PyType_Type, &fs,
                          &PyType_Type, &st, &PyType_Type, &at, &PyType_Type, &rec,
                          &PyType_Type, &meas, &PyType_Type, &tensor, &PyType_Type, &module))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)fs, &FamilyCountersType)) {
        PyErr_SetString(PyExc_TypeError, "FamilyStats must subclass _speedups.FamilyCounters");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)rec, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)meas, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "OpRecord and Measure must be tuples");
        return NULL;
    }
    FamilyStatsType = (PyTypeObject *)fs;
    StepType = (PyTypeObject *)st;
    AttribStateType = (PyTypeObject *)at;
    if (offset_of(FamilyStatsType, "family", &off_fs_family) < 0 ||
        offset_of(StepType, "ops", &off_st_ops) < 0 ||
        offset_of(StepType, "pushed", &off_st_pushed) < 0 ||
        offset_of(StepType, "popped", &off_st_popped) < 0 ||
        offset_of(StepType, "index", &off_st_index) < 0 ||
        offset_of(StepType, "prev", &off_st_prev) < 0 ||
        offset_of(StepType, "next", &off_st_next) < 0 ||
        offset_of(StepType, "start", &off_st_start) < 0 ||
        offset_of(StepType, "start_time", &off_st_start_time) < 0 ||
        offset_of(StepType, "end", &off_st_end) < 0 ||
        offset_of(StepType, "tokens", &off_st_tokens) < 0 ||
        offset_of(StepType, "violations", &off_st_violations) < 0 ||
        offset_of(AttribStateType, "mode", &off_at_mode) < 0 ||
        offset_of(AttribStateType, "watching", &off_at_watching) < 0)
        return NULL;
    Py_INCREF(fs); Py_INCREF(st); Py_INCREF(at);
    RecordType = (PyTypeObject *)Py_NewRef(rec);
    MeasureType = (PyTypeObject *)Py_NewRef(meas);
    TensorType = (PyTypeObject *)Py_NewRef(tensor);
    ModuleType = Py_NewRef(module);
    configured = 1;
    Py_RETURN_NONE;
}

#endif  /* CS_ACCEL */

static PyMethodDef module_methods[] = {
#if CS_ACCEL
    {"configure", configure, METH_VARARGS, "Bind the Python classes the fast path updates."},
    {"set_hot_slot", set_hot_slot, METH_VARARGS, "Where InstrumentedCache instances keep `_hot`."},
    {"set_tensor_layout", set_tensor_layout, METH_VARARGS,
     "Enable (or, with None, disable) the raw tensor size reader; see cachescope/_layout.py."},
    {"raw_sizes", raw_sizes, METH_O, "(nbytes, storage key, storage nbytes) of a tensor, or None."},
#endif
    {NULL}
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "cachescope._speedups",
    "The common case of InstrumentedCache.push/pop/get in C (CPython 3.11).", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
#if CS_ACCEL
    if (PyType_Ready(&HotType) < 0 || PyType_Ready(&RLockType) < 0 ||
        PyType_Ready(&FastOpType) < 0 || PyType_Ready(&FamilyCountersType) < 0)
        return NULL;
    if (PyType_Ready(&StepCountersType) < 0 || PyType_Ready(&TimelineType) < 0 ||
        PyType_Ready(&TimelineIterType) < 0 || PyType_Ready(&CQueueType) < 0)
        return NULL;
    Py_INCREF(&TimelineType);
    if (PyModule_AddObject(m, "Timeline", (PyObject *)&TimelineType) < 0)
        return NULL;
    Py_INCREF(&CQueueType);
    if (PyModule_AddObject(m, "Queue", (PyObject *)&CQueueType) < 0)
        return NULL;
    Py_INCREF(&StepCountersType);
    if (PyModule_AddObject(m, "StepCounters", (PyObject *)&StepCountersType) < 0)
        return NULL;
    Py_INCREF(&FamilyCountersType);
    if (PyModule_AddObject(m, "FamilyCounters", (PyObject *)&FamilyCountersType) < 0)
        return NULL;
    Py_INCREF(&FastOpType);
    if (PyModule_AddObject(m, "FastOp", (PyObject *)&FastOpType) < 0)
        return NULL;
    Py_INCREF(&RLockType);
    if (PyModule_AddObject(m, "RLock", (PyObject *)&RLockType) < 0)
        return NULL;
    Py_INCREF(&HotType);
    if (PyModule_AddObject(m, "Hot", (PyObject *)&HotType) < 0)
        return NULL;
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL;
    INTERN(s_push, "push");
    INTERN(s_clear, "clear");
    INTERN(s_families, "families");
    INTERN(s_pop, "pop");
    INTERN(s_append, "append");
    INTERN(s_stack, "stack");
    INTERN(s_tuple2, "tuple[2]");
    INTERN(s_nbytes, "nbytes");
    INTERN(s_untyped_storage, "untyped_storage");
    INTERN(s_cdata, "_cdata");
    INTERN(s_on_op, "on_op");
    INTERN(s_set, "set");
    INTERN(s_emit_step_start, "_emit_step_start");
    INTERN(s_on_step_end, "on_step_end");
    if ((s_zero = PyLong_FromLong(0)) == NULL || (s_one = PyLong_FromLong(1)) == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "AVAILABLE", 1) < 0)
        return NULL;
#else
    if (PyModule_AddIntConstant(m, "AVAILABLE", 0) < 0)
        return NULL;
#endif
    return m;
}
