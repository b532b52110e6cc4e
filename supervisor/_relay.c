/* supervisor._relay: the proxy's data path, for supervisor.relay.
 *
 * An Engine owns an epoll set (its fd is watched by the event loop, on which
 * it is only ever readable) and a table of relays. Each relay joins a client
 * and a backend connection: two directions, each moving bytes socket -> pipe
 * -> socket with splice(2), so they never enter user space. Python calls
 * run() when the epoll fd is readable; run() handles every ready fd (errors
 * included: libuv would stop watching an fd on EPOLLERR) without returning to
 * Python per event, and returns the relays that ended. All the decisions
 * about connections (admission, backend, limits, logging) stay in Python;
 * this file only moves bytes, exactly as relay.py documents:
 *
 *  - a direction is reading (EPOLLIN on its source) or flushing (bytes wait in
 *    its pipe for a full destination: EPOLLOUT on the destination instead);
 *  - a pipe is held only while it holds bytes; empty ones go back to a pool;
 *  - a read shorter than the smallest pipe (64 KiB) emptied the socket, so no
 *    read is made just to see EAGAIN (the poll is level-triggered);
 *  - end of stream is passed on as shutdown(SHUT_WR); a reset (or an error)
 *    closes both sides, the other one with a reset too;
 *  - without a pipe (out of fds) or where splice is refused, a direction
 *    copies through a 64 KiB buffer.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (1 << 20)
#define DRAINED (1 << 16)
#define ROUNDS 16
#define BATCH 256
#define SMALL (1 << 14)       /* shared copy buffer */
#define SMALL_AGAIN 4096      /* a splice read below this goes back to copying */
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

typedef struct {
    int src, dst;
    int pr, pw;          /* the pipe while it holds bytes, else -1 */
    size_t pending;      /* bytes in the pipe (or buffer) not yet written */
    unsigned long long moved;
    char ended, flushing, copy;
    char bulk;           /* reads fill the socket buffer: splice; else small reads are copied */
    char *buffer;        /* copy mode */
} Dir;

typedef struct {
    int used;
    int client, backend;
    Dir up, down;        /* up: client -> backend; down: backend -> client */
    int parked;          /* an fd left out of the set after a hang-up, or -1 */
    uint32_t cmask, bmask;
    int closing;         /* 0, 1 clean, 2 reset */
} Relay;

typedef struct {
    PyObject_HEAD
    int ep;
    int pipe_size;
    int keep;
    int splice_ok;
    Relay *relays;
    Py_ssize_t cap, count;
    int *free_ids;
    Py_ssize_t nfree;
    int (*pool)[2];
    char shared[SMALL];
    int npool;
    long long created;
    PyObject *finished;  /* list of (id, received, sent, reset) during run() */
    PyObject *done;      /* called as done(id, received, sent, reset) for each relay that ended */
} Engine;

static int take_pipe(Engine *e, Dir *d) {
    if (!e->splice_ok) return -1;
    if (e->npool > 0) {
        e->npool--;
        d->pr = e->pool[e->npool][0];
        d->pw = e->pool[e->npool][1];
        return 0;
    }
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) return -1;
    (void)fcntl(p[1], F_SETPIPE_SZ, e->pipe_size);  /* a smaller pipe still works */
    e->created++;
    d->pr = p[0];
    d->pw = p[1];
    return 0;
}

static void give_pipe(Engine *e, Dir *d) {
    if (d->pr < 0) return;
    if (d->pending == 0 && e->npool < e->keep) {
        e->pool[e->npool][0] = d->pr;
        e->pool[e->npool][1] = d->pw;
        e->npool++;
    } else {
        close(d->pr);
        close(d->pw);
    }
    d->pr = d->pw = -1;
}

static int gone(int err) {
    return err == ECONNRESET || err == EPIPE || err == ETIMEDOUT || err == EHOSTUNREACH ||
           err == ENETUNREACH || err == ECONNABORTED || err == ENOTCONN;
}

