/*
 * supervisor._spawn: start one child process, cheaply, with an exact environment.
 *
 * Theory of operation
 * -------------------
 * In accept mode the daemon starts one child per connection, so this is the hot path: the
 * daemon must spend well under 100us of CPU per child. fork() of a large Python parent copies
 * its page tables (slow and proportional to its size); subprocess.Popen adds a lot of Python;
 * posix_spawn() cannot put the child's own pid into LISTEN_PID. So: vfork().
 *
 * vfork() suspends the calling thread and runs the child in the parent's memory, on the
 * parent's stack, until the child calls execve() or _exit(). That fixes the rules here:
 *
 *   1. Everything is prepared in the parent, with the GIL held: the argv/envp char* arrays
 *      (pointing into bytes objects we hold references to), the fd table, groups, rlimits,
 *      and one buffer per pid variable ("LISTEN_PID=", "WATCHDOG_PID=") followed by room for
 *      the digits. The child only reads them.
 *   2. The child calls raw system calls only: no malloc, no stdio, no locks, no Python. It
 *      writes nothing to shared memory except the pid variables' digits and, on failure, a stage
 *      code and errno into the parent's `struct spawn_args`, then _exit(127). When vfork()
 *      returns in the parent the child has either exec'ed or exited, so the parent reads
 *      them without a race, reaps the failed child at once (no zombie is left) and raises
 *      SpawnFailure(stage, errno).
 *   3. The parent blocks every signal around vfork(): a signal handler (Python's C-level
 *      handler) running in the child would scribble on the parent's memory. The child has its
 *      own copy of the signal dispositions (vfork does not share them: no CLONE_SIGHAND), so it
 *      resets every non-default one to SIG_DFL - caught ones, and also ignored ones such as
 *      SIGPIPE, which Python ignores but inetd-style programs expect at their default - and
 *      only then empties its mask. The signal mask survives execve(), so it must be empty.
 *   4. setgroups/setgid/setuid go through syscall(), not glibc: glibc's wrappers broadcast
 *      the credential change to every thread of the process (SIGSETXID), which in a vfork
 *      child would be the parent's threads. Credentials are per-thread in the kernel, and the
 *      child is a single-thread process, so the raw system call is exactly right.
 *   5. The child calls getpid() through syscall() too, to format LISTEN_PID (and any other
 *      pid variable, such as WATCHDOG_PID): systemd's protocol wants the pid of the process
 *      that reads the variable, i.e. this child's.
 *
 * fds: fds[i] becomes fd i in the child (-1: /dev/null). Sources may overlap targets (slot 3
 * gets fd 4 while slot 4 gets fd 3), so every source is first copied to a number >= nfds with
 * F_DUPFD_CLOEXEC, then dup2()ed into place (dup2 clears FD_CLOEXEC on the target). A source
 * already at its slot is used in place and only has FD_CLOEXEC cleared. Then close_range(nfds,
 * ~0) closes everything else, the temporary copies included.
 *
 * Order in the child: signals, setsid, fds, rlimits and nice (they may raise limits or lower
 * the nice value, which needs privileges we are about to drop), umask, setgroups, setgid,
 * setuid, chdir (as the target user, so it can fail like the program would), execve.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <malloc.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* close_range(2) has the same number on every architecture with the unified syscall table;
 * older headers may not know it. Elsewhere we go straight to the /proc fallback. */
#if !defined(SYS_close_range) &&                                                            \
    (defined(__x86_64__) || defined(__i386__) || defined(__aarch64__) || defined(__arm__) || \
     defined(__riscv))
#define SYS_close_range 436
#endif

/* The 32-bit x86/arm ABIs have 16-bit setuid & co; their 32-bit variants have these names. */
#ifdef SYS_setuid32
#define SPAWN_SYS_SETUID SYS_setuid32
#define SPAWN_SYS_SETGID SYS_setgid32
#define SPAWN_SYS_SETGROUPS SYS_setgroups32
#else
#define SPAWN_SYS_SETUID SYS_setuid
#define SPAWN_SYS_SETGID SYS_setgid
#define SPAWN_SYS_SETGROUPS SYS_setgroups
#endif

