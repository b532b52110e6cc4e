/* supervisor._relay: the proxy's data path, for supervisor.relay.
 *
 * An Engine owns an epoll set, a table of relays and one thread of its own
 * (one per engine, never one per connection) that waits on the set and moves
 * the bytes. The thread never touches a Python object and never takes the GIL:
 * the event loop is woken only when a relay ended, through an eventfd (the
 * engine's fileno()), and then run() tells the owner which relays ended and
 * how many bytes each carried. All the decisions about connections
 * (admission, backend, limits, logging) stay in Python; this file only moves
 * bytes, as relay.py documents:
 *
 *  - each relay joins a client and a backend connection: two directions, each
 *    socket -> pipe -> socket with splice(2), so bulk bytes never enter user
 *    space; small reads (requests, replies) are copied once through a shared
 *    16 KiB buffer instead, which costs one read and one write against two
 *    splices; a read that fills the buffer switches the direction to splice,
 *    a splice read under 4 KiB switches it back;
 *  - both fds are registered once, edge-triggered, for EPOLLIN | EPOLLOUT |
 *    EPOLLRDHUP, and never modified: each side keeps "may be readable" and
 *    "may be writable" flags, set by events and cleared by EAGAIN (or by a
 *    short read(), which empties a socket), so no epoll_ctl is made while
 *    bytes flow and no read is made only to see EAGAIN on small messages;
 *  - a pipe is held only while it holds bytes; empty ones go back to a pool;
 *  - end of stream is passed on as shutdown(SHUT_WR); a reset (or an error)
 *    closes both sides, the other one with a reset too;
 *  - without a pipe (out of fds) or where splice is refused, a direction
 *    copies through a 64 KiB buffer of its own;
 *  - a direction moves at most ROUNDS chunks per turn; one with more to do is
 *    queued and resumed after the other ready fds (edge-triggered: no event
 *    would come again for it).
 *
 * Locking: one mutex guards the table. The thread holds it while it handles a
 * batch of events; Python's calls (add, counts, close_relay, ...) take it too.
 * Ended relays stay in the table (fds closed, counts kept) until run() has
 * reported them, so an id is never reused before its owner heard it ended;
 * an event carries the slot's generation, so one that was already in flight
 * for a closed relay never reaches a newer relay in the same slot.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (1 << 20)
#define COPY (1 << 16)        /* a copying direction's own buffer */
#define ROUNDS 16
#define BATCH 256
#define SMALL (1 << 14)       /* shared copy buffer */
#define SMALL_AGAIN 4096      /* a splice read below this goes back to copying */
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
#define WAKE UINT64_MAX       /* epoll data of the engine's own wake-up eventfd */

enum { FREE = 0, OPEN, ENDED };

typedef struct {
    int fd;
    char rd, wr;         /* may be readable / writable: set by events, cleared by EAGAIN */
    char hup;            /* the peer's end of stream was seen (EPOLLRDHUP): a short read leaves rd set */
} Side;

typedef struct {
    int from;            /* index of the source Side; the destination is 1 - from */
    int pr, pw;          /* the pipe while it holds bytes, else -1 */
    size_t pending;      /* bytes in the pipe (or buffer) not yet written */
    size_t off;          /* where they start in the buffer */
    unsigned long long moved;
    char ended, copy, inbuf;
    char bulk;           /* reads fill the socket buffer: splice; else small reads are copied */
    char *buffer;        /* copy mode, and what a full destination could not take of a small read */
} Dir;

typedef struct {
    int state;
    uint32_t gen;
    Side side[2];        /* 0: client, 1: backend */
    Dir up, down;        /* up: client -> backend; down: backend -> client */
    int closing;         /* 0, 1 clean, 2 reset */
    int reset;           /* how it ended (for run()) */
    char queued;         /* in the again list */
} Relay;