static void end_of_stream(Relay *r, Dir *d) {
    d->ended = 1;
    Dir *other = d == &r->up ? &r->down : &r->up;
    if (other->ended) {
        r->closing = 1;
        return;
    }
    if (shutdown(d->dst, SHUT_WR) < 0) r->closing = 2;
}

/* Move what can be moved now; returns -1 with errno on a connection error. */
static int pump(Engine *e, Relay *r, Dir *d);

static int pump_copy(Relay *r, Dir *d) {
    if (!d->buffer && !(d->buffer = malloc(DRAINED))) { errno = ENOMEM; return -1; }
    ssize_t got = DRAINED;
    for (int i = 0; i < ROUNDS; i++) {
        if (d->pending) {
            ssize_t n = write(d->dst, d->buffer, d->pending);
            if (n < 0) {
                if (errno == EAGAIN) { d->flushing = 1; return 0; }
                return -1;
            }
            d->moved += n;
            if ((size_t)n < d->pending) {
                memmove(d->buffer, d->buffer + n, d->pending - n);
                d->pending -= n;
                d->flushing = 1;
                return 0;
            }
            d->pending = 0;
            d->flushing = 0;
            if (got < DRAINED) return 0;
        }
        if (d->ended) return 0;
        got = read(d->src, d->buffer, DRAINED);
        if (got < 0) return errno == EAGAIN ? 0 : -1;
        if (got == 0) { end_of_stream(r, d); return 0; }
        d->pending = got;
    }
    return 0;
}

/* Small messages (requests, replies) cost less copied once through a shared buffer than
 * spliced (two pipe operations); a read that fills the buffer switches the direction to
 * splice, a short splice read switches it back. What a full destination cannot take goes
 * into a pipe, and from there the splice path flushes it. */
static int pump_small(Engine *e, Relay *r, Dir *d) {
    for (int i = 0; i < ROUNDS; i++) {
        ssize_t got = read(d->src, e->shared, SMALL);
        if (got < 0) return errno == EAGAIN ? 0 : -1;
        if (got == 0) { end_of_stream(r, d); return 0; }
        ssize_t n = write(d->dst, e->shared, got);
        if (n < 0) {
            if (errno != EAGAIN) return -1;
            n = 0;
        }
        d->moved += n;
        if (n < got) {
            if (take_pipe(e, d) < 0) { errno = ENOBUFS; return -1; }
            ssize_t w = write(d->pw, e->shared + n, got - n);  /* an empty pipe holds >= 64 KiB */
            if (w != got - n) { errno = ENOBUFS; return -1; }
            d->pending = w;
            d->flushing = 1;
            d->bulk = 1;
            return 0;
        }
        if (got < SMALL) return 0;  /* drained */
        d->bulk = 1;  /* a full buffer: bulk data, splice from now on */
        return pump(e, r, d);
    }
    return 0;
}

static int pump(Engine *e, Relay *r, Dir *d) {
    if (d->copy) return pump_copy(r, d);
    if (!d->bulk && d->pending == 0 && d->pr < 0 && !d->ended) return pump_small(e, r, d);
    ssize_t got = DRAINED;
    for (int i = 0; i < ROUNDS; i++) {
        if (d->pending) {
            ssize_t n = splice(d->pr, NULL, d->dst, NULL, d->pending, SPLICE_FLAGS);
            if (n < 0) {
                if (errno == EAGAIN) { d->flushing = 1; return 0; }
                return -1;
            }
            d->pending -= n;
            d->moved += n;
            if (d->pending) { d->flushing = 1; return 0; }
            d->flushing = 0;
            if (got < DRAINED) break;
        }
        if (d->ended) break;
        if (d->pr < 0 && take_pipe(e, d) < 0) {
            d->copy = 1;  /* no pipe to be had: copy this direction */
            return pump_copy(r, d);
        }
        got = splice(d->src, NULL, d->pw, NULL, CHUNK, SPLICE_FLAGS);
        if (got < 0) {
            if (errno == EAGAIN) break;
            if ((errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) && d->pending == 0) {
                give_pipe(e, d);
                d->copy = 1;  /* this socket cannot splice */
                return pump_copy(r, d);
            }
            return -1;
        }
        if (got == 0) { end_of_stream(r, d); break; }
        d->pending = got;
        if (got < SMALL_AGAIN) d->bulk = 0;  /* after this one is written: copy small reads again */
    }
    if (!d->flushing && d->pending == 0) give_pipe(e, d);
    return 0;
}