enum stage {
    STAGE_NONE = 0,
    STAGE_DUP,
    STAGE_CLOSE,
    STAGE_SETSID,
    STAGE_SETGROUPS,
    STAGE_SETGID,
    STAGE_SETUID,
    STAGE_CHDIR,
    STAGE_SETRLIMIT,
    STAGE_NICE,
    STAGE_EXECVE,
    STAGE_FORK,
};

/* Indexed by enum stage; these strings are the `stage` of supervisor.errors.SpawnError. */
static const char *const stage_names[] = {
    "none", "dup", "close", "setsid", "setgroups", "setgid", "setuid",
    "chdir", "setrlimit", "nice", "execve", "fork",
};

/* pid_vars=True means just this one (the historical listen_pid flag). */
#define LISTEN_PID_NAME "LISTEN_PID"
/* Room for the digits of any pid_t, after "NAME=", plus the NUL. */
#define PID_DIGITS 21
/* More would be a mistake: the protocols know LISTEN_PID and WATCHDOG_PID. */
#define MAX_PID_VARS 8

struct rlimit_entry {
    int resource;
    struct rlimit limit;
};

/* Everything the child needs, prepared by the parent; the child writes only err_* and the
 * pid variables' digits. Lives on the parent's stack for the duration of one spawn(). */
struct spawn_args {
    const char *path;
    char *const *argv;
    char *const *envp;
    char *pid_digits[MAX_PID_VARS]; /* where each pid variable's digits go (after "NAME=") */
    int npid_vars;                  /* envp[0..npid_vars-1] are those variables */
    const int *fds;
    int nfds;
    int set_uid, set_gid, set_groups;
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    size_t ngroups;
    const char *cwd; /* NULL: unchanged */
    int umask;       /* -1: unchanged */
    int nice;        /* 0: unchanged */
    const struct rlimit_entry *rlimits;
    size_t nrlimits;
    int setsid;
    int *scratch; /* nfds ints: where each source was copied to */
    volatile int err_stage;
    volatile int err_errno;
};

/* ---------------------------------------------------------------- the child (after vfork) */

/* Everything below until the parent section runs in the vfork child: async-signal-safe only. */

static void
reset_signals(void)
{
    struct sigaction sa;
    int sig;

    for (sig = 1; sig < NSIG; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        /* glibc refuses its two internal real-time signals with EINVAL: nothing to reset. */
        if (sigaction(sig, NULL, &sa) < 0)
            continue;
        if (sa.sa_handler == SIG_DFL && !(sa.sa_flags & SA_SIGINFO))
            continue;
        memset(&sa, 0, sizeof(sa));
        sa.sa_handler = SIG_DFL;
        (void)sigaction(sig, &sa, NULL);
    }
}

/* Put fds[i] on fd i; returns -1 with errno set on failure. */
static int
arrange_fds(const struct spawn_args *a)
{
    int i, devnull = -1;

    /* Phase 1: copy every source that is not already in its slot above all slots, so that
     * phase 2's dup2() calls cannot clobber a source another slot still needs. */
    for (i = 0; i < a->nfds; i++) {
        int src = a->fds[i];
        if (src == i) {
            a->scratch[i] = i;
        }
        else if (src >= 0) {
            a->scratch[i] = fcntl(src, F_DUPFD_CLOEXEC, a->nfds);
            if (a->scratch[i] < 0)
                return -1;
        }
    }
    /* Then /dev/null for the -1 slots: only now, so that its number cannot be mistaken for a
     * source the caller passed by mistake after closing it (that must fail with EBADF). */
    for (i = 0; i < a->nfds; i++) {
        if (a->fds[i] >= 0)
            continue;
        if (devnull < 0) {
            int low = open("/dev/null", O_RDWR | O_CLOEXEC);
            if (low < 0)
                return -1;
            /* It took the lowest free number, possibly a slot of ours: dup2(devnull, devnull)
             * would then leave FD_CLOEXEC set, so move it above the slots. */
            if (low < a->nfds) {
                devnull = fcntl(low, F_DUPFD_CLOEXEC, a->nfds);
                (void)close(low);
                if (devnull < 0)
                    return -1;
            }
            else {
                devnull = low;
            }
        }
        a->scratch[i] = devnull;
    }
    /* Phase 2: into place. dup2() clears FD_CLOEXEC on the new fd; a source that already sat
     * in its slot keeps its number, so clear the flag by hand (Python's fds are CLOEXEC). */
    for (i = 0; i < a->nfds; i++) {
        if (a->scratch[i] == i) {
            if (fcntl(i, F_SETFD, 0) < 0)
                return -1;
        }
        else if (dup2(a->scratch[i], i) < 0) {
            return -1;
        }
    }
    return 0;
}