typedef struct {
    PyObject_HEAD
    int ep;
    int wake;            /* eventfd in the epoll set: stop the thread */
    int note;            /* eventfd the event loop watches: relays ended */
    int pipe_size;
    int keep;
    int splice_ok;
    pthread_mutex_t lock;
    pthread_t thread;
    int running;         /* the thread was started and not yet joined */
    int stop;
    Relay *relays;
    Py_ssize_t cap, count;
    int *free_ids;
    Py_ssize_t nfree;
    int *ended;          /* ids in state ENDED, not yet reported */
    Py_ssize_t nended;
    int noted;           /* note was written since the last run() */
    uint64_t *again;     /* (gen << 32 | id) of relays with more to move (2 * cap) */
    Py_ssize_t nagain;
    int (*pool)[2];
    char shared[SMALL];
    int npool;
    long long created;
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
    if ((d->pending == 0 || d->inbuf) && e->npool < e->keep) {
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
    if (shutdown(r->side[1 - d->from].fd, SHUT_WR) < 0) r->closing = 2;
}

/* Write what waits (pipe or buffer): 1 when all of it is out, 0 when the destination is full, -1 on error. */
static int flush(Relay *r, Dir *d) {
    Side *to = &r->side[1 - d->from];
    while (d->pending) {
        if (!to->wr) return 0;
        ssize_t n = d->inbuf ? write(to->fd, d->buffer + d->off, d->pending)
                             : splice(d->pr, NULL, to->fd, NULL, d->pending, SPLICE_FLAGS);
        if (n < 0) {
            if (errno == EAGAIN) { to->wr = 0; return 0; }
            if (errno == EINTR) continue;
            return -1;
        }
        d->pending -= n;
        d->moved += n;
        if (d->inbuf) d->off += n;
    }
    d->inbuf = 0;
    d->off = 0;
    return 1;
}

/* Keep what a full destination could not take, in the direction's own buffer. */
static int stash(Dir *d, const char *data, size_t len) {
    if (!d->buffer && !(d->buffer = malloc(COPY))) { errno = ENOMEM; return -1; }
    memcpy(d->buffer, data, len);
    d->pending = len;
    d->off = 0;
    d->inbuf = 1;
    return 0;
}

/* One read of the source into the destination: 1 moved something (go on), 0 nothing more to read, -1 error. */
static int move_once(Engine *e, Relay *r, Dir *d) {
    Side *from = &r->side[d->from], *to = &r->side[1 - d->from];
    if (d->copy || !d->bulk) {
        /* copy: a direction without a pipe reads into its own buffer; small reads use the shared one */
        size_t want = d->copy ? COPY : SMALL;
        char *buf = e->shared;
        if (d->copy) {
            if (!d->buffer && !(d->buffer = malloc(COPY))) { errno = ENOMEM; return -1; }
            buf = d->buffer;
        }
        ssize_t got = read(from->fd, buf, want);
        if (got < 0) {
            if (errno == EAGAIN) { from->rd = 0; return 0; }
            return errno == EINTR ? 1 : -1;
        }
        if (got == 0) { from->rd = 0; end_of_stream(r, d); return 0; }
        if ((size_t)got < want) {
            if (!from->hup) from->rd = 0;  /* a short read emptied the socket */
        } else if (!d->copy) {
            d->bulk = 1;  /* a full buffer: bulk data, splice from now on */
        }
        ssize_t n = 0;
        if (to->wr) {
            n = write(to->fd, buf, got);
            if (n < 0) {
                if (errno != EAGAIN && errno != EINTR) return -1;
                to->wr = errno == EINTR;
                n = 0;
            }
            d->moved += n;
        }
        if (n < got) {
            if (d->copy) {
                d->pending = got - n;
                d->off = n;
                d->inbuf = 1;
            } else {
                give_pipe(e, d);  /* empty: the bytes wait in the buffer */
                if (stash(d, buf + n, got - n) < 0) return -1;
            }
        }
        return from->rd;
    }
    if (d->pr < 0 && take_pipe(e, d) < 0) {
        d->copy = 1;  /* no pipe to be had: copy this direction */
        return 1;
    }
    ssize_t got = splice(from->fd, NULL, d->pw, NULL, CHUNK, SPLICE_FLAGS);
    if (got < 0) {
        if (errno == EAGAIN) { from->rd = 0; return 0; }
        if (errno == EINTR) return 1;
        if (errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP) {
            give_pipe(e, d);
            d->copy = 1;  /* this socket cannot splice */
            return 1;
        }
        return -1;
    }
    if (got == 0) { from->rd = 0; end_of_stream(r, d); return 0; }
    d->pending = got;
    if (got < SMALL_AGAIN) d->bulk = 0;  /* after this one is written: copy small reads again */
    return 1;
}

/* Move what can be moved now: 0 done (blocked or drained), 1 more to do (rounds used up), -1 error. */
static int pump(Engine *e, Relay *r, Dir *d) {
    int more = 0;
    for (int i = 0;; i++) {
        int f = flush(r, d);
        if (f < 0) return -1;
        if (f == 0) return 0;  /* destination full: its EPOLLOUT resumes this; the pipe is kept */
        if (d->ended || !r->side[d->from].rd || r->closing) break;
        if (i == ROUNDS) { more = 1; break; }
        int m = move_once(e, r, d);
        if (m < 0) return -1;
        if (m == 0 && d->pending == 0) break;
    }
    if (d->pending == 0) give_pipe(e, d);
    return more;
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

static void release(Engine *e, Py_ssize_t id) {
    Relay *r = &e->relays[id];
    r->state = FREE;
    e->free_ids[e->nfree++] = (int)id;
}

/* Close relay ``id``'s fds and pipes now; it stays ENDED (counts kept) until reported or released. */
static void finish(Engine *e, Py_ssize_t id, int reset) {
    Relay *r = &e->relays[id];
    for (int i = 0; i < 2; i++) {
        epoll_ctl(e->ep, EPOLL_CTL_DEL, r->side[i].fd, NULL);
        if (reset) reset_on_close(r->side[i].fd);
        close(r->side[i].fd);
        r->side[i].fd = -1;
    }
    give_pipe(e, &r->up);
    give_pipe(e, &r->down);
    free(r->up.buffer);
    free(r->down.buffer);
    r->up.buffer = r->down.buffer = NULL;
    r->state = ENDED;
    r->reset = reset;
    e->count--;
}

/* The engine thread ended a relay: report it through run(). */
static void ended(Engine *e, Py_ssize_t id) {
    finish(e, id, e->relays[id].closing == 2);
    e->ended[e->nended++] = (int)id;
    if (!e->noted) {
        uint64_t one = 1;
        e->noted = 1;
        if (write(e->note, &one, sizeof one) < 0) { /* already readable */ }
    }
}

static void turn(Engine *e, Py_ssize_t id) {
    Relay *r = &e->relays[id];
    int more = 0;
    for (int k = 0; k < 2 && !r->closing; k++) {
        Dir *d = k ? &r->down : &r->up;
        int m = pump(e, r, d);
        if (m < 0) { r->closing = gone(errno) ? 2 : 1; break; }
        more |= m;
    }
    if (r->closing) { ended(e, id); return; }
    if (more && !r->queued) {
        r->queued = 1;
        e->again[e->nagain++] = ((uint64_t)r->gen << 32) | (uint64_t)id;
    }
}

static void ready(Engine *e, Py_ssize_t id, int side, uint32_t events) {
    Relay *r = &e->relays[id];
    Side *s = &r->side[side];
    if (events & EPOLLERR) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
        r->closing = err ? 2 : 1;
        ended(e, id);
        return;
    }
    if (events & (EPOLLRDHUP | EPOLLHUP)) s->hup = 1;  /* no event will come again for the end */
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) s->rd = 1;
    if (events & (EPOLLOUT | EPOLLHUP)) s->wr = 1;
    turn(e, id);
}