static void set_mask(Engine *e, Relay *r, Py_ssize_t id, int fd, uint32_t *have, uint32_t want, int side) {
    if (*have == want) return;
    struct epoll_event ev = {.events = want, .data.u64 = ((uint64_t)id << 1) | side};
    epoll_ctl(e->ep, EPOLL_CTL_MOD, fd, &ev);
    *have = want;
}

static void masks(Engine *e, Relay *r, Py_ssize_t id) {
    Dir *up = &r->up, *down = &r->down;
    if (r->parked >= 0) {
        Dir *reads = r->parked == r->client ? up : down;
        if (!reads->flushing) {
            int side = r->parked == r->client ? 0 : 1;
            struct epoll_event ev = {.events = EPOLLIN, .data.u64 = ((uint64_t)id << 1) | side};
            epoll_ctl(e->ep, EPOLL_CTL_ADD, r->parked, &ev);
            if (side == 0) r->cmask = EPOLLIN; else r->bmask = EPOLLIN;
            r->parked = -1;
        }
    }
    if (r->parked != r->client)
        set_mask(e, r, id, r->client, &r->cmask,
                 ((up->flushing || up->ended) ? 0 : EPOLLIN) | (down->flushing ? EPOLLOUT : 0), 0);
    if (r->parked != r->backend)
        set_mask(e, r, id, r->backend, &r->bmask,
                 ((down->flushing || down->ended) ? 0 : EPOLLIN) | (up->flushing ? EPOLLOUT : 0), 1);
}

static void reset_on_close(int fd) {
    struct linger l = {1, 0};
    int type = 0;
    socklen_t len = sizeof type;
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0 && (ss.ss_family == AF_INET || ss.ss_family == AF_INET6) &&
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM)
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
}

/* Close relay ``id`` now; appends (id, received, sent, reset) to e->finished when it is set. */
static int finish(Engine *e, Py_ssize_t id, int reset) {
    Relay *r = &e->relays[id];
    int fds[2] = {r->client, r->backend};
    for (int i = 0; i < 2; i++) {
        if (fds[i] != r->parked) epoll_ctl(e->ep, EPOLL_CTL_DEL, fds[i], NULL);
        if (reset) reset_on_close(fds[i]);
        close(fds[i]);
    }
    give_pipe(e, &r->up);
    give_pipe(e, &r->down);
    free(r->up.buffer);
    free(r->down.buffer);
    r->used = 0;
    e->count--;
    e->free_ids[e->nfree++] = (int)id;
    if (e->finished) {
        PyObject *t = Py_BuildValue("(nKKO)", id, r->up.moved, r->down.moved, reset ? Py_True : Py_False);
        if (!t || PyList_Append(e->finished, t) < 0) { Py_XDECREF(t); return -1; }
        Py_DECREF(t);
    }
    return 0;
}

static void ready(Engine *e, Py_ssize_t id, int side, uint32_t events) {
    Relay *r = &e->relays[id];
    int fd = side ? r->backend : r->client;
    Dir *reads = side ? &r->down : &r->up, *writes = side ? &r->up : &r->down;
    if (events & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        r->closing = err ? 2 : 1;
        return;
    }
    if ((events & EPOLLOUT) && writes->flushing) {
        if (pump(e, r, writes) < 0) { r->closing = gone(errno) ? 2 : 1; return; }
    }
    if (r->closing || !(events & (EPOLLIN | EPOLLHUP))) goto out;
    if (!reads->flushing && !reads->ended) {
        if (pump(e, r, reads) < 0) { r->closing = gone(errno) ? 2 : 1; return; }
    } else if (events & EPOLLHUP) {
        if (reads->ended) { r->closing = 1; return; }
        epoll_ctl(e->ep, EPOLL_CTL_DEL, fd, NULL);  /* hang-up is reported whatever the mask: park it */
        r->parked = fd;
    }
out:
    if (!r->closing) masks(e, r, id);
}