struct linux_dirent64_ {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

/* Close every fd >= lowfd; returns -1 with errno set on failure. */
static int
close_fds_from(int lowfd)
{
    int dirfd;
    /* 8-byte aligned: getdents64 records are. */
    uint64_t buf[512];
    long n;

#ifdef SYS_close_range
    if (syscall(SYS_close_range, (unsigned int)lowfd, ~0U, 0U) == 0)
        return 0;
    if (errno != ENOSYS)
        return -1;
#endif
    /* Kernel < 5.9: walk /proc/self/fd with the raw syscall (opendir() would malloc).
     * Closing while reading is fine: the directory offset is an fd number, not an index. */
    dirfd = open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        /* No /proc: close every number up to the fd limit. Slow, but correct. */
        struct rlimit rl;
        long fd, max = 1024;
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
            max = (long)rl.rlim_cur;
        for (fd = lowfd; fd < max; fd++)
            (void)close((int)fd);
        return 0;
    }
    while ((n = syscall(SYS_getdents64, dirfd, buf, sizeof(buf))) > 0) {
        long off = 0;
        while (off < n) {
            struct linux_dirent64_ *d = (struct linux_dirent64_ *)((char *)buf + off);
            const char *p = d->d_name;
            int fd = 0, digits = 0;
            off += d->d_reclen;
            for (; *p >= '0' && *p <= '9'; p++, digits++)
                fd = fd * 10 + (*p - '0');
            if (*p == '\0' && digits > 0 && fd >= lowfd && fd != dirfd)
                (void)close(fd);
        }
    }
    (void)close(dirfd);
    return n < 0 ? -1 : 0;
}

/* Write "<pid>\0" at out (room for 20 digits is reserved): no stdio in a vfork child. */
static void
format_pid(char *out, long pid)
{
    char digits[24];
    int n = 0;

    do {
        digits[n++] = (char)('0' + pid % 10);
        pid /= 10;
    } while (pid > 0 && n < 20);
    while (n > 0)
        *out++ = digits[--n];
    *out = '\0';
}

static void __attribute__((noinline, noreturn))
child_exec(struct spawn_args *a)
{
    enum stage stage;
    sigset_t empty;
    size_t i;

    reset_signals();

    if (a->setsid && setsid() < 0) {
        stage = STAGE_SETSID;
        goto fail;
    }
    if (arrange_fds(a) < 0) {
        stage = STAGE_DUP;
        goto fail;
    }
    if (close_fds_from(a->nfds) < 0) {
        stage = STAGE_CLOSE;
        goto fail;
    }
    for (i = 0; i < a->nrlimits; i++) {
        if (setrlimit(a->rlimits[i].resource, &a->rlimits[i].limit) < 0) {
            stage = STAGE_SETRLIMIT;
            goto fail;
        }
    }
    if (a->nice != 0 && setpriority(PRIO_PROCESS, 0, a->nice) < 0) {
        stage = STAGE_NICE;
        goto fail;
    }
    if (a->umask >= 0)
        (void)umask((mode_t)a->umask);
    if (a->set_groups && syscall(SPAWN_SYS_SETGROUPS, a->ngroups, a->groups) < 0) {
        stage = STAGE_SETGROUPS;
        goto fail;
    }
    if (a->set_gid && syscall(SPAWN_SYS_SETGID, a->gid) < 0) {
        stage = STAGE_SETGID;
        goto fail;
    }
    if (a->set_uid && syscall(SPAWN_SYS_SETUID, a->uid) < 0) {
        stage = STAGE_SETUID;
        goto fail;
    }
    if (a->cwd != NULL && chdir(a->cwd) < 0) {
        stage = STAGE_CHDIR;
        goto fail;
    }
    if (a->npid_vars > 0) {
        long self = syscall(SYS_getpid);
        int v;
        for (v = 0; v < a->npid_vars; v++)
            format_pid(a->pid_digits[v], self);
    }

    /* Every disposition is default now, so a pending signal can only do its default thing
     * (most likely kill this child, which the daemon then reaps like any other exit). */
    sigemptyset(&empty);
    (void)sigprocmask(SIG_SETMASK, &empty, NULL);
    execve(a->path, a->argv, a->envp);
    stage = STAGE_EXECVE;

fail:
    a->err_errno = errno;
    a->err_stage = (int)stage;
    _exit(127);
}