static void *engine_thread(void *arg) {
    Engine *e = arg;
    struct epoll_event evs[BATCH];
    pthread_mutex_lock(&e->lock);
    while (!e->stop) {
        int timeout = e->nagain ? 0 : -1;
        pthread_mutex_unlock(&e->lock);
        int n = epoll_wait(e->ep, evs, BATCH, timeout);
        pthread_mutex_lock(&e->lock);
        for (int i = 0; i < n && !e->stop; i++) {
            uint64_t data = evs[i].data.u64;
            if (data == WAKE) {
                uint64_t v;
                if (read(e->wake, &v, sizeof v) < 0) { /* nothing */ }
                continue;
            }
            Py_ssize_t id = (Py_ssize_t)((data >> 1) & 0x7fffffff);
            if (id >= e->cap || e->relays[id].state != OPEN || e->relays[id].gen != (uint32_t)(data >> 32))
                continue;  /* ended (or the slot reused) since this event was taken */
            ready(e, id, (int)(data & 1), evs[i].events);
        }
        /* Relays queued with more to move; those that still have more go to the end of the list. */
        Py_ssize_t queued = e->nagain;
        for (Py_ssize_t i = 0; i < queued && !e->stop; i++) {
            uint64_t item = e->again[i];
            Py_ssize_t id = (Py_ssize_t)(item & 0xffffffff);
            if (id < e->cap && e->relays[id].state == OPEN && e->relays[id].gen == (uint32_t)(item >> 32)) {
                e->relays[id].queued = 0;
                turn(e, id);
            }
        }
        if (e->stop) break;
        memmove(e->again, e->again + queued, (size_t)(e->nagain - queued) * sizeof *e->again);
        e->nagain -= queued;
    }
    pthread_mutex_unlock(&e->lock);
    return NULL;
}