/* ------------------------------------------------------------ Python */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"done", "pipe_size", "keep", "splice", NULL};
    int pipe_size = 1 << 18, keep = 64, splice_ok = 1;
    PyObject *done;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|iip", names, &done, &pipe_size, &keep, &splice_ok)) return NULL;
    if (!PyCallable_Check(done)) { PyErr_SetString(PyExc_TypeError, "done must be callable"); return NULL; }
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (!e) return NULL;
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    if (e->ep < 0) { Py_DECREF(e); return PyErr_SetFromErrno(PyExc_OSError); }
    Py_INCREF(done);
    e->done = done;
    e->pipe_size = pipe_size;
    e->keep = keep < 0 ? 0 : keep;
    e->splice_ok = splice_ok;
    e->pool = calloc(e->keep + 1, sizeof *e->pool);
    if (!e->pool) { Py_DECREF(e); return PyErr_NoMemory(); }
    return (PyObject *)e;
}

static void close_all(Engine *e) {
    for (Py_ssize_t i = 0; i < e->cap; i++)
        if (e->relays[i].used) finish(e, i, 0);
    for (int i = 0; i < e->npool; i++) { close(e->pool[i][0]); close(e->pool[i][1]); }
    e->npool = 0;
    if (e->ep >= 0) { close(e->ep); e->ep = -1; }
}

static void Engine_dealloc(Engine *e) {
    PyObject *f = e->finished;
    e->finished = NULL;
    Py_XDECREF(f);
    Py_CLEAR(e->done);
    close_all(e);
    free(e->relays);
    free(e->free_ids);
    free(e->pool);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_fileno(Engine *e, PyObject *unused) { return PyLong_FromLong(e->ep); }

static PyObject *Engine_add(Engine *e, PyObject *args) {
    int client, backend;
    if (!PyArg_ParseTuple(args, "ii", &client, &backend)) return NULL;
    if (e->ep < 0) { PyErr_SetString(PyExc_ValueError, "engine closed"); return NULL; }
    if (e->nfree == 0) {
        Py_ssize_t cap = e->cap ? e->cap * 2 : 64;
        Relay *rs = realloc(e->relays, cap * sizeof *rs);
        if (!rs) return PyErr_NoMemory();
        e->relays = rs;
        int *ids = realloc(e->free_ids, cap * sizeof *ids);
        if (!ids) return PyErr_NoMemory();
        e->free_ids = ids;
        for (Py_ssize_t i = cap - 1; i >= e->cap; i--) { rs[i].used = 0; ids[e->nfree++] = (int)i; }
        e->cap = cap;
    }
    Py_ssize_t id = e->free_ids[--e->nfree];
    Relay *r = &e->relays[id];
    memset(r, 0, sizeof *r);
    r->used = 1;
    r->client = client;
    r->backend = backend;
    r->parked = -1;
    r->up = (Dir){.src = client, .dst = backend, .pr = -1, .pw = -1};
    r->down = (Dir){.src = backend, .dst = client, .pr = -1, .pw = -1};
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)id << 1};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, client, &ev) < 0) goto fail;
    ev.data.u64 = ((uint64_t)id << 1) | 1;
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, backend, &ev) < 0) {
        epoll_ctl(e->ep, EPOLL_CTL_DEL, client, NULL);
        goto fail;
    }
    r->cmask = r->bmask = EPOLLIN;
    e->count++;
    return PyLong_FromSsize_t(id);
