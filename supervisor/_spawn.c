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
 *
 * The hub's per-connection children (x86-64) run the same child, but are not waited for: see
 * "Not waiting for the exec" below. Everything above holds for them too, with their own copy of
 * what the child reads, and with "when vfork() returns" read as "when the kernel clears the
 * slot's word".
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
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
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
    STAGE_CGROUP, /* not born in or joined to the cgroup: the caller may spawn without it */
};

/* Indexed by enum stage; these strings are the `stage` of supervisor.errors.SpawnError. */
static const char *const stage_names[] = {
    "none", "dup", "close", "setsid", "setgroups", "setgid", "setuid",
    "chdir", "setrlimit", "nice", "execve", "fork", "cgroup",
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
    volatile pid_t *publish; /* where the child writes its pid first thing (the watchdog's) */
    int join_fd;             /* >= 0: a cgroup.procs the child writes "0" to first (spawn_into_cgroup) */
    volatile int err_stage;
    volatile int err_errno;
};

/* ---------------------------------------------------------------- the child (after vfork) */

/* Everything below until the parent section runs in the child, before execve(): raw system
 * calls only, which return -errno instead of setting errno.
 *
 * errno is thread-local, and the child runs on the spawning thread's TLS (CLONE_VM without
 * CLONE_SETTLS). Under vfork() that thread is suspended, but the hub's children are not
 * waited for (see "Not waiting for the exec" below): they run alongside the thread that
 * started them, and a failing glibc wrapper in a child would write the errno that thread is
 * about to read. On x86-64 these are `syscall` instructions; elsewhere glibc's syscall(), and
 * only vfork() is used there, so errno is the child's own. */
#if defined(__x86_64__)
static inline long
csys6(long n, long a1, long a2, long a3, long a4, long a5, long a6)
{
    long ret;
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "0"(n), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define HAVE_RAW_SYSCALL 1
#else
static inline long
csys6(long n, long a1, long a2, long a3, long a4, long a5, long a6)
{
    long ret = syscall(n, a1, a2, a3, a4, a5, a6);
    return ret < 0 ? -errno : ret;
}
#endif
#define CSYS(n, a, b, c) csys6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define CSYS4(n, a, b, c, d) csys6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

/* The kernel's rlimit64, which prlimit64 takes; struct rlimit has its layout with 64-bit rlim_t. */
_Static_assert(sizeof(struct rlimit) == 2 * sizeof(uint64_t), "struct rlimit is not rlimit64");

#ifdef HAVE_RAW_SYSCALL
/* rt_sigaction's own struct (x86-64), and its 64-signal set. */
struct ksigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};
#define KSIGSET 8
#define KNSIG 64
#endif

static void
reset_signals(void)
{
    int sig;
#ifdef HAVE_RAW_SYSCALL
    /* 1..64, glibc's two internal real-time signals included (glibc's sigaction() hides them;
     * the child has its own copy of the dispositions, so the parent's are untouched). */
    for (sig = 1; sig <= KNSIG; sig++) {
        struct ksigaction sa;
        if (sig == SIGKILL || sig == SIGSTOP)
            continue;
        if (CSYS4(SYS_rt_sigaction, sig, NULL, &sa, KSIGSET) < 0)
            continue;
        if (sa.handler == (void *)SIG_DFL && !(sa.flags & SA_SIGINFO))
            continue;
        memset(&sa, 0, sizeof(sa));
        (void)CSYS4(SYS_rt_sigaction, sig, &sa, NULL, KSIGSET);
    }
#else
    struct sigaction sa;
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
#endif
}

/* Empty the signal mask (it survives execve). */
static void
unblock_signals(void)
{
#ifdef HAVE_RAW_SYSCALL
    uint64_t empty = 0;
    (void)CSYS4(SYS_rt_sigprocmask, SIG_SETMASK, &empty, NULL, KSIGSET);
#else
    sigset_t empty;
    sigemptyset(&empty);
    (void)sigprocmask(SIG_SETMASK, &empty, NULL);
#endif
}