/* Kept out of line so that the child's frames live below this one on the shared stack and
 * the parent's frame in spawn() is never touched by the child. */
static pid_t __attribute__((noinline))
vfork_exec(struct spawn_args *a)
{
    pid_t pid = vfork();
    if (pid == 0)
        child_exec(a);
    return pid;
}

/* ---------------------------------------------------------------- the parent (Python) */

static PyObject *SpawnFailure; /* the exception type, created once at import */

/* Holds the bytes objects and C arrays of one spawn() call; freed by cleanup(). */
struct prepared {
    PyObject *argv_tuple, *envp_tuple;
    char **argv, **envp;
    char *pid_buf; /* the "NAME=<digits>" buffers of the pid variables, back to back */
    int *fds, *scratch;
    gid_t *groups;
    struct rlimit_entry *rlimits;
};

static void
cleanup(struct prepared *p)
{
    Py_XDECREF(p->argv_tuple);
    Py_XDECREF(p->envp_tuple);
    PyMem_Free(p->argv);
    PyMem_Free(p->envp);
    PyMem_Free(p->pid_buf);
    PyMem_Free(p->fds);
    PyMem_Free(p->scratch);
    PyMem_Free(p->groups);
    PyMem_Free(p->rlimits);
}

/* bytes without an embedded NUL, as a C string; NULL with an exception set otherwise. */
static const char *
c_string(PyObject *obj, const char *what)
{
    const char *s;

    if (!PyBytes_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes, not %.100s", what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    s = PyBytes_AS_STRING(obj);
    if (strlen(s) != (size_t)PyBytes_GET_SIZE(obj)) {
        PyErr_Format(PyExc_ValueError, "%s must not contain NUL bytes", what);
        return NULL;
    }
    return s;
}

/* A sequence of bytes -> (a tuple holding them, a NULL-terminated char* array with `front`
 * empty slots before the items). The tuple keeps the buffers alive while the GIL is released
 * even if the caller's list is mutated by another thread. */
static int
string_array(PyObject *seq, const char *what, Py_ssize_t front, PyObject **tuple, char ***out)
{
    Py_ssize_t i, n;

    *tuple = PySequence_Tuple(seq);
    if (*tuple == NULL)
        return -1;
    n = PyTuple_GET_SIZE(*tuple);
    if ((size_t)n > (PY_SSIZE_T_MAX / sizeof(char *)) - (size_t)front - 1) {
        PyErr_NoMemory();
        return -1;
    }
    *out = PyMem_Malloc(sizeof(char *) * (size_t)(n + front + 1));
    if (*out == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n; i++) {
        const char *s = c_string(PyTuple_GET_ITEM(*tuple, i), what);
        if (s == NULL)
            return -1;
        (*out)[front + i] = (char *)s;
    }
    (*out)[front + n] = NULL;
    return 0;
}

/* An int in [lo, hi]; -1 with an exception set otherwise (check PyErr_Occurred for -1). */
static long long
int_in_range(PyObject *obj, const char *what, long long lo, long long hi)
{
    long long v;

    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be int, not %.100s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s out of range: %lld", what, v);
        return -1;
    }
    return v;
}

static int
int_array(PyObject *seq, const char *what, long long lo, long long hi, int **out, Py_ssize_t *count)
{
    PyObject *fast = PySequence_Fast(seq, "fds must be a sequence");
    Py_ssize_t i, n;
    int rc = -1;

    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    if (n > INT_MAX / 2) {
        PyErr_Format(PyExc_ValueError, "too many %s", what);
        goto done;
    }
    *out = PyMem_Malloc(sizeof(int) * (size_t)(n > 0 ? n : 1));
    if (*out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        long long v = int_in_range(PySequence_Fast_GET_ITEM(fast, i), what, lo, hi);
        if (v == -1 && PyErr_Occurred())
            goto done;
        (*out)[i] = (int)v;
    }
    *count = n;
    rc = 0;
done:
    Py_DECREF(fast);
    return rc;
}

