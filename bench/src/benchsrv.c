#define _GNU_SOURCE
/* A backend for bench/proxy.py: binds its own port (it cannot take fds), one thread, epoll.
 *
 *   benchsrv PORT count   each connection sends "N\n" then N bytes: answer "COUNT <bytes>\n" after N (or at end
 *                         of stream), close; no half-close is needed (systemd-socket-proxyd passes none on)
 *   benchsrv PORT echo    echo whatever arrives, until the client closes
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAXFD 65536
static unsigned long long counts[MAXFD], want[MAXFD];
static char head[MAXFD][24];
static int headlen[MAXFD];

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: benchsrv PORT count|echo\n"); return 2; }
    int echo = strcmp(argv[2], "echo") == 0;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1024)) { perror("bind"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = ls }, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[1 << 20];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (c >= MAXFD) { close(c); continue; }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    counts[c] = 0;
                    want[c] = 0;
                    headlen[c] = 0;
                    struct epoll_event ce = { .events = EPOLLIN, .data.fd = c };
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(fd, buf, sizeof buf);
                if (r > 0) {
                    if (echo) {
                        ssize_t off = 0;
                        while (off < r) {  /* small messages: the send buffer takes them */
                            ssize_t w = write(fd, buf + off, r - off);
                            if (w < 0) { if (errno == EAGAIN) continue; break; }
                            off += w;
                        }
                    } else {
                        ssize_t off = 0;
                        while (!want[fd] && off < r && headlen[fd] < 23) {
                            char ch = buf[off++];
                            if (ch == '\n') { head[fd][headlen[fd]] = 0; want[fd] = strtoull(head[fd], NULL, 10); break; }
                            head[fd][headlen[fd]++] = ch;
                        }
                        counts[fd] += r - off;
                        if (want[fd] && counts[fd] >= want[fd]) { r = 0; goto answer; }
                    }
                    continue;
                }
            answer:
                if (r < 0 && errno == EAGAIN) break;
                if (r == 0 && !echo) {
                    char line[64];
                    int len = snprintf(line, sizeof line, "COUNT %llu\n", counts[fd]);
                    if (write(fd, line, len) < 0) { /* the client went away */ }
                }
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
                break;
            }
        }
    }
}