/* ------------------------------------------------------------ Python */

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"done", "pipe_size", "keep", "splice", NULL};
    int pipe_size = 1 << 20, keep = 64, splice_ok = 1;
    PyObject *done;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|iip", names, &done, &pipe_size, &keep, &splice_ok)) return NULL;
    if (!PyCallable_Check(done)) { PyErr_SetString(PyExc_TypeError, "done must be callable"); return NULL; }
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (!e) return NULL;
    e->ep = e->wake = e->note = -1;
    pthread_mutex_init(&e->lock, NULL);
    Py_INCREF(done);
    e->done = done;
    e->pipe_size = pipe_size;
    e->keep = keep < 0 ? 0 : keep;
    e->splice_ok = splice_ok;
    e->pool = calloc(e->keep + 1, sizeof *e->pool);
    if (!e->pool) { Py_DECREF(e); return PyErr_NoMemory(); }
    e->ep = epoll_create1(EPOLL_CLOEXEC);
    e->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->note = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->ep < 0 || e->wake < 0 || e->note < 0) { PyErr_SetFromErrno(PyExc_OSError); Py_DECREF(e); return NULL; }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = WAKE};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, e->wake, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(e);
        return NULL;
    }
    /* The thread starts with every signal blocked: signals are the main thread's (Python's handlers). */
    sigset_t all, was;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &was);
    int err = pthread_create(&e->thread, NULL, engine_thread, e);
    pthread_sigmask(SIG_SETMASK, &was, NULL);
    if (err) { errno = err; PyErr_SetFromErrno(PyExc_OSError); Py_DECREF(e); return NULL; }
    e->running = 1;
    return (PyObject *)e;
}

/* Stop the thread (it holds no Python state, so the GIL may stay with the caller). */
static void stop_thread(Engine *e) {
    if (!e->running) return;
    pthread_mutex_lock(&e->lock);
    e->stop = 1;
    pthread_mutex_unlock(&e->lock);
    uint64_t one = 1;
    if (write(e->wake, &one, sizeof one) < 0) { /* readable already */ }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(e->thread, NULL);
    Py_END_ALLOW_THREADS
    e->running = 0;
}

static void close_all(Engine *e) {
    stop_thread(e);
    for (Py_ssize_t i = 0; i < e->cap; i++) {
        if (e->relays[i].state == OPEN) finish(e, i, 0);
        e->relays[i].state = FREE;
    }
    e->nended = e->nagain = 0;
    for (int i = 0; i < e->npool; i++) { close(e->pool[i][0]); close(e->pool[i][1]); }
    e->npool = 0;
    int *fds[3] = {&e->ep, &e->wake, &e->note};
    for (int i = 0; i < 3; i++)
        if (*fds[i] >= 0) { close(*fds[i]); *fds[i] = -1; }
}