static int
groups_array(PyObject *seq, gid_t **out, size_t *count)
{
    PyObject *fast = PySequence_Fast(seq, "groups must be a sequence or None");
    Py_ssize_t i, n;
    int rc = -1;

    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    if (n > 65536) { /* NGROUPS_MAX */
        PyErr_SetString(PyExc_ValueError, "too many groups");
        goto done;
    }
    *out = PyMem_Malloc(sizeof(gid_t) * (size_t)(n > 0 ? n : 1));
    if (*out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        long long v = int_in_range(PySequence_Fast_GET_ITEM(fast, i), "group", 0, (gid_t)-2);
        if (v == -1 && PyErr_Occurred())
            goto done;
        (*out)[i] = (gid_t)v;
    }
    *count = (size_t)n;
    rc = 0;
done:
    Py_DECREF(fast);
    return rc;
}

static rlim_t
rlim_value(long long v)
{
    return v == -1 ? RLIM_INFINITY : (rlim_t)v;
}

static int
rlimits_array(PyObject *seq, struct rlimit_entry **out, size_t *count)
{
    PyObject *fast = PySequence_Fast(seq, "rlimits must be a sequence");
    Py_ssize_t i, n;
    int rc = -1;

    if (fast == NULL)
        return -1;
    n = PySequence_Fast_GET_SIZE(fast);
    if (n > 64) {
        PyErr_SetString(PyExc_ValueError, "too many rlimits");
        goto done;
    }
    *out = PyMem_Malloc(sizeof(struct rlimit_entry) * (size_t)(n > 0 ? n : 1));
    if (*out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        long long res, soft, hard;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "rlimits items must be (resource, soft, hard)");
            goto done;
        }
        res = int_in_range(PyTuple_GET_ITEM(item, 0), "rlimit resource", 0, RLIM_NLIMITS - 1);
        if (res == -1 && PyErr_Occurred())
            goto done;
        soft = int_in_range(PyTuple_GET_ITEM(item, 1), "rlimit soft", -1, LLONG_MAX);
        if (soft == -1 && PyErr_Occurred())
            goto done;
        hard = int_in_range(PyTuple_GET_ITEM(item, 2), "rlimit hard", -1, LLONG_MAX);
        if (hard == -1 && PyErr_Occurred())
            goto done;
        (*out)[i].resource = (int)res;
        (*out)[i].limit.rlim_cur = rlim_value(soft);
        (*out)[i].limit.rlim_max = rlim_value(hard);
    }
    *count = (size_t)n;
    rc = 0;
done:
    Py_DECREF(fast);
    return rc;
}

/* The pid variables: True -> LISTEN_PID, False -> none, or a sequence of names (bytes). Builds
 * one "NAME=" buffer per variable in p->pid_buf (with room for the digits the child writes),
 * points starts[i] at each and a->pid_digits[i] at its digits; returns the count, or -1 with
 * an exception set. */