/* Put fds[i] on fd i; 0, or -errno on failure. */
static long
arrange_fds(const struct spawn_args *a)
{
    int i, devnull = -1;
    long r;

    /* Phase 1: copy every source that is not already in its slot above all slots, so that
     * phase 2's dup3() calls cannot clobber a source another slot still needs. */
    for (i = 0; i < a->nfds; i++) {
        int src = a->fds[i];
        if (src == i) {
            a->scratch[i] = i;
        }
        else if (src >= 0) {
            if ((r = CSYS(SYS_fcntl, src, F_DUPFD_CLOEXEC, a->nfds)) < 0)
                return r;
            a->scratch[i] = (int)r;
        }
    }
    /* Then /dev/null for the -1 slots: only now, so that its number cannot be mistaken for a
     * source the caller passed by mistake after closing it (that must fail with EBADF). */
    for (i = 0; i < a->nfds; i++) {
        if (a->fds[i] >= 0)
            continue;
        if (devnull < 0) {
            long low = CSYS4(SYS_openat, AT_FDCWD, "/dev/null", O_RDWR | O_CLOEXEC, 0);
            if (low < 0)
                return low;
            /* It took the lowest free number, possibly a slot of ours: dup3 onto itself is
             * refused and would leave FD_CLOEXEC set anyway, so move it above the slots. */
            if (low < a->nfds) {
                r = CSYS(SYS_fcntl, low, F_DUPFD_CLOEXEC, a->nfds);
                (void)CSYS(SYS_close, low, 0, 0);
                if (r < 0)
                    return r;
                devnull = (int)r;
            }
            else {
                devnull = (int)low;
            }
        }
        a->scratch[i] = devnull;
    }
    /* Phase 2: into place. dup3() clears FD_CLOEXEC on the new fd; a source that already sat
     * in its slot keeps its number, so clear the flag by hand (Python's fds are CLOEXEC). Every
     * other source was copied above the slots, so it never equals its target here. */
    for (i = 0; i < a->nfds; i++) {
        if (a->scratch[i] == i)
            r = CSYS(SYS_fcntl, i, F_SETFD, 0);
        else
            r = CSYS(SYS_dup3, a->scratch[i], i, 0);
        if (r < 0)
            return r;
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

/* Close every fd >= lowfd; 0, or -errno on failure. */
static long
close_fds_from(int lowfd)
{
    long dirfd, n;
    /* 8-byte aligned: getdents64 records are. */
    uint64_t buf[512];

#ifdef SYS_close_range
    n = CSYS(SYS_close_range, (unsigned int)lowfd, ~0U, 0U);
    if (n == 0)
        return 0;
    if (n != -ENOSYS)
        return n;
#endif
    /* Kernel < 5.9: walk /proc/self/fd with the raw syscall (opendir() would malloc).
     * Closing while reading is fine: the directory offset is an fd number, not an index. */
    dirfd = CSYS4(SYS_openat, AT_FDCWD, "/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (dirfd < 0) {
        /* No /proc: close every number up to the fd limit. Slow, but correct. */
        struct rlimit rl;
        long fd, max = 1024;
        if (CSYS4(SYS_prlimit64, 0, RLIMIT_NOFILE, NULL, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
            max = (long)rl.rlim_cur;
        for (fd = lowfd; fd < max; fd++)
            (void)CSYS(SYS_close, fd, 0, 0);
        return 0;
    }
    while ((n = CSYS(SYS_getdents64, dirfd, buf, sizeof(buf))) > 0) {
        long off = 0;
        while (off < n) {
            struct linux_dirent64_ *d = (struct linux_dirent64_ *)((char *)buf + off);
            const char *p = d->d_name;
            int fd = 0, digits = 0;
            off += d->d_reclen;
            for (; *p >= '0' && *p <= '9'; p++, digits++)
                fd = fd * 10 + (*p - '0');
            if (*p == '\0' && digits > 0 && fd >= lowfd && fd != dirfd)
                (void)CSYS(SYS_close, fd, 0, 0);
        }
    }
    (void)CSYS(SYS_close, dirfd, 0, 0);
    return n < 0 ? n : 0;
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
    size_t i;
    long r;

    /* While still root, so that the watchdog knows whom to look at (see spawn_guarded). */
    if (a->publish != NULL)
        *a->publish = (pid_t)CSYS(SYS_getpid, 0, 0, 0);
    /* Before anything this process could fork runs, and while still root. */
    if (a->join_fd >= 0 && (r = CSYS(SYS_write, a->join_fd, "0", 1)) != 1) {
        if (r >= 0)
            r = -EIO;
        stage = STAGE_CGROUP;
        goto fail;
    }
    reset_signals();

    if (a->setsid && (r = CSYS(SYS_setsid, 0, 0, 0)) < 0) {
        stage = STAGE_SETSID;
        goto fail;
    }
    if ((r = arrange_fds(a)) < 0) {
        stage = STAGE_DUP;
        goto fail;
    }
    if ((r = close_fds_from(a->nfds)) < 0) {
        stage = STAGE_CLOSE;
        goto fail;
    }
    for (i = 0; i < a->nrlimits; i++) {
        if ((r = CSYS4(SYS_prlimit64, 0, a->rlimits[i].resource, &a->rlimits[i].limit, NULL)) < 0) {
            stage = STAGE_SETRLIMIT;
            goto fail;
        }
    }
    if (a->nice != 0 && (r = CSYS(SYS_setpriority, PRIO_PROCESS, 0, a->nice)) < 0) {
        stage = STAGE_NICE;
        goto fail;
    }
    if (a->umask >= 0)
        (void)CSYS(SYS_umask, a->umask, 0, 0);
    if (a->set_groups && (r = CSYS(SPAWN_SYS_SETGROUPS, a->ngroups, a->groups, 0)) < 0) {
        stage = STAGE_SETGROUPS;
        goto fail;
    }
    if (a->set_gid && (r = CSYS(SPAWN_SYS_SETGID, a->gid, 0, 0)) < 0) {
        stage = STAGE_SETGID;
        goto fail;
    }
    if (a->set_uid && (r = CSYS(SPAWN_SYS_SETUID, a->uid, 0, 0)) < 0) {
        stage = STAGE_SETUID;
        goto fail;
    }
    if (a->cwd != NULL && (r = CSYS(SYS_chdir, a->cwd, 0, 0)) < 0) {
        stage = STAGE_CHDIR;
        goto fail;
    }
    if (a->npid_vars > 0) {
        long self = CSYS(SYS_getpid, 0, 0, 0);
        int v;
        for (v = 0; v < a->npid_vars; v++)
            format_pid(a->pid_digits[v], self);
    }

    /* Every disposition is default now, so a pending signal can only do its default thing
     * (most likely kill this child, which the daemon then reaps like any other exit). */
    unblock_signals();
    r = CSYS(SYS_execve, a->path, a->argv, a->envp);
    stage = STAGE_EXECVE;

fail:
    a->err_errno = (int)-r;
    a->err_stage = (int)stage;
    for (;;)
        (void)CSYS(SYS_exit_group, 127, 0, 0);
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

/*
 * Born in a cgroup: clone3(CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP) is vfork() with the
 * child created directly in the cgroup that `cgroup_fd` names (Linux 5.7). Writing the pid to
 * cgroup.procs after the spawn instead is a migration: the kernel takes the threadgroup rwsem
 * for writing, which waits for an RCU grace period (10-30 ms here, with the daemon's loop
 * stopped), and the child runs outside the cgroup until then (a grandchild it forks in that
 * window escapes). A clone with a new stack cannot return through C code, so the child's entry
 * is a few instructions of assembly: x86-64 only for now; elsewhere this reports ENOSYS and
 * spawn_into_cgroup() falls back to vfork() with the child joining the cgroup itself.
 */
struct sv_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup;
};
#define SV_CLONE_VM 0x00000100ULL
#define SV_CLONE_VFORK 0x00004000ULL
#define SV_CLONE_INTO_CGROUP 0x200000000ULL
#define CHILD_STACK (256 * 1024)

#if defined(__x86_64__)
static long
clone3_raw(struct sv_clone_args *ca, void (*fn)(struct spawn_args *), struct spawn_args *arg)
{
    long ret;
    /* Callee-saved registers survive the system call; the child finds fn and arg there. */
    register void (*r12)(struct spawn_args *) __asm__("r12") = fn;
    register struct spawn_args *r13 __asm__("r13") = arg;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     /* The child, on its own 16-byte aligned stack: fn(arg) never returns. */
                     "xor %%ebp, %%ebp\n\t"
                     "mov %%r13, %%rdi\n\t"
                     "call *%%r12\n\t"
                     "mov $60, %%eax\n\t"
                     "mov $127, %%edi\n\t"
                     "syscall\n\t"
                     "1:\n\t"
                     : "=a"(ret)
                     : "0"(435L /* SYS_clone3 */), "D"(ca), "S"(sizeof(*ca)), "r"(r12), "r"(r13)
                     : "rcx", "r11", "memory");
    return ret;
}
#define HAVE_CLONE3_RAW 1
#endif

/* Like vfork_exec(), born in the cgroup `cgroup_fd`: the pid, or -1 with errno set. */
static pid_t
clone_exec_into(struct spawn_args *a, int cgroup_fd)
{
#ifdef HAVE_CLONE3_RAW
    struct sv_clone_args ca;
    void *stack;
    long pid;

    stack = mmap(NULL, CHILD_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        return -1;
    memset(&ca, 0, sizeof(ca));
    ca.flags = SV_CLONE_VM | SV_CLONE_VFORK | SV_CLONE_INTO_CGROUP;
    ca.exit_signal = SIGCHLD;
    ca.stack = (uint64_t)(uintptr_t)stack;
    ca.stack_size = CHILD_STACK;
    ca.cgroup = (uint64_t)cgroup_fd;
    pid = clone3_raw(&ca, child_exec, a);
    /* CLONE_VFORK: the child has exec'ed or exited, its stack is free again. */
    (void)munmap(stack, CHILD_STACK);
    if (pid < 0) {
        errno = (int)-pid;
        return -1;
    }
    return (pid_t)pid;
#else
    (void)a;
    (void)cgroup_fd;
    errno = ENOSYS;
    return -1;
#endif
}

/*
 * The watchdog. vfork() holds the calling thread until its child has exec'ed, and from its
 * setuid() on the child can be signalled by its new user: any process of that uid that sends
 * SIGSTOP at the right moment (`kill -STOP -1` in a loop does) stops the child before its exec,
 * and with it the thread that spawned it: the hub, and so every bulk accept unit, or the loop
 * itself for a service. So every spawn registers in `inflight`, the child writes its pid there
 * first thing (while still root), and a watchdog thread looks every WATCH_MS at spawns older
 * than that: a child that is stopped (by a signal: state T) while it still shares the daemon's memory
 * (kcmp KCMP_VM: no exec yet, so it is that child and not a recycled pid) gets SIGKILL through a
 * pidfd taken before the checks. The spawning thread then goes on as after any child that died
 * at once (its exit is reaped and logged as a SIGKILL). A child that is merely slow (an exec
 * from a slow filesystem) is left alone, and so is one in a tracing stop (state t): only root can
 * trace it (its setuid() made it non-dumpable), and an administrator's `strace -f` on the
 * daemon must not kill children.
 */
#define INFLIGHT 16
#define WATCH_MS 100

static struct inflight {
    int used;
    volatile pid_t pid;
    double since;
} inflight[INFLIGHT];
static pthread_mutex_t inflight_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t inflight_wake = PTHREAD_COND_INITIALIZER;
static int inflight_count, watchdog_idle;
static pid_t watchdog_pid; /* the process that started it: a fork()ed copy has none */
static unsigned long watchdog_kills;

static double
mono_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* `seconds` from now on CLOCK_MONOTONIC, the clock of every condition variable here that is
 * waited on with a timeout (monotonic_cond_init): a step of the wall clock (an NTP step, a VM
 * restored from a snapshot, an administrator's `date -s`) neither stretches nor cuts a wait. */
static struct timespec
monotonic_in(double seconds)
{
    struct timespec until;
    long ns;

    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += (time_t)seconds;
    ns = until.tv_nsec + (long)((seconds - (double)(time_t)seconds) * 1e9);
    until.tv_sec += ns / 1000000000L;
    until.tv_nsec = ns % 1000000000L;
    return until;
}

/* Make `cond` one whose timed waits run on CLOCK_MONOTONIC (at import, before any thread). */
static int
monotonic_cond_init(pthread_cond_t *cond)
{
    pthread_condattr_t attr;
    int err;

    if ((err = pthread_condattr_init(&attr)) != 0)
        return err;
    err = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (err == 0) {
        (void)pthread_cond_destroy(cond);
        err = pthread_cond_init(cond, &attr);
    }
    (void)pthread_condattr_destroy(&attr);
    return err;
}

/* Start fn on a detached thread (it inherits the caller's signal mask); 0 or an errno. */
static int
start_detached(void *(*fn)(void *))
{
    pthread_t th;
    pthread_attr_t attr;
    int err;

    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    err = pthread_create(&th, &attr, fn, NULL);
    pthread_attr_destroy(&attr);
    return err;
}

/* Whether `pid` is stopped by a signal: /proc/PID/stat's state, after the last ')'. */
static int
proc_stopped(pid_t pid)
{
    char path[48], buf[512], *p;
    ssize_t n;
    int fd;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        return 0;
    n = read(fd, buf, sizeof(buf) - 1);
    (void)close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    if ((p = strrchr(buf, ')')) == NULL || p[1] != ' ')
        return 0;
    return p[2] == 'T';
}

static void
watch_one(pid_t pid)
{
#if defined(SYS_pidfd_open) && defined(SYS_pidfd_send_signal) && defined(SYS_kcmp)
    long pidfd = syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0)
        return;
    /* KCMP_VM (1): 0 when both share one address space, i.e. it has not exec'ed. */
    if (proc_stopped(pid) && syscall(SYS_kcmp, getpid(), pid, 1, 0, 0) == 0 &&
        syscall(SYS_pidfd_send_signal, (int)pidfd, SIGKILL, NULL, 0) == 0)
        __atomic_add_fetch(&watchdog_kills, 1, __ATOMIC_RELAXED);
    (void)close((int)pidfd);
#else
    (void)pid;
#endif
}

static void *
watchdog_main(void *unused)
{
    (void)unused;
    pthread_mutex_lock(&inflight_lock);
    for (;;) {
        struct timespec until;
        double now;
        int i;
        while (inflight_count == 0) {
            watchdog_idle = 1; /* only then does a spawn wake it: not once per spawn */
            pthread_cond_wait(&inflight_wake, &inflight_lock);
            watchdog_idle = 0;
        }
        until = monotonic_in(WATCH_MS / 1000.0);
        (void)pthread_cond_timedwait(&inflight_wake, &inflight_lock, &until);
        now = mono_now();
        /* Under the lock: a slot is released only under it, so its pid is still in its vfork. */
        for (i = 0; i < INFLIGHT; i++) {
            if (inflight[i].used && inflight[i].pid > 0 && now - inflight[i].since >= WATCH_MS / 1000.0)
                watch_one(inflight[i].pid);
        }
    }
    return NULL;
}

/* A slot for a spawn about to start (-1: none free, the spawn goes unwatched). Called with every
 * signal blocked, so the watchdog thread starts with every signal blocked. */
static int
inflight_take(void)
{
    pid_t me = getpid();
    int i, slot = -1;

    pthread_mutex_lock(&inflight_lock);
    if (watchdog_pid != me) {
        memset(inflight, 0, sizeof(inflight));
        inflight_count = watchdog_idle = 0;
        if (start_detached(watchdog_main) == 0)
            watchdog_pid = me;
    }
    for (i = 0; i < INFLIGHT && watchdog_pid == me; i++) {
        if (!inflight[i].used) {
            inflight[i].used = 1;
            inflight[i].pid = 0;
            inflight[i].since = mono_now();
            if (inflight_count++ == 0 && watchdog_idle)
                pthread_cond_signal(&inflight_wake);
            slot = i;
            break;
        }
    }
    pthread_mutex_unlock(&inflight_lock);
    return slot;
}

static void
inflight_give(int slot)
{
    if (slot < 0)
        return;
    pthread_mutex_lock(&inflight_lock);
    inflight[slot].used = 0;
    inflight[slot].pid = 0;
    inflight_count--;
    pthread_mutex_unlock(&inflight_lock);
}

/* vfork_exec() or, with a cgroup, clone_exec_into(), under the watchdog. */
static pid_t
spawn_guarded(struct spawn_args *a, int cgroup_fd)
{
    int slot = inflight_take();
    pid_t pid;

    a->publish = slot >= 0 ? &inflight[slot].pid : NULL;
    pid = cgroup_fd >= 0 ? clone_exec_into(a, cgroup_fd) : vfork_exec(a);
    {
        int saved = errno;
        inflight_give(slot);
        errno = saved;
    }
    return pid;
}

/* Whether clone3(CLONE_INTO_CGROUP) works here; cleared at the first spawn that finds this
 * kernel, build or seccomp profile (Docker's fails clone3 with ENOSYS) without it. */
static int clone_into_works = 1;

/*
 * spawn_guarded() into the cgroup `cgroup_fd`, for a service (the hub's children have none).
 * Where a child cannot be born in it, it joins it as the first thing it does, still root and
 * before its exec, by writing "0" to the cgroup's cgroup.procs: nothing the program forks can
 * start outside, as it could with a move of the pid after the spawn (the program runs, and may
 * fork, before that write). The migration's cost (see clone_exec_into) is then paid with the
 * spawning thread waiting, as it would be for the write. Not born in and not joined:
 * STAGE_CGROUP in a->err_stage (with -1 and errno if no child was started).
 */
static pid_t
spawn_into_cgroup(struct spawn_args *a, int cgroup_fd)
{
    pid_t pid;
    int procs, saved;

    if (__atomic_load_n(&clone_into_works, __ATOMIC_RELAXED)) {
        pid = spawn_guarded(a, cgroup_fd);
        if (pid >= 0 || (errno != ENOSYS && errno != E2BIG && errno != EINVAL)) {
            if (pid < 0)
                a->err_stage = STAGE_CGROUP;
            return pid;
        }
        __atomic_store_n(&clone_into_works, 0, __ATOMIC_RELAXED);
    }
    if ((procs = openat(cgroup_fd, "cgroup.procs", O_WRONLY | O_CLOEXEC)) < 0) {
        a->err_stage = STAGE_CGROUP;
        return -1;
    }
    a->join_fd = procs;
    pid = spawn_guarded(a, -1);
    saved = errno;
    (void)close(procs);
    a->join_fd = -1;
    errno = saved;
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
"spawn(path, argv, envp, fds, pid_vars, uid, gid, groups, cwd, umask, nice, rlimits, setsid, cgroup_fd=-1, /)\n"
"--\n\n"
"Start `path` in a new process with vfork+execve and return its pid (not waited for).\n\n"
"fds[i] becomes fd i in the child (-1: /dev/null); every other fd is closed.\n"
"pid_vars: a sequence of variable names (bytes) to prepend to envp as NAME=<the child's\n"
"pid>, e.g. (b'LISTEN_PID', b'WATCHDOG_PID'); True means (b'LISTEN_PID',), False ().\n"
"uid/gid -1, groups None,\n"
"cwd None, umask -1 and nice 0 leave that attribute unchanged. rlimits are\n"
"(resource, soft, hard) with -1 for RLIM_INFINITY. setsid: start a new session.\n"
"cgroup_fd: a cgroup v2 directory fd the child is born in (clone3 CLONE_INTO_CGROUP);\n"
"if that is refused, SpawnFailure('cgroup', errno) and no child was started.\n"
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
    int npid_vars, i, setsid_flag, saved_errno = 0, cgroup_fd = -1;
    pid_t pid;
    sigset_t all, old;
    PyObject *result = NULL;

    (void)module;
    memset(&a, 0, sizeof(a));
    a.join_fd = -1;
    if (nargs != 13 && nargs != 14) {
        PyErr_Format(PyExc_TypeError, "spawn() takes 13 or 14 arguments (%zd given)", nargs);
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
    if (nargs == 14) {
        if ((v = int_in_range(args[13], "cgroup_fd", -1, INT_MAX)) == -1 && PyErr_Occurred())
            goto done;
        cgroup_fd = (int)v;
    }

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
    pid = cgroup_fd >= 0 ? spawn_into_cgroup(&a, cgroup_fd) : spawn_guarded(&a, -1);
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
        result = PyObject_CallFunction(SpawnFailure, "si", stage_names[a.err_stage == STAGE_CGROUP ? STAGE_CGROUP : STAGE_FORK],
                                       saved_errno);
    }
    else if (a.err_stage != STAGE_NONE) {
        int stage = a.err_stage;
        if (stage < 0 || stage > STAGE_CGROUP)
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

/* ---------------------------------------------------------------- accept mode: batches */

/*
 * accept_spawn() is mode: accept's hot path in one call, run without the GIL: accept every
 * queued connection (up to a count the caller grants), start one child per connection with
 * its REMOTE_* variables, close the daemon's copy, and return the pids. Nothing is decided
 * here: the caller's pure policy (supervisor.policy) says how many connections may be admitted
 * without looking at each one; units whose policy must look at each peer (allow/deny, per-source
 * limits, access times) or that send banners take the per-connection path in Python, which
 * uses spawn() above. C does only the mechanics: accept4, the variables, vfork, close.
 *
 * Why one call: per connection the Python path paid a readiness callback, an accept() that
 * raised BlockingIOError at the end of the queue, the argument conversions of spawn() and a GIL
 * hand-off to a helper thread; here a Template holds the converted arguments once per unit and
 * the trailing EAGAIN costs one system call.
 *
 * Why two threads: vfork() suspends the calling thread until the child has exec'ed, which is
 * most of a connection's latency. When a batch holds two or more connections, a helper pthread
 * (started once, every signal blocked, never touches Python) takes connections from the same
 * batch while the calling thread does too (an atomic index), so two children exec at once on two
 * cores; the call returns only when both are done, so every pid is known before the loop can
 * reap it. A second concurrent batch (another interpreter thread) simply runs alone.
 */

#define BATCH_MAX 64
#define FD_CONN (-2) /* in a template's fds: the accepted connection */
#define REMOTE_NONE 0
#define REMOTE_INET 1 /* REMOTE_ADDR, REMOTE_PORT */
#define REMOTE_UNIX 2 /* REMOTE_PID, REMOTE_UID, REMOTE_GID (SO_PEERCRED) */
#define REMOTE_VAR 64 /* "REMOTE_ADDR=" + the longest IPv6 text fits */
#define LISTEN_PID_PREFIX LISTEN_PID_NAME "="

typedef struct {
    PyObject_HEAD
    struct prepared p; /* argv, envp (the base environment), fds, groups, rlimits */
    PyObject *keep;    /* (path, cwd): they own path and cwd */
    const char *path, *cwd;
    Py_ssize_t nenv;
    int nfds, listen_pid, remote;
    int set_uid, set_gid, set_groups;
    uid_t uid;
    gid_t gid;
    size_t ngroups, nrlimits;
    int umask, nice, setsid;
} Template;

static void
template_dealloc(Template *t)
{
    cleanup(&t->p);
    Py_XDECREF(t->keep);
    PyObject_Free(t);
}

static PyTypeObject TemplateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "supervisor._spawn.Template",
    .tp_basicsize = sizeof(Template),
    .tp_dealloc = (destructor)template_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A unit's spawn arguments, converted once for accept_spawn().",
};

PyDoc_STRVAR(template_doc,
"template(path, argv, envp, fds, listen_pid, remote, uid, gid, groups, cwd, umask, nice, rlimits, setsid, /)\n"
"--\n\n"
"Convert a unit's spawn arguments once, for accept_spawn(). As spawn(), except: in fds, -2 stands\n"
"for the accepted connection; listen_pid adds LISTEN_PID; remote 1 adds REMOTE_ADDR and\n"
"REMOTE_PORT, 2 REMOTE_PID, REMOTE_UID and REMOTE_GID (from SO_PEERCRED), 0 nothing.");

static PyObject *
template_new(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Template *t;
    Py_ssize_t nfds = 0;
    long long v;
    int flag;

    (void)module;
    if (nargs != 14) {
        PyErr_Format(PyExc_TypeError, "template() takes exactly 14 arguments (%zd given)", nargs);
        return NULL;
    }
    t = PyObject_New(Template, &TemplateType);
    if (t == NULL)
        return NULL;
    memset(&t->p, 0, sizeof(t->p));
    t->keep = NULL;
    t->cwd = NULL;
    t->set_groups = 0;
    t->ngroups = t->nrlimits = 0;
    if ((t->path = c_string(args[0], "path")) == NULL)
        goto fail;
    if (string_array(args[1], "argv items", 0, &t->p.argv_tuple, &t->p.argv) < 0)
        goto fail;
    if (t->p.argv[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "argv must not be empty");
        goto fail;
    }
    if (string_array(args[2], "envp items", 0, &t->p.envp_tuple, &t->p.envp) < 0)
        goto fail;
    t->nenv = PyTuple_GET_SIZE(t->p.envp_tuple);
    if (int_array(args[3], "fd", FD_CONN, INT_MAX, &t->p.fds, &nfds) < 0)
        goto fail;
    t->nfds = (int)nfds;
    if ((flag = PyObject_IsTrue(args[4])) < 0)
        goto fail;
    t->listen_pid = flag;
    if ((v = int_in_range(args[5], "remote", REMOTE_NONE, REMOTE_UNIX)) == -1 && PyErr_Occurred())
        goto fail;
    t->remote = (int)v;
    if ((v = int_in_range(args[6], "uid", -1, (uid_t)-2)) == -1 && PyErr_Occurred())
        goto fail;
    t->set_uid = v != -1;
    t->uid = (uid_t)v;
    if ((v = int_in_range(args[7], "gid", -1, (gid_t)-2)) == -1 && PyErr_Occurred())
        goto fail;
    t->set_gid = v != -1;
    t->gid = (gid_t)v;
    if (args[8] != Py_None) {
        if (groups_array(args[8], &t->p.groups, &t->ngroups) < 0)
            goto fail;
        t->set_groups = 1;
    }
    if (args[9] != Py_None && (t->cwd = c_string(args[9], "cwd")) == NULL)
        goto fail;
    if ((v = int_in_range(args[10], "umask", -1, 0777)) == -1 && PyErr_Occurred())
        goto fail;
    t->umask = (int)v;
    if ((v = int_in_range(args[11], "nice", -20, 19)) == -1 && PyErr_Occurred())
        goto fail;
    t->nice = (int)v;
    if (rlimits_array(args[12], &t->p.rlimits, &t->nrlimits) < 0)
        goto fail;
    if ((flag = PyObject_IsTrue(args[13])) < 0)
        goto fail;
    t->setsid = flag;
    if ((t->keep = PyTuple_Pack(2, args[0], args[9])) == NULL)
        goto fail;
    return (PyObject *)t;
fail:
    Py_DECREF(t);
    return NULL;
}

/* One accepted connection of a batch, and what became of it. */
struct conn {
    int fd;
    int slot;       /* >= 0: its child was started without waiting (nw[slot]), not yet confirmed */
    pid_t pid;      /* > 0: its child */
    int stage, err; /* else why not (enum stage, errno) */
    socklen_t len;
    struct sockaddr_storage addr;
    char remote[INET6_ADDRSTRLEN + 16]; /* for the log: host:port, [v6]:port, pid=N,uid=N */
};

struct batch {
    Template *t;
    struct conn *conns;
    int n;
    int next; /* the next connection to spawn, taken with an atomic add by both threads */
    int nowait; /* the hub's: children started without waiting for their exec */
};

/* One spawning thread's buffers: its own envp (the per-connection variables in front of the
 * template's base environment), fds and scratch, since two children may be set up at once. */
struct worker {
    char **envp;
    int *fds, *scratch;
    char pid_var[sizeof(LISTEN_PID_PREFIX) + PID_DIGITS];
    char vars[3][REMOTE_VAR];
};

static int
remote_nvars(const Template *t)
{
    return t->remote == REMOTE_INET ? 2 : t->remote == REMOTE_UNIX ? 3 : 0;
}

/* How many envp entries and fd slots a worker needs for `t`. */
static size_t
worker_nenvp(const Template *t)
{
    return (size_t)(1 + remote_nvars(t) + t->nenv + 1);
}

static size_t
worker_nfds(const Template *t)
{
    return (size_t)(t->nfds > 0 ? t->nfds : 1);
}

/* Lay out w's envp for `t` (its buffers allocated for it): the per-connection variables first,
 * then the template's base environment. */
static void
worker_layout(struct worker *w, const Template *t)
{
    int front = 0, nvars = remote_nvars(t), i;

    if (t->listen_pid) {
        memcpy(w->pid_var, LISTEN_PID_PREFIX, sizeof(LISTEN_PID_PREFIX));
        w->envp[front++] = w->pid_var;
    }
    for (i = 0; i < nvars; i++) {
        w->vars[i][0] = '\0';
        w->envp[front++] = w->vars[i];
    }
    memcpy(w->envp + front, t->p.envp, sizeof(char *) * (size_t)t->nenv);
    w->envp[front + t->nenv] = NULL;
}

static int
worker_init(struct worker *w, const Template *t)
{
    w->envp = malloc(sizeof(char *) * worker_nenvp(t));
    w->fds = malloc(sizeof(int) * worker_nfds(t));
    w->scratch = malloc(sizeof(int) * worker_nfds(t));
    if (w->envp == NULL || w->fds == NULL || w->scratch == NULL)
        return -1;
    worker_layout(w, t);
    return 0;
}

static void
worker_free(struct worker *w)
{
    free(w->envp);
    free(w->fds);
    free(w->scratch);
}

/* The peer's variables and log text; -1 with errno set if the peer cannot be read. */
static int
remote_vars(const Template *t, struct worker *w, struct conn *c)
{
    c->remote[0] = '\0';
    if (t->remote == REMOTE_INET) {
        char host[INET6_ADDRSTRLEN] = "";
        int port = 0;
        if (c->addr.ss_family == AF_INET) {
            const struct sockaddr_in *sin = (const struct sockaddr_in *)&c->addr;
            inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
            port = ntohs(sin->sin_port);
        }
        else if (c->addr.ss_family == AF_INET6) {
            const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&c->addr;
            /* A dual-stack listener's IPv4 peer (::ffff:a.b.c.d) is printed as IPv4 (SPEC 3). */
            if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr))
                inet_ntop(AF_INET, &sin6->sin6_addr.s6_addr[12], host, sizeof(host));
            else
                inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
            port = ntohs(sin6->sin6_port);
        }
        snprintf(w->vars[0], REMOTE_VAR, "REMOTE_ADDR=%s", host);
        snprintf(w->vars[1], REMOTE_VAR, "REMOTE_PORT=%d", port);
        snprintf(c->remote, sizeof(c->remote), strchr(host, ':') ? "[%s]:%d" : "%s:%d", host, port);
    }
    else if (t->remote == REMOTE_UNIX) {
        struct ucred cred;
        socklen_t len = sizeof(cred);
        if (getsockopt(c->fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0)
            return -1;
        snprintf(w->vars[0], REMOTE_VAR, "REMOTE_PID=%d", (int)cred.pid);
        snprintf(w->vars[1], REMOTE_VAR, "REMOTE_UID=%u", (unsigned)cred.uid);
        snprintf(w->vars[2], REMOTE_VAR, "REMOTE_GID=%u", (unsigned)cred.gid);
        snprintf(c->remote, sizeof(c->remote), "pid=%d,uid=%u", (int)cred.pid, (unsigned)cred.uid);
    }
    return 0;
}

/*
 * Not waiting for the exec (the hub's children, x86-64). vfork() holds the spawning thread until
 * its child has exec'ed, and while it is held the connections queued behind it wait too, though
 * a CPU may be idle: the scheduler often queues the child behind a program on the other CPU
 * (bench/README.md, "Where the idle goes"). So the hub starts its children with
 * clone3(CLONE_VM | CLONE_CHILD_CLEARTID) instead: the child runs child_exec() in the daemon's
 * memory, as a vfork child does, but on a stack of its own, and the thread goes on at once. The
 * kernel clears the slot's `ctid` word when the child leaves the daemon's memory (exec or exit);
 * until then the slot (its stack, its spawn_args, envp, fds and variables) belongs to the child,
 * and so does the template it points into.
 *
 * A child started so has not been seen to exec. Its record is filed only when it is confirmed
 * (hub_confirm, under the hub's lock): once its word is cleared, err_stage says whether it
 * exec'ed (an ACCEPTED record) or failed before (a FAILED record, the child reaped, no exit
 * filed), exactly what a vfork() spawn reports. Confirmations run after every batch, at every
 * wake-up of the hub thread while slots are pending (at least every NW_POLL_MS), in hub_reap
 * before a pending pid's exit, and in the waits of a collecting drain and of a listener being
 * dropped (whose template must outlive the children that read it). A child still pending after
 * WATCH_MS gets the watchdog's check (stopped before its exec: SIGKILL). With no free slot, or on
 * other machines, the spawn falls back to vfork().
 */
#ifdef HAVE_CLONE3_RAW
#define NW_SLOTS 128
#define NW_STACK (64 * 1024)
#define NW_POLL_MS 2
#define SV_CLONE_CHILD_CLEARTID 0x00200000ULL
enum nw_state { NW_FREE, NW_SETUP, NW_SPAWNED, NW_PENDING };
struct nwslot {
    int state;           /* atomic: FREE -> SETUP (a spawning thread) -> SPAWNED (its batch not
                          * filed yet) -> PENDING (under hub.lock: confirmable) -> FREE */
    volatile pid_t ctid; /* cleared by the kernel when the child leaves our memory */
    pid_t pid;
    double when;         /* PENDING: the record's time, its engine, its peer */
    double watch_at;     /* PENDING: when the watchdog's check is due */
    void *engine;
    const Template *t;
    char remote[INET6_ADDRSTRLEN + 16];
    struct spawn_args a; /* what the child reads, in w's buffers */
    struct worker w;
    size_t cap_envp, cap_fds;
    void *stack;
};
static struct nwslot nw[NW_SLOTS];
static int nw_pending; /* under hub.lock: slots in NW_PENDING */

static int nw_on = -1; /* atomic after hub_open(): 0 once clone3 is refused here */

static int
nw_enabled(void)
{
    int on = __atomic_load_n(&nw_on, __ATOMIC_RELAXED);
    if (on < 0) {
        /* SOCKVISOR_SPAWN_WAIT=1: every child through vfork(), for a before/after benchmark. */
        const char *v = getenv("SOCKVISOR_SPAWN_WAIT");
        on = !(v != NULL && v[0] == '1');
        __atomic_store_n(&nw_on, on, __ATOMIC_RELAXED);
    }
    return on;
}

/* Take a free slot and lay out its worker for `t`; NULL if none is free (or for lack of memory):
 * the caller then spawns through vfork(). */
static struct nwslot *
nw_take(const Template *t)
{
    struct nwslot *s = NULL;
    int k;

    for (k = 0; k < NW_SLOTS && s == NULL; k++) {
        int want = NW_FREE;
        if (__atomic_compare_exchange_n(&nw[k].state, &want, NW_SETUP, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            s = &nw[k];
    }
    if (s == NULL)
        return NULL;
    if (s->stack == NULL) {
        void *st = mmap(NULL, NW_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        s->stack = st == MAP_FAILED ? NULL : st;
    }
    if (s->cap_envp < worker_nenvp(t)) {
        free(s->w.envp);
        s->w.envp = malloc(sizeof(char *) * worker_nenvp(t));
        s->cap_envp = s->w.envp != NULL ? worker_nenvp(t) : 0;
    }
    if (s->cap_fds < worker_nfds(t)) {
        free(s->w.fds);
        free(s->w.scratch);
        s->w.fds = malloc(sizeof(int) * worker_nfds(t));
        s->w.scratch = malloc(sizeof(int) * worker_nfds(t));
        s->cap_fds = s->w.fds != NULL && s->w.scratch != NULL ? worker_nfds(t) : 0;
    }
    if (s->stack == NULL || s->cap_envp == 0 || s->cap_fds == 0) {
        __atomic_store_n(&s->state, NW_FREE, __ATOMIC_RELEASE);
        return NULL;
    }
    worker_layout(&s->w, t);
    return s;
}

/* Start s->a's child on the slot's stack without waiting: its pid, or -1 (errno) if clone3 is
 * refused (the slot is still the caller's). */
static pid_t
nw_start(struct nwslot *s, const Template *t)
{
    struct sv_clone_args ca;
    long pid;

    s->t = t;
    s->ctid = 1;
    memset(&ca, 0, sizeof(ca));
    ca.flags = SV_CLONE_VM | SV_CLONE_CHILD_CLEARTID;
    ca.child_tid = (uint64_t)(uintptr_t)&s->ctid;
    ca.exit_signal = SIGCHLD;
    ca.stack = (uint64_t)(uintptr_t)s->stack;
    ca.stack_size = NW_STACK;
    pid = clone3_raw(&ca, child_exec, &s->a);
    if (pid < 0) {
        s->ctid = 0;
        errno = (int)-pid;
        if (errno == ENOSYS || errno == EPERM) /* a seccomp filter (Docker's): not again */
            __atomic_store_n(&nw_on, 0, __ATOMIC_RELAXED);
        return -1;
    }
    s->pid = (pid_t)pid;
    __atomic_store_n(&s->state, NW_SPAWNED, __ATOMIC_RELEASE);
    return (pid_t)pid;
}
#endif

/* Start the child of one connection (signals are blocked by the caller), then close the
 * daemon's copy of the connection. No GIL: only the template (read-only) and our buffers.
 * nowait: the hub's, which does not wait for the exec (see "Not waiting for the exec"). */
static void
spawn_conn(const Template *t, struct worker *w, struct conn *c, int nowait)
{
    struct spawn_args local, *a = &local;
    pid_t pid;
    int i;
#ifdef HAVE_CLONE3_RAW
    /* Not waited for: the child's variables and arguments are set up in a slot of its own. */
    struct nwslot *s = nowait && nw_enabled() ? nw_take(t) : NULL;
    if (s != NULL) {
        w = &s->w;
        a = &s->a;
    }
#else
    (void)nowait;
#endif

    memset(a, 0, sizeof(*a));
    a->join_fd = -1;
    c->pid = 0;
    c->slot = -1;
    c->stage = STAGE_NONE;
    if (remote_vars(t, w, c) < 0) {
        c->err = errno;
        c->stage = STAGE_DUP; /* the connection is unusable: reported like a failed dup */
        goto done;
    }
    if (t->listen_pid) {
        a->pid_digits[0] = w->pid_var + sizeof(LISTEN_PID_PREFIX) - 1;
        a->pid_digits[0][0] = '\0';
        a->npid_vars = 1;
    }
    for (i = 0; i < t->nfds; i++)
        w->fds[i] = t->p.fds[i] == FD_CONN ? c->fd : t->p.fds[i];
    a->path = t->path;
    a->argv = t->p.argv;
    a->envp = w->envp;
    a->fds = w->fds;
    a->nfds = t->nfds;
    a->scratch = w->scratch;
    a->set_uid = t->set_uid;
    a->set_gid = t->set_gid;
    a->set_groups = t->set_groups;
    a->uid = t->uid;
    a->gid = t->gid;
    a->groups = t->p.groups;
    a->ngroups = t->ngroups;
    a->cwd = t->cwd;
    a->umask = t->umask;
    a->nice = t->nice;
    a->rlimits = t->p.rlimits;
    a->nrlimits = t->nrlimits;
    a->setsid = t->setsid;
#ifdef HAVE_CLONE3_RAW
    if (s != NULL && (pid = nw_start(s, t)) > 0) {
        c->pid = pid; /* confirmed later (hub_confirm) */
        c->slot = (int)(s - nw);
        s = NULL;     /* the child's now */
        goto done;
    }
    /* else clone3 refused (a seccomp filter): through vfork(), with the slot's buffers */
#endif
    pid = spawn_guarded(a, -1);
    if (pid < 0) {
        c->err = errno;
        c->stage = STAGE_FORK;
    }
    else if (a->err_stage != STAGE_NONE) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        c->stage = a->err_stage > STAGE_NONE && a->err_stage <= STAGE_FORK ? a->err_stage : STAGE_FORK;
        c->err = a->err_errno;
    }
    else {
        c->pid = pid;
    }
done:
#ifdef HAVE_CLONE3_RAW
    if (s != NULL) /* not used for a child that outlives this call */
        __atomic_store_n(&s->state, NW_FREE, __ATOMIC_RELEASE);
#endif
    (void)close(c->fd);
    c->fd = -1;
}

/* Spawn connections of `b` until none is left; returns how many this thread did. */
static int
run_share(struct batch *b, struct worker *w)
{
    int i, done = 0;

    while ((i = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED)) < b->n) {
        spawn_conn(b->t, w, &b->conns[i], b->nowait);
        done++;
    }
    return done;
}

/* The helper thread. State, under helper_lock: helper_job is a posted batch it has not taken
 * yet, helper_busy that it is spawning from one, helper_claimed that some caller owns it for
 * the current batch. */
static pthread_mutex_t helper_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t helper_wake = PTHREAD_COND_INITIALIZER;
static pthread_cond_t helper_idle = PTHREAD_COND_INITIALIZER;
static struct batch *helper_job;
static int helper_busy, helper_claimed;
static pid_t helper_pid; /* the process that started it (0: none): a fork()ed copy has no helper */

static void *
helper_main(void *unused)
{
    (void)unused;
    for (;;) {
        struct batch *b;
        struct worker w;
        pthread_mutex_lock(&helper_lock);
        while (helper_job == NULL)
            pthread_cond_wait(&helper_wake, &helper_lock);
        b = helper_job;
        helper_job = NULL;
        helper_busy = 1;
        pthread_mutex_unlock(&helper_lock);
        memset(&w, 0, sizeof(w));
        if (worker_init(&w, b->t) == 0)
            (void)run_share(b, &w); /* out of memory: the caller does them all */
        worker_free(&w);
        pthread_mutex_lock(&helper_lock);
        helper_busy = 0;
        pthread_cond_signal(&helper_idle);
        pthread_mutex_unlock(&helper_lock);
    }
    return NULL;
}

/* Offer `b` to the helper (starting it if needed); 1 if the caller must collect it later with
 * helper_collect(), 0 if the caller spawns alone. Called with every signal blocked, so a new
 * helper thread starts with every signal blocked and never runs a signal handler. */
static int
helper_offer(struct batch *b)
{
    pid_t me = getpid();
    int offered = 0;

    pthread_mutex_lock(&helper_lock);
    if (helper_pid != me) {
        helper_job = NULL;
        helper_busy = helper_claimed = 0;
        if (start_detached(helper_main) == 0)
            helper_pid = me;
    }
    if (helper_pid == me && !helper_claimed) {
        helper_claimed = 1;
        helper_job = b;
        pthread_cond_signal(&helper_wake);
        offered = 1;
    }
    pthread_mutex_unlock(&helper_lock);
    return offered;
}

static void
helper_collect(struct batch *b)
{
    pthread_mutex_lock(&helper_lock);
    if (helper_job == b)
        helper_job = NULL; /* not taken yet: the caller did the whole batch */
    while (helper_busy)
        pthread_cond_wait(&helper_idle, &helper_lock);
    helper_claimed = 0;
    pthread_mutex_unlock(&helper_lock);
}

static int
resource_errno(int e)
{
    return e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM;
}

/* Accept up to `want` queued connections on the non-blocking `lfd` into conns, each with its
 * peer's address. Returns how many; *stop: the accept() error that stopped it for lack of a
 * resource, else 0. Errors that concern one connection (ECONNABORTED, EPROTO, EPERM, ...)
 * skip it. */
static int
accept_queued(int lfd, struct conn *conns, int want, int *stop)
{
    int n = 0, tries = 0;

    *stop = 0;
    while (n < want && tries++ < BATCH_MAX * 2) {
        struct conn *c = &conns[n];
        int fd;
        c->len = sizeof(c->addr);
        fd = accept4(lfd, (struct sockaddr *)&c->addr, &c->len, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            if (resource_errno(errno)) {
                *stop = errno;
                break;
            }
            continue; /* that connection is gone; the next one is fine */
        }
        c->fd = fd;
        n++;
    }
    return n;
}

/* Start one child per connection of conns[0..n) from `t` (two at a time with the helper thread
 * when several are queued); every connection is closed in the daemon. Without the GIL. */
static void
spawn_all(Template *t, struct conn *conns, int n, int nowait)
{
    struct batch b;
    struct worker w;
    int offered = 0, i;

    if (n <= 0)
        return;
    memset(&w, 0, sizeof(w));
    b.t = t;
    b.conns = conns;
    b.n = n;
    b.next = 0;
    b.nowait = nowait;
    if (worker_init(&w, t) < 0) {
        for (i = 0; i < n; i++) {
            conns[i].pid = 0;
            conns[i].slot = -1;
            conns[i].stage = STAGE_FORK;
            conns[i].err = ENOMEM;
            conns[i].remote[0] = '\0';
            (void)close(conns[i].fd);
        }
    }
    else {
        if (n > 1)
            offered = helper_offer(&b);
        (void)run_share(&b, &w);
        if (offered)
            helper_collect(&b);
    }
    worker_free(&w);
}

PyDoc_STRVAR(accept_spawn_doc,
"accept_spawn(template, listen_fd, budget, want_remote, /) -> (pids, remotes, failures, errno)\n"
"--\n\n"
"Accept up to `budget` queued connections on the non-blocking `listen_fd` and start one child\n"
"per connection from `template` (the connection closed in the daemon), without the GIL.\n"
"pids: the children started, in accept order; remotes: their peers as log text (host:port,\n"
"[v6]:port or pid=N,uid=N) if want_remote, else None; failures: (stage, errno, remote) per\n"
"connection that got no child (the failed child is reaped); errno: 0 when the queue was\n"
"empty or the budget used up, else the accept() error that stopped the batch for lack of a\n"
"resource (EMFILE, ENFILE, ENOBUFS, ENOMEM). Errors that concern one connection\n"
"(ECONNABORTED, EPROTO, EPERM, ...) skip it.");

static PyObject *
accept_spawn(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    struct conn conns[BATCH_MAX];
    Template *t;
    long lfd, budget;
    int want_remote, n = 0, stop = 0, i;
    sigset_t all, old;
    PyObject *pids = NULL, *remotes = NULL, *failures = NULL, *item;

    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "accept_spawn() takes exactly 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], &TemplateType)) {
        PyErr_SetString(PyExc_TypeError, "accept_spawn() needs a Template");
        return NULL;
    }
    t = (Template *)args[0];
    lfd = PyLong_AsLong(args[1]);
    if (lfd == -1 && PyErr_Occurred())
        return NULL;
    budget = PyLong_AsLong(args[2]);
    if (budget == -1 && PyErr_Occurred())
        return NULL;
    if (budget > BATCH_MAX)
        budget = BATCH_MAX;
    if ((want_remote = PyObject_IsTrue(args[3])) < 0)
        return NULL;

    Py_BEGIN_ALLOW_THREADS
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    /* Accept everything queued first (cheap), then spawn (slow: each waits for an exec). */
    n = accept_queued((int)lfd, conns, (int)budget, &stop);
    spawn_all(t, conns, n, 0); /* the caller reads every outcome now: vfork() */
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    Py_END_ALLOW_THREADS

    /* The children exist now: build the answer (if that fails for memory, the daemon's reaper
     * still collects them; only their bookkeeping is lost). */
    pids = PyList_New(0);
    failures = PyList_New(0);
    remotes = want_remote ? PyList_New(0) : Py_NewRef(Py_None);
    if (pids == NULL || failures == NULL || remotes == NULL)
        goto fail;
    for (i = 0; i < n; i++) {
        struct conn *c = &conns[i];
        if (c->pid > 0) {
            if ((item = PyLong_FromLong((long)c->pid)) == NULL || PyList_Append(pids, item) < 0)
                goto fail_item;
            Py_DECREF(item);
            if (want_remote) {
                if ((item = PyUnicode_DecodeASCII(c->remote, (Py_ssize_t)strlen(c->remote), "replace")) == NULL ||
                    PyList_Append(remotes, item) < 0)
                    goto fail_item;
                Py_DECREF(item);
            }
        }
        else {
            if ((item = Py_BuildValue("(sis)", stage_names[c->stage], c->err, c->remote)) == NULL ||
                PyList_Append(failures, item) < 0)
                goto fail_item;
            Py_DECREF(item);
        }
    }
    return Py_BuildValue("(NNNi)", pids, remotes, failures, stop);
fail_item:
    Py_XDECREF(item);
fail:
    Py_XDECREF(pids);
    Py_XDECREF(remotes);
    Py_XDECREF(failures);
    return NULL;
}

/* ---------------------------------------------------------------- the hub: reaping and bulk accept
 *
 * One thread for the whole process (started by supervisor.reaper) owns SIGCHLD and every
 * waitpid(-1): it waits in epoll_wait on a signalfd for SIGCHLD, a control eventfd, and the
 * listeners of accept mode's bulk units (units where no rule looks at an individual connection),
 * each unit through an Engine. When a listener is readable it accepts as many connections as
 * Python granted the engine, spawns one vfork child each (two at a time with the helper thread,
 * as accept_spawn does) and files a record per connection; on SIGCHLD it reaps every exited child
 * and files its exit. Python drains the records on the loop (hub_drain): the policy, the
 * bookkeeping and the log lines stay in Python; only the system calls moved.
 *
 * Waking the loop: at once (a write to the loop's eventfd) for what needs a decision: the exit
 * of a child that is not an engine's, an engine whose grant is used up or whose accept() failed
 * for lack of a resource, the exit of an engine's child while its grant is used up. Everything
 * else (the accepts of an engine that still has grant, the exits of its children) waits up to
 * HUB_DELAY (20 ms) after the first such record, so that one wake-up of the loop carries many
 * connections. A drain takes everything.
 *
 * execve() resets a child's exit signal to SIGCHLD, so every child, however it was started, is
 * reaped here; an engine's children are told apart by their pid (a hash table).
 *
 * Locking: hub.lock guards everything in `hub` and in every Engine. The thread holds it while it
 * accepts, reaps and files records, never while a child is being spawned (hub.busy says a batch
 * is being spawned from listener templates; dropping a listener waits for it). Python takes it
 * with the GIL released when it is contended. signal_child() signals a pid under the lock, and not
 * at all when its exit is filed and not yet drained: a pid reaped here is never signalled, so a
 * recycled pid cannot be hit. Engines are owned by Python; the hub holds borrowed pointers that
 * engine_unregister() clears (under the lock) before an engine can go.
 */

#include <sys/epoll.h>
#include <sys/eventfd.h>

#define HUB_LISTENERS 256
#define HUB_DELAY 0.02 /* seconds a record that needs no decision may wait */
#define HEV_CTL 0ULL
#define HEV_SIG 1ULL
#define HEV_LST 2ULL
#define HEV_DONE 3ULL /* an event already handled */
#define HEV(kind, idx, gen) (((uint64_t)(kind) << 56) | ((uint64_t)(uint32_t)(gen) << 24) | (uint64_t)(idx))
#define HEV_KIND(d) ((int)((d) >> 56))
#define HEV_GEN(d) ((uint32_t)(((d) >> 24) & 0xffffffffULL))
#define HEV_IDX(d) ((int)((d) & 0xffffffULL))

enum arec_kind { REC_ACCEPTED, REC_FAILED };

struct arec {          /* one accepted connection */
    int kind;
    pid_t pid;         /* ACCEPTED: its child */
    int stage, err;    /* FAILED: why it got none */
    double when;       /* CLOCK_MONOTONIC seconds */
    char remote[INET6_ADDRSTRLEN + 16];
};

struct xrec {          /* one exited child */
    pid_t pid;
    int status;
    double when;
};

typedef struct Engine {
    PyObject_HEAD
    long grant;        /* admissions left; 0: not accepting */
    int want_remote, err, registered, live;
    struct arec *recs;
    int nrecs, caprecs;
    struct Engine *next_pending; /* in hub.pending: it has records or an error */
    int pending;
} Engine;

struct hlst {
    int fd;            /* -1: free */
    Engine *e;
    Template *t;       /* a reference, dropped with the GIL */
    uint32_t gen;
    int armed;
};

struct hkid {
    pid_t pid;         /* 0: empty */
    Engine *e;         /* NULL: its engine is gone (its exit is then urgent) */
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t idle;
    pthread_t thread;
    pid_t owner;                  /* the process the fds and thread belong to */
    int running, stopping, busy, users;
    int epfd, ctlfd, sigfd, wakefd;
    struct hlst l[HUB_LISTENERS];
    int nl;
    struct hkid *kids;
    int nkids, capkids;           /* capkids: 0 or a power of two */
    struct xrec *exits;
    int nexits, capexits;
    Engine *pending;
    double deadline;              /* > 0: wake the loop then */
    int woken;                    /* the loop's eventfd was written since the last drain */
} hub = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .idle = PTHREAD_COND_INITIALIZER,
    .epfd = -1, .ctlfd = -1, .sigfd = -1, .wakefd = -1,
};

/* Take the hub's lock from Python: with the GIL released when someone else holds it. */
static void
hub_lock_py(void)
{
    if (pthread_mutex_trylock(&hub.lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&hub.lock);
        Py_END_ALLOW_THREADS
    }
}

/* Under the lock, from Python: until the thread has filed the batch it is spawning (if any),
 * with the GIL released while waiting, for at most `seconds` (< 0: no limit). A batch is at most
 * BATCH_MAX spawns; a child stopped before its exec holds it until the watchdog's kill, one
 * that execs from a hung filesystem for as long as that. 1 if the thread is idle. */
#define HUB_SYNC_WAIT 2.0 /* seconds a collecting drain waits for a batch in flight */

static int
hub_wait_idle(double seconds)
{
    struct timespec until = monotonic_in(seconds >= 0 ? seconds : 0);
    int timed_out = 0;

    while (hub.busy && !timed_out) {
        Py_BEGIN_ALLOW_THREADS
        if (seconds < 0)
            pthread_cond_wait(&hub.idle, &hub.lock);
        else
            timed_out = pthread_cond_timedwait(&hub.idle, &hub.lock, &until) == ETIMEDOUT;
        Py_END_ALLOW_THREADS
    }
    return !hub.busy;
}

/* Under the lock: something was filed; `urgent`: the loop must look at once. */
static void
hub_note(int urgent)
{
    if (hub.woken)
        return;
    if (urgent) {
        uint64_t one = 1;
        (void)!write(hub.wakefd, &one, sizeof(one));
        hub.woken = 1;
        hub.deadline = 0;
    }
    else if (hub.deadline == 0) {
        hub.deadline = mono_now() + HUB_DELAY;
    }
}

static void
engine_mark(Engine *e)
{
    if (!e->pending) {
        e->pending = 1;
        e->next_pending = hub.pending;
        hub.pending = e;
    }
}

static void
engine_unmark(Engine *e)
{
    Engine **p;
    if (!e->pending)
        return;
    for (p = &hub.pending; *p != NULL; p = &(*p)->next_pending)
        if (*p == e) {
            *p = e->next_pending;
            break;
        }
    e->pending = 0;
    e->next_pending = NULL;
}

/* ---- the engines' children, by pid: open addressing, linear probing, backward-shift delete */

static unsigned
kid_slot(pid_t pid)
{
    return ((unsigned)pid * 2654435761u) & (unsigned)(hub.capkids - 1);
}

static int
kids_grow(void)
{
    int old = hub.capkids, cap = old ? old * 2 : 256, i;
    struct hkid *prev = hub.kids, *k = calloc((size_t)cap, sizeof(*k));
    if (k == NULL)
        return -1;
    hub.kids = k;
    hub.capkids = cap;
    for (i = 0; i < old; i++)
        if (prev[i].pid > 0) {
            unsigned s = kid_slot(prev[i].pid);
            while (k[s].pid > 0)
                s = (s + 1) & (unsigned)(cap - 1);
            k[s] = prev[i];
        }
    free(prev);
    return 0;
}

static int
kid_add(pid_t pid, Engine *e)
{
    unsigned s;
    if ((hub.nkids + 1) * 2 > hub.capkids && kids_grow() < 0)
        return -1;
    s = kid_slot(pid);
    while (hub.kids[s].pid > 0 && hub.kids[s].pid != pid)
        s = (s + 1) & (unsigned)(hub.capkids - 1);
    if (hub.kids[s].pid == 0)
        hub.nkids++;
    hub.kids[s].pid = pid;
    hub.kids[s].e = e;
    return 0;
}

/* Remove `pid`; 1 and its engine (maybe NULL) in *e if it was an engine's child. */
static int
kid_take(pid_t pid, Engine **e)
{
    unsigned mask, s, j;
    if (hub.capkids == 0)
        return 0;
    mask = (unsigned)(hub.capkids - 1);
    s = kid_slot(pid);
    while (hub.kids[s].pid != pid) {
        if (hub.kids[s].pid == 0)
            return 0;
        s = (s + 1) & mask;
    }
    *e = hub.kids[s].e;
    hub.kids[s].pid = 0;
    hub.kids[s].e = NULL;
    hub.nkids--;
    /* Backward shift: move later entries of the run into the hole where their probe allows. */
    j = s;
    for (;;) {
        unsigned home;
        j = (j + 1) & mask;
        if (hub.kids[j].pid == 0)
            break;
        home = kid_slot(hub.kids[j].pid);
        /* Can the entry at j live at s? Only if s lies cyclically in [home, j). */
        if (((j - home) & mask) >= ((j - s) & mask)) {
            hub.kids[s] = hub.kids[j];
            hub.kids[j].pid = 0;
            hub.kids[j].e = NULL;
            s = j;
        }
    }
    return 1;
}

/* ---- records */

static int
arecs_reserve(Engine *e, int more)
{
    if (e->nrecs + more > e->caprecs) {
        int cap = e->caprecs ? e->caprecs : 64;
        struct arec *r;
        while (cap < e->nrecs + more)
            cap *= 2;
        if ((r = realloc(e->recs, sizeof(*r) * (size_t)cap)) == NULL)
            return -1;
        e->recs = r;
        e->caprecs = cap;
    }
    return 0;
}

static int
exits_reserve(int more)
{
    if (hub.nexits + more > hub.capexits) {
        int cap = hub.capexits ? hub.capexits : 64;
        struct xrec *r;
        while (cap < hub.nexits + more)
            cap *= 2;
        if ((r = realloc(hub.exits, sizeof(*r) * (size_t)cap)) == NULL)
            return -1;
        hub.exits = r;
        hub.capexits = cap;
    }
    return 0;
}

/* Under the lock: collect every exited child. Returns how many. */
/* Under the lock: file one connection's record for engine `e` (NULL: the engine is gone, and
 * only its child's exit is left to file, as urgent). pid > 0: its child; else stage and err say
 * why it got none. remote: the peer as log text, or NULL. */
static void
hub_file(Engine *e, pid_t pid, int stage, int err, double when, const char *remote)
{
    struct arec *r, spare;

    if (e == NULL) {
        if (pid > 0)
            (void)kid_add(pid, NULL);
        return;
    }
    r = arecs_reserve(e, 1) == 0 ? &e->recs[e->nrecs++] : &spare;
    r->pid = pid;
    r->when = when;
    if (remote != NULL)
        memcpy(r->remote, remote, sizeof(r->remote));
    else
        r->remote[0] = '\0';
    if (pid > 0) {
        r->kind = REC_ACCEPTED;
        r->stage = r->err = 0;
        if (kid_add(pid, e) == 0)
            e->live++;
        /* else (memory): its exit comes as an urgent one, which is only slower */
    }
    else {
        r->kind = REC_FAILED;
        r->stage = stage;
        r->err = err;
    }
}

#ifdef HAVE_CLONE3_RAW
/* Under the lock: a pending slot whose word the kernel has cleared. File its record and free
 * it; 1 if its child failed before its exec (then it is reaped here if `reap`, and no exit may
 * be filed for it). */
static int
nw_file(struct nwslot *sl, int reap)
{
    Engine *e = sl->engine;
    int stage = sl->a.err_stage;

    if (stage != STAGE_NONE) {
        if (reap)
            while (waitpid(sl->pid, NULL, 0) < 0 && errno == EINTR)
                ;
        hub_file(e, 0, stage > STAGE_NONE && stage <= STAGE_FORK ? stage : STAGE_FORK, sl->a.err_errno,
                 sl->when, sl->remote);
    }
    else {
        hub_file(e, sl->pid, 0, 0, sl->when, sl->remote);
    }
    if (e != NULL) {
        engine_mark(e);
        hub_note(e->grant <= 0);
    }
    nw_pending--;
    __atomic_store_n(&sl->state, NW_FREE, __ATOMIC_RELEASE);
    return stage != STAGE_NONE;
}

/* Under the lock: file every pending slot whose child has left our memory; the watchdog's check
 * for those still there after WATCH_MS. */
static void
hub_confirm(void)
{
    double now = -1;
    int k;

    for (k = 0; k < NW_SLOTS && nw_pending > 0; k++) {
        struct nwslot *sl = &nw[k];
        if (__atomic_load_n(&sl->state, __ATOMIC_ACQUIRE) != NW_PENDING)
            continue;
        if (__atomic_load_n(&sl->ctid, __ATOMIC_ACQUIRE) == 0) {
            (void)nw_file(sl, 1);
            continue;
        }
        if (now < 0)
            now = mono_now();
        if (now >= sl->watch_at) { /* every WATCH_MS, as the watchdog thread looks at vfork()s */
            sl->watch_at = now + WATCH_MS / 1000.0;
            watch_one(sl->pid); /* its word is set: it has not exited, so the pid is still its own */
        }
    }
}

/* Under the lock, in hub_reap: `pid` was reaped. If it was a pending slot's child, file it first
 * (its word is cleared by now); 1 if it failed before its exec, so that no exit is filed. */
static int
nw_reaped(pid_t pid)
{
    int k;
    for (k = 0; k < NW_SLOTS && nw_pending > 0; k++)
        if (__atomic_load_n(&nw[k].state, __ATOMIC_ACQUIRE) == NW_PENDING && nw[k].pid == pid)
            return nw_file(&nw[k], 0);
    return 0;
}

/* Under the lock, from Python with the GIL: confirm until `still(arg)` says no slot the caller
 * needs is pending, releasing the lock and the GIL between rounds; at most `seconds` (< 0: no
 * limit). 1 if none is left. */
static int
hub_wait_slots(int (*still)(void *), void *arg, double seconds)
{
    double until = seconds >= 0 ? mono_now() + seconds : 0;
    for (;;) {
        hub_confirm();
        if (!still(arg))
            return 1;
        if (seconds >= 0 && mono_now() >= until)
            return 0;
        pthread_mutex_unlock(&hub.lock);
        Py_BEGIN_ALLOW_THREADS
        struct timespec pause = {0, 200 * 1000};
        (void)nanosleep(&pause, NULL);
        pthread_mutex_lock(&hub.lock);
        Py_END_ALLOW_THREADS
    }
}

struct nw_snapshot {
    int n;
    int k[NW_SLOTS];
    pid_t pid[NW_SLOTS];
};

static int
nw_snapshot_pending(void *arg)
{
    const struct nw_snapshot *snap = arg;
    int i;
    for (i = 0; i < snap->n; i++)
        if (__atomic_load_n(&nw[snap->k[i]].state, __ATOMIC_ACQUIRE) == NW_PENDING &&
            nw[snap->k[i]].pid == snap->pid[i])
            return 1;
    return 0;
}

/* Under the lock, from Python: wait (at most `seconds`) for the children pending now to be
 * confirmed, so that what the caller reads next lists them. */
static void
hub_confirm_now(double seconds)
{
    struct nw_snapshot snap;
    int k;
    if (nw_pending == 0)
        return;
    snap.n = 0;
    for (k = 0; k < NW_SLOTS; k++)
        if (__atomic_load_n(&nw[k].state, __ATOMIC_ACQUIRE) == NW_PENDING) {
            snap.k[snap.n] = k;
            snap.pid[snap.n++] = nw[k].pid;
        }
    (void)hub_wait_slots(nw_snapshot_pending, &snap, seconds);
}

struct nw_templates {
    Template *const *ts;
    int n;
};

static int
nw_templates_pending(void *arg)
{
    const struct nw_templates *tt = arg;
    int k, i;
    for (k = 0; k < NW_SLOTS; k++) {
        int st = __atomic_load_n(&nw[k].state, __ATOMIC_ACQUIRE);
        if (st != NW_PENDING && st != NW_SPAWNED)
            continue;
        for (i = 0; i < tt->n; i++)
            if (nw[k].t == tt->ts[i])
                return 1;
    }
    return 0;
}
#else
#define nw_pending 0
static void hub_confirm(void) {}
static int nw_reaped(pid_t pid) { (void)pid; return 0; }
static void hub_confirm_now(double seconds) { (void)seconds; }
#endif

static int
hub_reap(void)
{
    int n = 0;
    for (;;) {
        int status, urgent = 1;
        Engine *e = NULL;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0)
            break;
        n++;
        if (nw_pending > 0 && nw_reaped(pid))
            continue; /* failed before its exec: its FAILED record is filed instead */
        if (kid_take(pid, &e) && e != NULL) {
            e->live--;
            urgent = e->grant <= 0;
        }
        if (exits_reserve(1) == 0) {
            struct xrec *x = &hub.exits[hub.nexits++];
            x->pid = pid;
            x->status = status;
            x->when = mono_now();
        }
        /* else (memory): the exit is lost; the child is gone all the same */
        hub_note(urgent);
    }
    return n;
}

static void
engine_arm(Engine *e, int on)
{
    int i;
    for (i = 0; i < hub.nl; i++) {
        struct hlst *L = &hub.l[i];
        struct epoll_event ev;
        if (L->fd < 0 || L->e != e || L->armed == on)
            continue;
        ev.events = on ? EPOLLIN : 0;
        ev.data.u64 = HEV(HEV_LST, i, L->gen);
        if (epoll_ctl(hub.epfd, EPOLL_CTL_MOD, L->fd, &ev) == 0)
            L->armed = on;
    }
}

/* Under the lock: listener idx is readable. Accept what the grant allows, spawn (unlocked),
 * file the records. */
static void
hub_listener_ready(int idx, uint32_t gen)
{
    struct conn conns[BATCH_MAX];
    struct hlst *L = &hub.l[idx];
    Engine *e;
    Template *t;
    int n = 0, stop = 0, want, i, want_remote;
    double t0;

    if (idx >= hub.nl || L->fd < 0 || L->gen != gen || !L->armed || L->e == NULL || L->e->grant <= 0)
        return;
    e = L->e;
    want = e->grant < BATCH_MAX ? (int)e->grant : BATCH_MAX;
    /* With no child of the engine running (one client at a time), one connection is queued: the
     * look-ahead accept would only return EAGAIN. If more were queued, epoll reports the listener
     * again at once, and by then a child runs, so the next round accepts them all. */
    if (e->live == 0 && want > 1)
        want = 1;
    n = accept_queued(L->fd, conns, want, &stop);
    e->grant -= n;
    if (n > 0) {
        t = L->t;
        want_remote = e->want_remote;
        hub.busy = 1;
        pthread_mutex_unlock(&hub.lock);
        t0 = mono_now();
        spawn_all(t, conns, n, 1);
        pthread_mutex_lock(&hub.lock);
        hub.busy = 0;
        pthread_cond_broadcast(&hub.idle);
        /* The engine is still there: dropping a listener (engine_unregister) waits for busy. */
        for (i = 0; i < n; i++) {
            struct conn *c = &conns[i];
#ifdef HAVE_CLONE3_RAW
            if (c->slot >= 0) { /* not waited for: filed when confirmed */
                struct nwslot *sl = &nw[c->slot];
                sl->engine = e;
                sl->when = t0;
                sl->watch_at = t0 + WATCH_MS / 1000.0;
                if (want_remote)
                    memcpy(sl->remote, c->remote, sizeof(sl->remote));
                else
                    sl->remote[0] = '\0';
                nw_pending++;
                __atomic_store_n(&sl->state, NW_PENDING, __ATOMIC_RELEASE);
                continue;
            }
#endif
            hub_file(e, c->pid, c->stage, c->err, t0, want_remote ? c->remote : NULL);
        }
        hub_confirm();
    }
    if (stop)
        e->err = stop;
    if (stop || e->grant <= 0)
        engine_arm(e, 0);
    if (n > 0 || stop) {
        engine_mark(e);
        hub_note(stop != 0 || e->grant <= 0);
    }
}

static void *
hub_main(void *unused)
{
    struct epoll_event evs[64];
    int sig_ready = 0;
    (void)unused;
    pthread_mutex_lock(&hub.lock);
    while (!hub.stopping) {
        int timeout = -1, n, i;
        if (hub.deadline > 0) {
            double left = hub.deadline - mono_now();
            timeout = left <= 0 ? 0 : (int)(left * 1000.0) + 1;
        }
#ifdef HAVE_CLONE3_RAW
        if (nw_pending > 0 && (timeout < 0 || timeout > NW_POLL_MS))
            timeout = NW_POLL_MS; /* children not waited for are confirmed at least this often */
#endif
        pthread_mutex_unlock(&hub.lock);
        n = epoll_wait(hub.epfd, evs, 64, timeout);
        pthread_mutex_lock(&hub.lock);
        if (n < 0 && errno != EINTR)
            break;
        for (i = 0; i < n; i++) /* exits first: an engine's count of running children is then current */
            if (HEV_KIND(evs[i].data.u64) == (int)HEV_SIG) {
                evs[i].data.u64 = HEV(HEV_DONE, 0, 0);
                sig_ready = 1;
            }
        if (sig_ready) {
            char buf[128 * 16];
            /* Signals coalesce and waitpid() collects them all: a short read means empty. */
            while (read(hub.sigfd, buf, sizeof(buf)) == (ssize_t)sizeof(buf))
                ;
            (void)hub_reap();
            sig_ready = 0;
        }
        for (i = 0; i < n && !hub.stopping; i++) {
            uint64_t d = evs[i].data.u64;
            int kind = HEV_KIND(d);
            if (kind == (int)HEV_CTL) {
                uint64_t v;
                (void)!read(hub.ctlfd, &v, sizeof(v));
            }
            else if (kind == (int)HEV_LST) {
                hub_listener_ready(HEV_IDX(d), HEV_GEN(d));
            }
        }
        hub_confirm();
        if (hub.deadline > 0 && !hub.woken && mono_now() >= hub.deadline) {
            uint64_t one = 1;
            (void)!write(hub.wakefd, &one, sizeof(one));
            hub.woken = 1;
            hub.deadline = 0;
        }
    }
    pthread_mutex_unlock(&hub.lock);
    return NULL;
}

static void
hub_close_fds(void)
{
    int *fds[] = {&hub.epfd, &hub.ctlfd, &hub.sigfd, &hub.wakefd};
    size_t i;
    for (i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
        if (*fds[i] >= 0) {
            (void)close(*fds[i]);
            *fds[i] = -1;
        }
}

/* With the GIL: create the fds (blocking SIGCHLD in the calling thread). */
static int
hub_setup(void)
{
    sigset_t set;
    struct epoll_event ev;
    int err;

    if (hub.owner == getpid() && hub.epfd >= 0)
        return 0;
    /* A fork()ed copy: what the parent had is not ours (its thread does not exist here). */
    hub.running = hub.stopping = hub.busy = hub.woken = 0;
    hub.deadline = 0;
    hub.nexits = hub.nkids = hub.nl = 0;
    hub.pending = NULL;
    if (hub.kids != NULL)
        memset(hub.kids, 0, sizeof(*hub.kids) * (size_t)hub.capkids);
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    if ((err = pthread_sigmask(SIG_BLOCK, &set, NULL)) != 0) {
        errno = err;
        return -1;
    }
    hub.epfd = epoll_create1(EPOLL_CLOEXEC);
    hub.ctlfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    hub.wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    hub.sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (hub.epfd < 0 || hub.ctlfd < 0 || hub.wakefd < 0 || hub.sigfd < 0)
        goto fail;
    ev.events = EPOLLIN;
    ev.data.u64 = HEV(HEV_CTL, 0, 0);
    if (epoll_ctl(hub.epfd, EPOLL_CTL_ADD, hub.ctlfd, &ev) < 0)
        goto fail;
    ev.data.u64 = HEV(HEV_SIG, 0, 0);
    if (epoll_ctl(hub.epfd, EPOLL_CTL_ADD, hub.sigfd, &ev) < 0)
        goto fail;
    hub.owner = getpid();
    return 0;
fail:
    err = errno;
    hub_close_fds();
    errno = err;
    return -1;
}

static int
hub_start_thread(void)
{
    sigset_t all, old;
    int err;
    if (hub.running)
        return 0;
    /* Every signal blocked: the thread never runs a signal handler, and its vfork children start
     * with every signal blocked until child_exec resets them. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    hub.stopping = 0;
    err = pthread_create(&hub.thread, NULL, hub_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        errno = err;
        return -1;
    }
    hub.running = 1;
    return 0;
}

/* With the GIL: stop the thread and wait for it (it may be spawning). */
static void
hub_stop_thread(void)
{
    uint64_t one = 1;
    if (!hub.running || hub.owner != getpid())
        return;
    hub_lock_py();
    hub.stopping = 1;
    pthread_mutex_unlock(&hub.lock);
    (void)!write(hub.ctlfd, &one, sizeof(one));
    Py_BEGIN_ALLOW_THREADS
    pthread_join(hub.thread, NULL);
    Py_END_ALLOW_THREADS
    hub.running = 0;
}

PyDoc_STRVAR(hub_open_doc,
"hub_open() -> int\n--\n\n"
"Start the process's hub thread (once per user: hub_close() undoes one): it reaps every child\n"
"and serves the engines. Blocks SIGCHLD in the calling thread. Returns the eventfd that becomes\n"
"readable when there is something to drain.");

static PyObject *
hub_open(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    (void)module;
    if (hub.owner != getpid())
        hub.users = 0;
#ifdef HAVE_CLONE3_RAW
    (void)nw_enabled(); /* reads the environment here, with the GIL, not in the thread */
#endif
    if (hub_setup() < 0 || hub_start_thread() < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    hub.users++;
    return PyLong_FromLong(hub.wakefd);
}

PyDoc_STRVAR(hub_close_doc,
"hub_close() -> None\n--\n\nThe last user gone: stop the thread and close its fds.");

static PyObject *
hub_close(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    (void)module;
    if (hub.owner != getpid() || hub.users <= 0)
        Py_RETURN_NONE;
    if (--hub.users > 0)
        Py_RETURN_NONE;
    hub_stop_thread();
    hub_close_fds();
    hub.owner = 0;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(hub_pause_doc,
"hub_pause(paused, /) -> None\n--\n\n"
"True: stop the thread (nothing is reaped or accepted until False starts it again); before a\n"
"re-exec, so the state handed over is final.");

static PyObject *
hub_pause(PyObject *module, PyObject *arg)
{
    int paused = PyObject_IsTrue(arg);
    (void)module;
    if (paused < 0)
        return NULL;
    if (hub.owner != getpid() || hub.users <= 0)
        Py_RETURN_NONE;
    if (paused)
        hub_stop_thread();
    else if (hub_start_thread() < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(watchdog_kills_doc,
"watchdog_kills() -> int\n--\n\n"
"How many children the watchdog has killed in this process: stopped (SIGSTOP, ptrace) between\n"
"their setuid() and their exec, which would have held the thread that spawned them.");

static PyObject *
py_watchdog_kills(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    (void)module;
    return PyLong_FromUnsignedLong(__atomic_load_n(&watchdog_kills, __ATOMIC_RELAXED));
}

PyDoc_STRVAR(hub_pending_doc,
"hub_pending() -> int\n--\n\n"
"How many of the hub's children not waited for are not confirmed yet (exec'ed or failed): slots\n"
"still held. 0 when nothing is in flight.");

static PyObject *
py_hub_pending(PyObject *module, PyObject *Py_UNUSED(ignored))
{
    int n = 0;
    (void)module;
#ifdef HAVE_CLONE3_RAW
    int k;
    for (k = 0; k < NW_SLOTS; k++) {
        int st = __atomic_load_n(&nw[k].state, __ATOMIC_ACQUIRE);
        n += st == NW_SPAWNED || st == NW_PENDING;
    }
#endif
    return PyLong_FromLong(n);
}

PyDoc_STRVAR(hub_drain_doc,
"hub_drain(collect, /) -> (batches, exits)\n--\n\n"
"Take everything filed since the last drain. collect: first wait (up to 2 s) for a batch the\n"
"thread is spawning to be filed, then reap in this thread too (what has exited by now is in\n"
"`exits`), so that every child started so far is in `batches` or was in an earlier drain.\n"
"batches: (engine, accepted, failures, errno) per engine with records: accepted (pid, when, remote) per child started, failures (stage, errno, remote) per\n"
"admitted connection that got no child, errno the accept() error that stopped it for lack of a\n"
"resource (else 0); remote: the peer as log text, or '' (see Engine.grant). exits: (pid, status,\n"
"when) per child reaped. `when`: time.monotonic() seconds.");

static PyObject *
hub_drain(PyObject *module, PyObject *arg)
{
    int collect = PyObject_IsTrue(arg), nx, i;
    struct xrec *xs = NULL;
    PyObject *batches = NULL, *exits = NULL, *item;
    Engine *e, *next;

    (void)module;
    if (collect < 0)
        return NULL;
    if ((batches = PyList_New(0)) == NULL)
        return NULL;
    if (hub.owner != getpid() || hub.epfd < 0)
        return Py_BuildValue("(N[])", batches);
    {
        uint64_t v;
        (void)!read(hub.wakefd, &v, sizeof(v));
    }
    hub_lock_py();
    /* collect: what the caller reads next must be complete (status, stop, a hand-over), so a
     * batch the thread is spawning is waited for and filed first. Reaping during the batch would
     * also reap a child of it that exited at once before its record (and its place in the kids
     * table) exists. */
    if (collect && hub_wait_idle(HUB_SYNC_WAIT)) {
        /* The children not waited for, as they are now; that wait lets the thread run, so the
         * batch it may have started meanwhile is waited for again before reaping. */
        hub_confirm_now(HUB_SYNC_WAIT);
        if (hub_wait_idle(HUB_SYNC_WAIT))
            (void)hub_reap();
    }
    nx = hub.nexits;
    if (nx > 0 && (xs = malloc(sizeof(*xs) * (size_t)nx)) == NULL) {
        pthread_mutex_unlock(&hub.lock);
        Py_DECREF(batches);
        return PyErr_NoMemory();
    }
    if (nx > 0)
        memcpy(xs, hub.exits, sizeof(*xs) * (size_t)nx);
    hub.nexits = 0;
    hub.woken = 0;
    hub.deadline = 0;
    /* The engines' records: copied under the lock, built into objects after it. An engine on
     * the pending list is alive (unregistering unlinks it), and stays alive here: the GIL is
     * held and only Python drops engines. */
    e = hub.pending;
    hub.pending = NULL;
    for (; e != NULL; e = next) {
        struct arec *rs = NULL;
        int nr = e->nrecs, err = e->err, na = 0, nf = 0;
        PyObject *acc, *fail;
        next = e->next_pending;
        e->pending = 0;
        e->next_pending = NULL;
        if (nr > 0 && (rs = malloc(sizeof(*rs) * (size_t)nr)) == NULL)
            continue; /* memory: these records are lost (their exits still come) */
        if (nr > 0)
            memcpy(rs, e->recs, sizeof(*rs) * (size_t)nr);
        e->nrecs = 0;
        e->err = 0;
        for (i = 0; i < nr; i++) {
            na += rs[i].kind == REC_ACCEPTED;
            nf += rs[i].kind == REC_FAILED;
        }
        acc = PyList_New(na);
        fail = PyList_New(nf);
        na = nf = 0;
        for (i = 0; acc != NULL && fail != NULL && i < nr; i++) {
            struct arec *r = &rs[i];
            if (r->kind == REC_ACCEPTED) {
                item = Py_BuildValue("(idN)", (int)r->pid, r->when,
                                     PyUnicode_DecodeASCII(r->remote, (Py_ssize_t)strlen(r->remote), "replace"));
                if (item == NULL)
                    break;
                PyList_SET_ITEM(acc, na++, item);
            }
            else {
                int stage = r->stage > STAGE_NONE && r->stage <= STAGE_CGROUP ? r->stage : STAGE_FORK;
                item = Py_BuildValue("(sis)", stage_names[stage], r->err, r->remote);
                if (item == NULL)
                    break;
                PyList_SET_ITEM(fail, nf++, item);
            }
        }
        free(rs);
        if (acc == NULL || fail == NULL || i < nr ||
            (item = Py_BuildValue("(ONNi)", (PyObject *)e, acc, fail, err)) == NULL) {
            /* Out of memory building objects: unlock first, then report. */
            Py_XDECREF(acc);
            Py_XDECREF(fail);
            for (e = next; e != NULL; e = next) { /* the others keep their records for next time */
                next = e->next_pending;
                e->next_pending = hub.pending;
                hub.pending = e;
            }
            pthread_mutex_unlock(&hub.lock);
            free(xs);
            Py_DECREF(batches);
            return PyErr_NoMemory();
        }
        if (PyList_Append(batches, item) < 0) {
            Py_DECREF(item);
            pthread_mutex_unlock(&hub.lock);
            free(xs);
            Py_DECREF(batches);
            return NULL;
        }
        Py_DECREF(item);
    }
    pthread_mutex_unlock(&hub.lock);
    if ((exits = PyList_New(nx)) == NULL)
        goto fail;
    for (i = 0; i < nx; i++) {
        if ((item = Py_BuildValue("(iid)", (int)xs[i].pid, xs[i].status, xs[i].when)) == NULL)
            goto fail;
        PyList_SET_ITEM(exits, i, item);
    }
    free(xs);
    return Py_BuildValue("(NN)", batches, exits);
fail:
    free(xs);
    Py_XDECREF(exits);
    Py_DECREF(batches);
    return NULL;
}

PyDoc_STRVAR(signal_child_doc,
"signal_child(pid, signal, group, /) -> bool\n--\n\n"
"Send `signal` to the process group `pid` leads (group: else to the pid alone; a group that is\n"
"gone falls back to the pid), unless the hub reaped `pid` and its exit is not drained yet (it\n"
"is gone; its pid may be another process's by now). Whether it was sent.");

static PyObject *
signal_child(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long pid, sig;
    int group, i, reaped = 0, rc = -1, err = 0;
    int locked = 0;

    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "signal_child(pid, signal, group)");
        return NULL;
    }
    if ((pid = PyLong_AsLong(args[0])) == -1 && PyErr_Occurred())
        return NULL;
    if ((sig = PyLong_AsLong(args[1])) == -1 && PyErr_Occurred())
        return NULL;
    if ((group = PyObject_IsTrue(args[2])) < 0)
        return NULL;
    if (pid <= 0) {
        errno = ESRCH;
        return PyErr_SetFromErrno(PyExc_ProcessLookupError);
    }
    if (hub.owner == getpid() && hub.epfd >= 0) {
        hub_lock_py();
        locked = 1;
        for (i = 0; i < hub.nexits; i++)
            if (hub.exits[i].pid == (pid_t)pid) {
                reaped = 1;
                break;
            }
    }
    if (!reaped) {
        if (group) {
            rc = kill(-(pid_t)pid, (int)sig);
            if (rc < 0 && (errno == ESRCH || errno == EPERM))
                rc = kill((pid_t)pid, (int)sig);
        }
        else {
            rc = kill((pid_t)pid, (int)sig);
        }
        err = rc < 0 ? errno : 0;
    }
    if (locked)
        pthread_mutex_unlock(&hub.lock);
    if (reaped)
        Py_RETURN_FALSE;
    if (rc < 0) {
        errno = err;
        return PyErr_SetFromErrno(err == ESRCH ? PyExc_ProcessLookupError :
                                  err == EPERM ? PyExc_PermissionError : PyExc_OSError);
    }
    Py_RETURN_TRUE;
}

/* ---- Engine: one bulk accept unit's side of the hub */

static void
engine_drop_listeners(Engine *e)
{
    Template *drop[HUB_LISTENERS];
    int i, nd = 0;

    hub_lock_py();
    (void)hub_wait_idle(-1); /* the thread may be using a listener's template */
    for (i = 0; i < hub.nl; i++) {
        struct hlst *L = &hub.l[i];
        if (L->fd < 0 || L->e != e)
            continue;
        (void)epoll_ctl(hub.epfd, EPOLL_CTL_DEL, L->fd, NULL);
        L->fd = -1;
        L->e = NULL;
        L->armed = 0;
        L->gen++;
        drop[nd++] = L->t;
        L->t = NULL;
    }
    while (hub.nl > 0 && hub.l[hub.nl - 1].fd < 0)
        hub.nl--;
#ifdef HAVE_CLONE3_RAW
    /* A child not waited for may still read its template: the references go when none does
     * (no new one can start: the listeners are gone; one stopped before its exec is killed). */
    if (nd > 0 && nw_pending > 0) {
        struct nw_templates tt = {drop, nd};
        (void)hub_wait_slots(nw_templates_pending, &tt, -1);
    }
#endif
    pthread_mutex_unlock(&hub.lock);
    for (i = 0; i < nd; i++)
        Py_XDECREF(drop[i]);
}

static void
engine_unregister(Engine *e)
{
    int i;
    if (!e->registered)
        return;
    engine_drop_listeners(e);
    hub_lock_py();
    engine_unmark(e);
    for (i = 0; i < hub.capkids; i++)
        if (hub.kids[i].pid > 0 && hub.kids[i].e == e)
            hub.kids[i].e = NULL; /* its exit will be urgent, and still drained */
#ifdef HAVE_CLONE3_RAW
    for (i = 0; i < NW_SLOTS; i++)
        if (nw[i].state == NW_PENDING && nw[i].engine == e)
            nw[i].engine = NULL; /* likewise, once confirmed */
#endif
    e->registered = 0;
    e->grant = 0;
    pthread_mutex_unlock(&hub.lock);
}

static void
engine_dealloc(Engine *e)
{
    if (hub.owner == getpid())
        engine_unregister(e);
    free(e->recs);
    PyObject_Free(e);
}

static PyObject *
engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Engine *e;
    if (!_PyArg_NoKeywords("Engine", kwds) || !PyArg_ParseTuple(args, ":Engine"))
        return NULL;
    if (hub.owner != getpid() || !hub.running) {
        PyErr_SetString(PyExc_RuntimeError, "the hub is not running (hub_open())");
        return NULL;
    }
    if ((e = PyObject_New(Engine, type)) == NULL)
        return NULL;
    e->grant = 0;
    e->want_remote = e->err = e->live = 0;
    e->recs = NULL;
    e->nrecs = e->caprecs = 0;
    e->next_pending = NULL;
    e->pending = 0;
    e->registered = 1;
    return (PyObject *)e;
}

PyDoc_STRVAR(engine_add_doc,
"add(listen_fd, template, /) -> None\n--\n\n"
"Serve the non-blocking `listen_fd` with children from `template`; armed while there is grant.");

static PyObject *
engine_add(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    long fd;
    int i, idx = -1;
    struct epoll_event ev;
    struct hlst *L;

    if (nargs != 2 || !PyObject_TypeCheck(args[1], &TemplateType)) {
        PyErr_SetString(PyExc_TypeError, "add(listen_fd, template)");
        return NULL;
    }
    if ((fd = PyLong_AsLong(args[0])) == -1 && PyErr_Occurred())
        return NULL;
    if (!e->registered || hub.owner != getpid()) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is closed");
        return NULL;
    }
    hub_lock_py();
    for (i = 0; i < hub.nl; i++)
        if (hub.l[i].fd < 0) {
            idx = i;
            break;
        }
    if (idx < 0 && hub.nl < HUB_LISTENERS)
        idx = hub.nl++;
    if (idx < 0) {
        pthread_mutex_unlock(&hub.lock);
        PyErr_SetString(PyExc_ValueError, "too many listeners on the hub");
        return NULL;
    }
    L = &hub.l[idx];
    L->gen++;
    ev.events = e->grant > 0 ? EPOLLIN : 0;
    ev.data.u64 = HEV(HEV_LST, idx, L->gen);
    if (epoll_ctl(hub.epfd, EPOLL_CTL_ADD, (int)fd, &ev) < 0) {
        int saved = errno;
        while (hub.nl > 0 && hub.l[hub.nl - 1].fd < 0)
            hub.nl--;
        pthread_mutex_unlock(&hub.lock);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_INCREF(args[1]);
    L->t = (Template *)args[1];
    L->e = e;
    L->fd = (int)fd;
    L->armed = e->grant > 0;
    pthread_mutex_unlock(&hub.lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(engine_clear_doc,
"clear() -> None\n--\n\nDrop every listener (after a batch being spawned from them is done).");

static PyObject *
engine_clear(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (e->registered && hub.owner == getpid())
        engine_drop_listeners(e);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(engine_grant_doc,
"grant(n, want_remote, /) -> int\n--\n\n"
"Allow `n` more admissions from now on (0: stop accepting), replacing what was left of the\n"
"previous grant; returns what was left. want_remote: file each peer as log text.");

static PyObject *
engine_grant(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    long n, left;
    int want_remote;

    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "grant(n, want_remote)");
        return NULL;
    }
    if ((n = PyLong_AsLong(args[0])) == -1 && PyErr_Occurred())
        return NULL;
    if ((want_remote = PyObject_IsTrue(args[1])) < 0)
        return NULL;
    if (!e->registered || hub.owner != getpid()) {
        left = e->grant;
        e->grant = 0;
        return PyLong_FromLong(left);
    }
    hub_lock_py();
    left = e->grant;
    e->grant = n > 0 ? n : 0;
    e->want_remote = want_remote;
    engine_arm(e, e->grant > 0);
    pthread_mutex_unlock(&hub.lock);
    return PyLong_FromLong(left);
}

PyDoc_STRVAR(engine_close_doc,
"close() -> None\n--\n\nDrop the listeners and leave the hub; children still running are reaped\n"
"as any other child (their exits come in hub_drain's exits).");

static PyObject *
engine_close(Engine *e, PyObject *Py_UNUSED(ignored))
{
    if (hub.owner == getpid())
        engine_unregister(e);
    e->registered = 0;
    Py_RETURN_NONE;
}

static PyObject *
engine_get_live(Engine *e, void *closure)
{
    long n;
    (void)closure;
    if (!e->registered || hub.owner != getpid())
        return PyLong_FromLong(0);
    hub_lock_py();
    n = e->live;
    pthread_mutex_unlock(&hub.lock);
    return PyLong_FromLong(n);
}

static PyMethodDef engine_methods[] = {
    {"add", (PyCFunction)(void (*)(void))engine_add, METH_FASTCALL, engine_add_doc},
    {"clear", (PyCFunction)engine_clear, METH_NOARGS, engine_clear_doc},
    {"grant", (PyCFunction)(void (*)(void))engine_grant, METH_FASTCALL, engine_grant_doc},
    {"close", (PyCFunction)engine_close, METH_NOARGS, engine_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef engine_getset[] = {
    {"live", (getter)engine_get_live, NULL, "Children it started that are not reaped yet.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "supervisor._spawn.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One bulk accept unit on the hub: its listeners, its grant, its records.",
    .tp_new = engine_new,
    .tp_methods = engine_methods,
    .tp_getset = engine_getset,
};

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
    {"template", (PyCFunction)(void (*)(void))template_new, METH_FASTCALL, template_doc},
    {"accept_spawn", (PyCFunction)(void (*)(void))accept_spawn, METH_FASTCALL, accept_spawn_doc},
    {"hub_open", hub_open, METH_NOARGS, hub_open_doc},
    {"hub_close", hub_close, METH_NOARGS, hub_close_doc},
    {"hub_pause", hub_pause, METH_O, hub_pause_doc},
    {"hub_drain", hub_drain, METH_O, hub_drain_doc},
    {"watchdog_kills", py_watchdog_kills, METH_NOARGS, watchdog_kills_doc},
    {"hub_pending", py_hub_pending, METH_NOARGS, hub_pending_doc},
    {"signal_child", (PyCFunction)(void (*)(void))signal_child, METH_FASTCALL, signal_child_doc},
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
    PyObject *m;
    int err;
    if ((err = monotonic_cond_init(&inflight_wake)) != 0 || (err = monotonic_cond_init(&hub.idle)) != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (PyType_Ready(&TemplateType) < 0 || PyType_Ready(&EngineType) < 0)
        return NULL;
    m = PyModule_Create(&spawn_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Template", (PyObject *)&TemplateType) < 0 ||
        PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
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
