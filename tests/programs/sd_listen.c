/* Test service linked against libsystemd: reports what sd_listen_fds_with_names
 * sees, then answers one connection on the first stream socket with it. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <systemd/sd-daemon.h>

int main(void) {
    char **names = NULL;
    int n = sd_listen_fds_with_names(0, &names);
    char out[8192];
    size_t len = 0;
    len += snprintf(out + len, sizeof out - len, "count=%d\n", n);
    int stream = -1;
    for (int i = 0; i < n; i++) {
        int fd = SD_LISTEN_FDS_START + i;
        const char *kind = "other";
        if (sd_is_socket_inet(fd, AF_UNSPEC, SOCK_STREAM, 1, 0) > 0) { kind = "inet-stream"; if (stream < 0) stream = fd; }
        else if (sd_is_socket_inet(fd, AF_UNSPEC, SOCK_DGRAM, -1, 0) > 0) kind = "inet-dgram";
        else if (sd_is_socket_unix(fd, SOCK_STREAM, 1, NULL, 0) > 0) kind = "unix-stream";
        struct sockaddr_storage ss; socklen_t sl = sizeof ss;
        char addr[256] = "";
        if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0) {
            if (ss.ss_family == AF_INET) {
                struct sockaddr_in *a = (struct sockaddr_in *)&ss;
                char h[64]; inet_ntop(AF_INET, &a->sin_addr, h, sizeof h);
                snprintf(addr, sizeof addr, "%s:%d", h, ntohs(a->sin_port));
            } else if (ss.ss_family == AF_INET6) {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
                char h[64]; inet_ntop(AF_INET6, &a->sin6_addr, h, sizeof h);
                snprintf(addr, sizeof addr, "[%s]:%d", h, ntohs(a->sin6_port));
            } else if (ss.ss_family == AF_UNIX) {
                struct sockaddr_un *a = (struct sockaddr_un *)&ss;
                snprintf(addr, sizeof addr, "%s", a->sun_path);
            }
        }
        len += snprintf(out + len, sizeof out - len, "fd=%d name=%s kind=%s addr=%s\n", fd,
                        names && names[i] ? names[i] : "?", kind, addr);
    }
    const char *pid = getenv("LISTEN_PID");
    len += snprintf(out + len, sizeof out - len, "env_unset=%d\n", pid == NULL);
    if (stream < 0) return 3;
    int c = accept(stream, NULL, NULL);
    if (c < 0) return 4;
    if (write(c, out, len) < 0) return 5;
    close(c);
    return 0;
}