static int
pid_vars_array(PyObject *obj, struct prepared *p, struct spawn_args *a, char **starts)
{
    const char *names[MAX_PID_VARS];
    size_t lens[MAX_PID_VARS], total = 0;
    PyObject *tuple = NULL;
    Py_ssize_t i, n = 0;
    char *out;
    int rc = -1;

    if (PyBool_Check(obj)) {
        if (obj == Py_True) {
            names[0] = LISTEN_PID_NAME;
            n = 1;
        }
    }
    else {
        if ((tuple = PySequence_Tuple(obj)) == NULL)
            return -1;
        n = PyTuple_GET_SIZE(tuple);
        if (n > MAX_PID_VARS) {
            PyErr_Format(PyExc_ValueError, "at most %d pid_vars", MAX_PID_VARS);
            goto done;
        }
        for (i = 0; i < n; i++) {
            if ((names[i] = c_string(PyTuple_GET_ITEM(tuple, i), "pid_vars items")) == NULL)
                goto done;
            if (names[i][0] == '\0' || strchr(names[i], '=') != NULL) {
                PyErr_SetString(PyExc_ValueError, "a pid_vars name must be non-empty, without '='");
                goto done;
            }
        }
    }
    for (i = 0; i < n; i++) {
        lens[i] = strlen(names[i]);
        total += lens[i] + 1 + PID_DIGITS;
    }
    if (n > 0) {
        if ((p->pid_buf = PyMem_Malloc(total)) == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        out = p->pid_buf;
        for (i = 0; i < n; i++) {
            starts[i] = out;
            memcpy(out, names[i], lens[i]);
            out[lens[i]] = '=';
            a->pid_digits[i] = out + lens[i] + 1;
            a->pid_digits[i][0] = '\0';
            out += lens[i] + 1 + PID_DIGITS;
        }
    }
    a->npid_vars = (int)n;
    rc = (int)n;
done:
    Py_XDECREF(tuple);
    return rc;
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, fds, pid_vars, uid, gid, groups, cwd, umask, nice, rlimits, setsid, /)\n"
"--\n\n"
"Start `path` in a new process with vfork+execve and return its pid (not waited for).\n\n"
"fds[i] becomes fd i in the child (-1: /dev/null); every other fd is closed.\n"
"pid_vars: a sequence of variable names (bytes) to prepend to envp as NAME=<the child's\n"
"pid>, e.g. (b'LISTEN_PID', b'WATCHDOG_PID'); True means (b'LISTEN_PID',), False ().\n"
"uid/gid -1, groups None,\n"
"cwd None, umask -1 and nice 0 leave that attribute unchanged. rlimits are\n"
"(resource, soft, hard) with -1 for RLIM_INFINITY. setsid: start a new session.\n"
"Raises SpawnFailure(stage, errno) if the child could not be started; the failed\n"
"child has been reaped.");