static void Engine_dealloc(Engine *e) {
    Py_CLEAR(e->done);
    close_all(e);
    pthread_mutex_destroy(&e->lock);
    free(e->relays);
    free(e->free_ids);
    free(e->ended);
    free(e->again);
    free(e->pool);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *Engine_fileno(Engine *e, PyObject *unused) { return PyLong_FromLong(e->note); }

static int grow(Engine *e) {
    Py_ssize_t cap = e->cap ? e->cap * 2 : 64;
    Relay *rs = realloc(e->relays, cap * sizeof *rs);
    if (!rs) return -1;
    e->relays = rs;
    int *ids = realloc(e->free_ids, cap * sizeof *ids);
    if (!ids) return -1;
    e->free_ids = ids;
    int *done = realloc(e->ended, cap * sizeof *done);
    if (!done) return -1;
    e->ended = done;
    uint64_t *again = realloc(e->again, 2 * cap * sizeof *again);  /* queued twice while resumed */
    if (!again) return -1;
    e->again = again;
    for (Py_ssize_t i = cap - 1; i >= e->cap; i--) {
        rs[i].state = FREE;
        rs[i].gen = 0;
        ids[e->nfree++] = (int)i;
    }
    e->cap = cap;
    return 0;
}

static PyObject *Engine_add(Engine *e, PyObject *args) {
    int client, backend;
    if (!PyArg_ParseTuple(args, "ii", &client, &backend)) return NULL;
    if (e->ep < 0) { PyErr_SetString(PyExc_ValueError, "engine closed"); return NULL; }
    pthread_mutex_lock(&e->lock);
    if (e->nfree == 0 && grow(e) < 0) { pthread_mutex_unlock(&e->lock); return PyErr_NoMemory(); }
    Py_ssize_t id = e->free_ids[--e->nfree];
    Relay *r = &e->relays[id];
    uint32_t gen = r->gen + 1;
    memset(r, 0, sizeof *r);
    r->state = OPEN;
    r->gen = gen;
    /* Writable until a write says otherwise; readable when the first event says so. */
    r->side[0] = (Side){.fd = client, .wr = 1};
    r->side[1] = (Side){.fd = backend, .wr = 1};
    r->up = (Dir){.from = 0, .pr = -1, .pw = -1};
    r->down = (Dir){.from = 1, .pr = -1, .pw = -1};
    uint32_t mask = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    struct epoll_event ev = {.events = mask, .data.u64 = ((uint64_t)gen << 32) | ((uint64_t)id << 1)};
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, client, &ev) < 0) goto fail;
    ev.data.u64 |= 1;
    if (epoll_ctl(e->ep, EPOLL_CTL_ADD, backend, &ev) < 0) {
        epoll_ctl(e->ep, EPOLL_CTL_DEL, client, NULL);
        goto fail;
    }
    e->count++;
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromSsize_t(id);
fail:;
    int err = errno;
    release(e, id);
    pthread_mutex_unlock(&e->lock);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* The loop calls this when fileno() is readable: report the relays that ended (the owner may add or close
 * relays from done, so it is called with the lock released). */
static PyObject *Engine_run(Engine *e, PyObject *unused) {
    if (e->note < 0) Py_RETURN_NONE;
    uint64_t v;
    if (read(e->note, &v, sizeof v) < 0) { /* nothing new */ }
    /* Copied out under the lock, reported without it: no Python code runs while the lock is held. */
    typedef struct { Py_ssize_t id; unsigned long long up, down; int reset; } Ended;
    pthread_mutex_lock(&e->lock);
    e->noted = 0;
    Py_ssize_t count = e->nended;
    Ended *out = count ? malloc(count * sizeof *out) : NULL;
    if (count && !out) { pthread_mutex_unlock(&e->lock); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < count; i++) {
        Relay *r = &e->relays[e->ended[i]];
        out[i] = (Ended){e->ended[i], r->up.moved, r->down.moved, r->reset};
        release(e, e->ended[i]);
    }
    e->nended = 0;
    pthread_mutex_unlock(&e->lock);
    PyObject *done = e->done;
    Py_XINCREF(done);
    for (Py_ssize_t i = 0; i < count && done; i++) {
        PyObject *r = PyObject_CallFunction(done, "nKKO", out[i].id, out[i].up, out[i].down,
                                            out[i].reset ? Py_True : Py_False);
        if (!r) { free(out); Py_DECREF(done); return NULL; }
        Py_DECREF(r);
    }
    free(out);
    Py_XDECREF(done);
    Py_RETURN_NONE;
}

