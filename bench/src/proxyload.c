/* The client side of bench/proxy.py: bounded in bytes, requests and time.
 *
 *   proxyload bulk PORT BYTES            send "BYTES\n" and BYTES on one connection, read "COUNT n";
 *                                        prints: seconds bytes_confirmed
 *   proxyload rr PORT CONC SIZE SECONDS  CONC connections, each: send SIZE bytes, read SIZE back, again;
 *                                        prints: requests seconds errors
 *   proxyload first PORT TIMEOUT         connect, send one byte, wait for the echo (connect to first byte);
 *                                        prints: seconds (or "fail ERR")
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int dial(int port, int nonblock) {
    int s = socket(AF_INET, SOCK_STREAM | (nonblock ? SOCK_NONBLOCK : 0), 0), one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) { close(s); return -1; }
    return s;
}

static int bulk(int port, unsigned long long bytes) {
    static char buf[1 << 20];
    int s = dial(port, 0);
    if (s < 0) { perror("connect"); return 1; }
    double t0 = now();
    unsigned long long sent = 0;
    char hdr[32];
    int hl = snprintf(hdr, sizeof hdr, "%llu\n", bytes);
    if (write(s, hdr, hl) != hl) { perror("write"); return 1; }
    while (sent < bytes) {
        size_t n = bytes - sent < sizeof buf ? bytes - sent : sizeof buf;
        ssize_t w = write(s, buf, n);
        if (w <= 0) { perror("write"); return 1; }
        sent += w;
    }
    char line[64] = {0};
    size_t got = 0;
    ssize_t r;
    while (got < sizeof line - 1 && (r = read(s, line + got, sizeof line - 1 - got)) > 0) got += r;
    double t = now() - t0;
    unsigned long long confirmed = 0;
    sscanf(line, "COUNT %llu", &confirmed);
    printf("%.6f %llu\n", t, confirmed);
    return confirmed == bytes ? 0 : 1;
}

static int rr(int port, int conc, int size, double seconds) {
    int ep = epoll_create1(0);
    int *fds = calloc(conc, sizeof *fds), *have = calloc(conc, sizeof *have);
    char *msg = malloc(size), *buf = malloc(65536);
    memset(msg, 'r', size);
    for (int i = 0; i < conc; i++) {
        fds[i] = dial(port, 0);
        if (fds[i] < 0) { perror("connect"); return 1; }
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = i };
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    long long requests = 0, errors = 0;
    double t0 = now(), end = t0 + seconds;
    for (int i = 0; i < conc; i++) if (write(fds[i], msg, size) != size) errors++;
    struct epoll_event evs[256];
    int open = conc;
    while (open > 0) {
        int n = epoll_wait(ep, evs, 256, 1000);
        if (n == 0 && now() > end + 5) break;
        for (int k = 0; k < n; k++) {
            int i = evs[k].data.u32;
            ssize_t r = read(fds[i], buf, 65536);
            if (r <= 0) { errors++; epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL); close(fds[i]); open--; continue; }
            have[i] += r;
            if (have[i] < size) continue;
            have[i] = 0;
            requests++;
            if (now() < end) {
                if (write(fds[i], msg, size) != size) errors++;
            } else {
                epoll_ctl(ep, EPOLL_CTL_DEL, fds[i], NULL); close(fds[i]); open--;
            }
        }
    }
    printf("%lld %.6f %lld\n", requests, now() - t0, errors);
    return 0;
}

static int first(int port, double timeout) {
    double t0 = now();
    int s = dial(port, 0);
    if (s < 0) { printf("fail %s\n", strerror(errno)); return 1; }
    struct timeval tv = { .tv_sec = (int)timeout, .tv_usec = (int)((timeout - (int)timeout) * 1e6) };
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char c = 'x';
    if (write(s, &c, 1) != 1) { printf("fail %s\n", strerror(errno)); return 1; }
    ssize_t r = read(s, &c, 1);
    if (r != 1) { printf("fail %s\n", r == 0 ? "closed" : strerror(errno)); return 1; }
    printf("%.6f\n", now() - t0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 4 && !strcmp(argv[1], "bulk")) return bulk(atoi(argv[2]), strtoull(argv[3], NULL, 10));
    if (argc >= 6 && !strcmp(argv[1], "rr")) return rr(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atof(argv[5]));
    if (argc >= 4 && !strcmp(argv[1], "first")) return first(atoi(argv[2]), atof(argv[3]));
    fprintf(stderr, "usage: proxyload bulk PORT BYTES | rr PORT CONC SIZE SECONDS | first PORT TIMEOUT\n");
    return 2;
}