static PyObject *
spawn(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct prepared p = {0};
    struct spawn_args a;
    char *pid_starts[MAX_PID_VARS];
    Py_ssize_t nfds = 0;
    long long v;
    int npid_vars, i, setsid_flag, saved_errno = 0;
    pid_t pid;
    sigset_t all, old;
    PyObject *result = NULL;

    (void)module;
    memset(&a, 0, sizeof(a));
    if (nargs != 13) {
        PyErr_Format(PyExc_TypeError, "spawn() takes exactly 13 arguments (%zd given)", nargs);
        return NULL;
    }
    if ((a.path = c_string(args[0], "path")) == NULL)
        goto done;
    if ((npid_vars = pid_vars_array(args[4], &p, &a, pid_starts)) < 0)
        goto done;
    if (string_array(args[1], "argv items", 0, &p.argv_tuple, &p.argv) < 0)
        goto done;
    if (p.argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        goto done;
    }
    if (string_array(args[2], "envp items", npid_vars, &p.envp_tuple, &p.envp) < 0)
        goto done;
    /* The child writes its pid's digits after each "NAME=". */
    for (i = 0; i < npid_vars; i++)
        p.envp[i] = pid_starts[i];
    if (int_array(args[3], "fd", -1, INT_MAX, &p.fds, &nfds) < 0)
        goto done;
    p.scratch = PyMem_Malloc(sizeof(int) * (size_t)(nfds > 0 ? nfds : 1));
    if (p.scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* (uid_t)-1 means "unchanged" to the kernel too, so the largest valid id is -2. */
    if ((v = int_in_range(args[5], "uid", -1, (uid_t)-2)) == -1 && PyErr_Occurred())
        goto done;
    a.set_uid = v != -1;
    a.uid = (uid_t)v;
    if ((v = int_in_range(args[6], "gid", -1, (gid_t)-2)) == -1 && PyErr_Occurred())
        goto done;
    a.set_gid = v != -1;
    a.gid = (gid_t)v;
    if (args[7] != Py_None) {
        if (groups_array(args[7], &p.groups, &a.ngroups) < 0)
            goto done;
        a.set_groups = 1;
        a.groups = p.groups;
    }
    if (args[8] != Py_None && (a.cwd = c_string(args[8], "cwd")) == NULL)
        goto done;
    if ((v = int_in_range(args[9], "umask", -1, 0777)) == -1 && PyErr_Occurred())
        goto done;
    a.umask = (int)v;
    if ((v = int_in_range(args[10], "nice", -20, 19)) == -1 && PyErr_Occurred())
        goto done;
    a.nice = (int)v;
    if (rlimits_array(args[11], &p.rlimits, &a.nrlimits) < 0)
        goto done;
    if ((setsid_flag = PyObject_IsTrue(args[12])) < 0)
        goto done;

    a.argv = p.argv;
    a.envp = p.envp;
    a.fds = p.fds;
    a.nfds = (int)nfds;
    a.scratch = p.scratch;
    a.rlimits = p.rlimits;
    a.setsid = setsid_flag;

    /* Everything the child reads is ready and owned by us: let other threads run. */
    Py_BEGIN_ALLOW_THREADS
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = vfork_exec(&a);
    if (pid < 0) {
        saved_errno = errno;
    }
    else if (a.err_stage != STAGE_NONE) {
        /* The child has called _exit(127) already; reap it here, before the daemon's SIGCHLD
         * handling could see an exit status for a pid it was never told about. */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    Py_END_ALLOW_THREADS

    if (pid < 0) {
        result = PyObject_CallFunction(SpawnFailure, "si", stage_names[STAGE_FORK], saved_errno);
    }
    else if (a.err_stage != STAGE_NONE) {
        int stage = a.err_stage;
        if (stage < 0 || stage > STAGE_FORK)
            stage = STAGE_NONE;
        result = PyObject_CallFunction(SpawnFailure, "si", stage_names[stage], (int)a.err_errno);
    }
    else {
        result = PyLong_FromLong((long)pid);
        goto done;
    }
    /* result holds the exception instance (or NULL if building it failed). */
    if (result != NULL) {
        PyErr_SetObject(SpawnFailure, result);
        Py_CLEAR(result);
    }

done:
    cleanup(&p);
    return result;
}

/* sigchld_fd(): block SIGCHLD in the calling thread (threads started later
 * inherit the mask) and return a non-blocking, close-on-exec signalfd that
 * becomes readable when a child exits. This lets the event loop reap on
 * readiness: uvloop reserves SIGCHLD handlers for itself, and a reaper thread
 * costs a thread wake-up and a GIL hand-off per child. Children get an empty
 * mask from spawn(), so they never inherit the block. */
PyDoc_STRVAR(sigchld_fd_doc,
"sigchld_fd() -> int\n\n"
"Block SIGCHLD in the calling thread and return a signalfd for it (O_NONBLOCK, O_CLOEXEC).");

static PyObject *
sigchld_fd(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    int err = pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (err != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (fd < 0) {
        int saved = errno;
        pthread_sigmask(SIG_UNBLOCK, &set, NULL);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(fd);
}

PyDoc_STRVAR(trim_doc,
"trim() -> None\n\n"
"Return free heap memory to the kernel (glibc malloc_trim): start-up garbage\n"
"(imports, YAML parsing) otherwise stays resident for the daemon's lifetime.");

static PyObject *
trim(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    malloc_trim(0);
    Py_RETURN_NONE;
}

static PyMethodDef spawn_methods[] = {
    {"trim", trim, METH_NOARGS, trim_doc},
    {"spawn", (PyCFunction)(void (*)(void))spawn, METH_FASTCALL, spawn_doc},
    {"sigchld_fd", sigchld_fd, METH_NOARGS, sigchld_fd_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef spawn_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "supervisor._spawn",
    .m_doc = "vfork+execve spawner for sockvisor's children; see supervisor.spawn.",
    .m_size = -1,
    .m_methods = spawn_methods,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    PyObject *m = PyModule_Create(&spawn_module);
    if (m == NULL)
        return NULL;
    SpawnFailure = PyErr_NewExceptionWithDoc(
        "supervisor._spawn.SpawnFailure",
        "A child could not be started: args are (stage: str, errno: int).", NULL, NULL);
    if (SpawnFailure == NULL || PyModule_AddObjectRef(m, "SpawnFailure", SpawnFailure) < 0) {
        Py_CLEAR(SpawnFailure);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