static int known(Engine *e, Py_ssize_t id) {
    if (id < 0 || id >= e->cap || e->relays[id].state == FREE) {
        PyErr_SetString(PyExc_KeyError, "no such relay");
        return 0;
    }
    return 1;
}

static PyObject *Engine_counts(Engine *e, PyObject *arg) {
    Py_ssize_t id = PyLong_AsSsize_t(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&e->lock);
    if (!known(e, id)) { pthread_mutex_unlock(&e->lock); return NULL; }
    unsigned long long up = e->relays[id].up.moved, down = e->relays[id].down.moved;
    pthread_mutex_unlock(&e->lock);
    return Py_BuildValue("(KK)", up, down);
}

static PyObject *Engine_totals(Engine *e, PyObject *unused) {
    unsigned long long up = 0, down = 0;
    pthread_mutex_lock(&e->lock);
    for (Py_ssize_t i = 0; i < e->cap; i++)  /* ended ones too, until done() has counted them */
        if (e->relays[i].state != FREE) { up += e->relays[i].up.moved; down += e->relays[i].down.moved; }
    pthread_mutex_unlock(&e->lock);
    return Py_BuildValue("(KK)", up, down);
}

/* End one relay now; if it had already ended on its own, it is not reported by run() again. */
static PyObject *Engine_close_relay(Engine *e, PyObject *args) {
    Py_ssize_t id;
    int reset = 0;
    if (!PyArg_ParseTuple(args, "n|p", &id, &reset)) return NULL;
    pthread_mutex_lock(&e->lock);
    if (!known(e, id)) { pthread_mutex_unlock(&e->lock); return NULL; }
    Relay *r = &e->relays[id];
    unsigned long long up = r->up.moved, down = r->down.moved;
    if (r->state == OPEN) {
        finish(e, id, reset);
    } else {
        for (Py_ssize_t i = 0; i < e->nended; i++)
            if (e->ended[i] == id) {
                e->ended[i] = e->ended[--e->nended];
                break;
            }
    }
    release(e, id);
    pthread_mutex_unlock(&e->lock);
    return Py_BuildValue("(KK)", up, down);
}

static PyObject *Engine_close(Engine *e, PyObject *unused) {
    close_all(e);
    Py_CLEAR(e->done);  /* breaks the cycle with the owner (this type does not take part in GC) */
    Py_RETURN_NONE;
}

static PyObject *Engine_get(Engine *e, void *what) {
    pthread_mutex_lock(&e->lock);
    long long v = (intptr_t)what == 0 ? e->count : (intptr_t)what == 1 ? e->created : e->npool;
    pthread_mutex_unlock(&e->lock);
    return PyLong_FromLongLong(v);
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The eventfd the event loop watches: relays ended."},
    {"add", (PyCFunction)Engine_add, METH_VARARGS, "add(client_fd, backend_fd) -> id: the engine owns both fds."},
    {"run", (PyCFunction)Engine_run, METH_NOARGS,
     "Report what ended: calls done(id, received, sent, reset) for each relay that ended."},
    {"counts", (PyCFunction)Engine_counts, METH_O, "counts(id) -> (received, sent) so far."},
    {"totals", (PyCFunction)Engine_totals, METH_NOARGS, "(received, sent) over the relays not yet reported."},
    {"close_relay", (PyCFunction)Engine_close_relay, METH_VARARGS, "close_relay(id, reset=False) -> (received, sent)."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Stop the thread; close every relay, the pipes and the fds."},
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
    .tp_doc = "Relays between connected stream sockets, moved with splice by a thread of the engine's own.",
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