fail:
    r->used = 0;
    e->free_ids[e->nfree++] = (int)id;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *Engine_run(Engine *e, PyObject *unused) {
    PyObject *finished = PyList_New(0);
    if (!finished) return NULL;
    if (e->ep < 0) { Py_DECREF(finished); Py_RETURN_NONE; }
    e->finished = finished;
    struct epoll_event evs[BATCH];
    int n = epoll_wait(e->ep, evs, BATCH, 0);
    for (int i = 0; i < n; i++) {
        Py_ssize_t id = (Py_ssize_t)(evs[i].data.u64 >> 1);
        if (id >= e->cap || !e->relays[id].used) continue;  /* closed earlier in this batch */
        ready(e, id, (int)(evs[i].data.u64 & 1), evs[i].events);
        Relay *r = &e->relays[id];
        if (r->closing && finish(e, id, r->closing == 2) < 0) { e->finished = NULL; Py_DECREF(finished); return NULL; }
    }
    e->finished = NULL;
    /* Only now, with the table consistent, tell the owner (it may add or close relays). */
    Py_ssize_t count = e->done ? PyList_GET_SIZE(finished) : 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *r = PyObject_Call(e->done, PyList_GET_ITEM(finished, i), NULL);
        if (!r) { Py_DECREF(finished); return NULL; }
        Py_DECREF(r);
    }
    Py_DECREF(finished);
    Py_RETURN_NONE;
}

static PyObject *Engine_counts(Engine *e, PyObject *arg) {
    Py_ssize_t id = PyLong_AsSsize_t(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    if (id < 0 || id >= e->cap || !e->relays[id].used) { PyErr_SetString(PyExc_KeyError, "no such relay"); return NULL; }
    return Py_BuildValue("(KK)", e->relays[id].up.moved, e->relays[id].down.moved);
}

static PyObject *Engine_totals(Engine *e, PyObject *unused) {
    unsigned long long up = 0, down = 0;
    for (Py_ssize_t i = 0; i < e->cap; i++)
        if (e->relays[i].used) { up += e->relays[i].up.moved; down += e->relays[i].down.moved; }
    return Py_BuildValue("(KK)", up, down);
}

static PyObject *Engine_close_relay(Engine *e, PyObject *args) {
    Py_ssize_t id;
    int reset = 0;
    if (!PyArg_ParseTuple(args, "n|p", &id, &reset)) return NULL;
    if (id < 0 || id >= e->cap || !e->relays[id].used) { PyErr_SetString(PyExc_KeyError, "no such relay"); return NULL; }
    PyObject *out = Py_BuildValue("(KK)", e->relays[id].up.moved, e->relays[id].down.moved);
    if (!out) return NULL;
    finish(e, id, reset);
    return out;
}

static PyObject *Engine_close(Engine *e, PyObject *unused) {
    close_all(e);
    Py_CLEAR(e->done);  /* breaks the cycle with the owner (this type does not take part in GC) */
    Py_RETURN_NONE;
}

static PyObject *Engine_get(Engine *e, void *what) {
    switch ((intptr_t)what) {
    case 0: return PyLong_FromSsize_t(e->count);
    case 1: return PyLong_FromLongLong(e->created);
    default: return PyLong_FromLong(e->npool);
    }
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll fd the event loop watches."},
    {"add", (PyCFunction)Engine_add, METH_VARARGS, "add(client_fd, backend_fd) -> id: the engine owns both fds."},
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "Handle what is ready; calls done(id, received, sent, reset) for each relay that ended."},
    {"counts", (PyCFunction)Engine_counts, METH_O, "counts(id) -> (received, sent) so far."},
    {"totals", (PyCFunction)Engine_totals, METH_NOARGS, "(received, sent) over the open relays."},
    {"close_relay", (PyCFunction)Engine_close_relay, METH_VARARGS, "close_relay(id, reset=False) -> (received, sent)."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Close every relay, the pipes and the epoll fd."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"open", (getter)Engine_get, NULL, "relays open", (void *)0},
    {"pipes_created", (getter)Engine_get, NULL, "pipes made so far", (void *)1},
    {"pipes_free", (getter)Engine_get, NULL, "empty pipes kept", (void *)2},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "supervisor._relay.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relays between connected stream sockets, moved with splice on one epoll set.",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static struct PyModuleDef relay_module = {PyModuleDef_HEAD_INIT, "supervisor._relay",
                                          "The proxy's splice data path.", -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&relay_module);
    if (!m) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
