/* clonespawn.c - a per-connection spawner that does not wait for each exec (a reference for
 * bench/accept.py, contenders "clone" and "clone-batch"; see bench/README.md).
 *
 *   clonespawn -p PORT [-b BACKLOG] [-m clone|batch] -- PROG [ARGS...]
 *
 * Each child is started with clone(CLONE_VM | CLONE_CHILD_CLEARTID): like vfork() it shares the
 * spawner's memory until it execs, so nothing is copied, but without CLONE_VFORK the spawner
 * goes on at once. Each child needs a stack of its own, which may be reused only once the
 * child has left the spawner's memory: the kernel then writes 0 to the child's `tid` word and
 * wakes a futex on it (at execve's point of no return, or at exit).
 *
 *   -m clone  accept4 (blocking), clone, go on; a stack is reused when its tid is 0
 *   -m batch  accept every queued connection (non-blocking), clone one child each, then wait
 *             until all of them have exec'ed: what a spawner must do to learn each exec's
 *             result before it answers for the batch
 *
 * The child makes raw system calls only (dup2 x2, execve, exit): it runs on the spawner's
 * thread-local storage, so even errno is not its own. Loopback only; no limits, no logging,
 * exec failures are not reported. Build: gcc -O2 -Wall -o clonespawn clonespawn.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "clonespawn: the child's raw system calls are written for x86-64"
#endif

extern char **environ;

#define SLOTS 128
#define STACK (64 * 1024)

struct slot {
    int tid; /* 1 while the child may still use the stack; the kernel sets 0 */
    int fd;  /* the connection, for the child */
    char *stack;
};

static struct slot slots[SLOTS];
static const char *prog;
static char **pargv;

static long
raw3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static int
child(void *arg)
{
    struct slot *s = arg;
    if (raw3(SYS_dup2, s->fd, 0, 0) < 0 || raw3(SYS_dup2, s->fd, 1, 0) < 0)
        raw3(SYS_exit_group, 126, 0, 0);
    raw3(SYS_execve, (long)prog, (long)pargv, (long)environ);
    raw3(SYS_exit_group, 127, 0, 0);
    return 0;
}

static void
wait_slot(struct slot *s)
{
    int v;
    while ((v = __atomic_load_n(&s->tid, __ATOMIC_ACQUIRE)) != 0)
        syscall(SYS_futex, &s->tid, FUTEX_WAIT, v, NULL, NULL, 0);
}

/* Start PROG on connection c from slot s (whose previous child has left). */
static void
start(struct slot *s, int c)
{
    if (s->stack == NULL) {
        s->stack = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (s->stack == MAP_FAILED) {
            perror("mmap");
            exit(1);
        }
    }
    s->fd = c;
    s->tid = 1;
    /* No CLONE_FILES: the child has its own copy of the fd table, so c may be closed at once. */
    if (clone(child, s->stack + STACK, CLONE_VM | CLONE_CHILD_CLEARTID | SIGCHLD, s, NULL, NULL, &s->tid) < 0) {
        s->tid = 0;
        perror("clone");
    }
}

static void
reap(void)
{
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int
main(int argc, char **argv)
{
    int port = 0, backlog = 128, batch = 0, opt, ls, one = 1, next = 0;
    struct sockaddr_in sin;

    while ((opt = getopt(argc, argv, "p:b:m:")) != -1) {
        if (opt == 'p')
            port = atoi(optarg);
        else if (opt == 'b')
            backlog = atoi(optarg);
        else if (opt == 'm' && (!strcmp(optarg, "clone") || !strcmp(optarg, "batch")))
            batch = !strcmp(optarg, "batch");
        else
            goto usage;
    }
    if (port <= 0 || port > 65535 || optind >= argc)
        goto usage;
    pargv = argv + optind;
    prog = pargv[0];

    /* No signal handler is installed, so none can run in a child that shares our memory. */

    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((unsigned short)port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | (batch ? SOCK_NONBLOCK : 0), 0);
    if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(ls, (struct sockaddr *)&sin, sizeof(sin)) < 0 || listen(ls, backlog) < 0) {
        perror("listen");
        return 1;
    }
    for (;;) {
        if (!batch) {
            int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0) {
                if (errno != EINTR && errno != ECONNABORTED)
                    usleep(1000);
                continue;
            }
            wait_slot(&slots[next]); /* at most SLOTS children not yet exec'ed */
            start(&slots[next], c);
            next = (next + 1) % SLOTS;
            close(c);
        }
        else {
            struct pollfd p = {ls, POLLIN, 0};
            int fds[SLOTS], n = 0, i;
            (void)poll(&p, 1, -1);
            while (n < SLOTS && (fds[n] = accept4(ls, NULL, NULL, SOCK_CLOEXEC)) >= 0)
                n++;
            for (i = 0; i < n; i++)
                start(&slots[i], fds[i]);
            for (i = 0; i < n; i++) {
                wait_slot(&slots[i]);
                close(fds[i]);
            }
        }
        reap();
    }

usage:
    fprintf(stderr, "usage: clonespawn -p PORT [-b BACKLOG] [-m clone|batch] -- PROG [ARGS...]\n");
    return 2;
}
