/*
 * conn.c — a server's TCP connections, seen from the file descriptor table.
 *
 * gRPC core 1.51 gives a server no handle on its connections: a peer that never reads
 * keeps its connection, and every reply written to it, for as long as it likes. The
 * server knows a call's peer ("ipv4:127.0.0.1:54321", grpc_call_get_peer) and its own
 * listening ports; the connection is the TCP socket with that local port and that
 * remote address. shutdown(2) on it (never close: the descriptor stays gRPC's) makes
 * gRPC core see the connection end and fail everything on it at once.
 *
 * A leaf: no Ruby, no gRPC, no lock; any thread.
 */
#include "flowctl.h"
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>

/*
 * The descriptor table is read through /proc/self/fd, which takes a descriptor: when
 * the process has none left (the case these checks are for), the spare one kept here is
 * given up for the look and taken again after.
 */
static _Atomic int spare_fd = -1;

static DIR *
fd_dir(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d || errno != EMFILE) return d;
    int spare = atomic_exchange(&spare_fd, -1);
    if (spare < 0) return NULL;
    close(spare);
    return opendir("/proc/self/fd");
}

static void
fd_dir_close(DIR *d)
{
    if (d) closedir(d);
    if (atomic_load(&spare_fd) < 0) {
        int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
        int none = -1;
        if (fd >= 0 && !atomic_compare_exchange_strong(&spare_fd, &none, fd)) close(fd);
    }
}

int
flowctl_conn_local_port(int fd)
{
    struct sockaddr_storage a;
    socklen_t len = sizeof(a);
    if (getsockname(fd, (struct sockaddr *)&a, &len) != 0) return 0;
    if (a.ss_family == AF_INET) return ntohs(((struct sockaddr_in *)&a)->sin_port);
    if (a.ss_family == AF_INET6) return ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
    return 0;
}

bool
flowctl_conn_listening(int fd)
{
    int on = 0;
    socklen_t len = sizeof(on);
    return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) == 0 && on;
}

/* The remote address of fd written as gRPC core writes a peer (IPv4-mapped as ipv4). */
static bool
peer_uri(int fd, char *out, size_t size)
{
    struct sockaddr_storage a;
    socklen_t len = sizeof(a);
    char host[INET6_ADDRSTRLEN];
    if (getpeername(fd, (struct sockaddr *)&a, &len) != 0) return false;
    if (a.ss_family == AF_INET) {
        struct sockaddr_in *v4 = (struct sockaddr_in *)&a;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof(host));
        snprintf(out, size, "ipv4:%s:%d", host, ntohs(v4->sin_port));
        return true;
    }
    if (a.ss_family != AF_INET6) return false;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&a;
    if (IN6_IS_ADDR_V4MAPPED(&v6->sin6_addr)) {
        inet_ntop(AF_INET, &v6->sin6_addr.s6_addr[12], host, sizeof(host));
        snprintf(out, size, "ipv4:%s:%d", host, ntohs(v6->sin6_port));
    } else {
        inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof(host));
        snprintf(out, size, "ipv6:[%s]:%d", host, ntohs(v6->sin6_port));
    }
    return true;
}

static bool
ours(int fd, const int *ports, int n_ports)
{
    int port = flowctl_conn_local_port(fd);
    for (int i = 0; port && i < n_ports; i++)
        if (ports[i] == port) return !flowctl_conn_listening(fd);
    return false;
}

/* shutdown(2) of fd, counted in *tally first: whoever sees the connection end (the peer)
 * and then reads the server's counters finds it counted. */
static bool
shut_counted(int fd, _Atomic long *tally)
{
    if (tally) atomic_fetch_add(tally, 1);
    if (shutdown(fd, SHUT_RDWR) == 0) return true;
    if (tally) atomic_fetch_sub(tally, 1);
    return false;
}

int
flowctl_conn_shutdown(const char *peer, const int *ports, int n_ports, _Atomic long *tally)
{
    if (!peer || n_ports == 0) return 0;
    DIR *d = fd_dir();
    if (!d) return 0;
    int done = 0;
    char uri[96];
    for (struct dirent *e; (e = readdir(d));) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd == dirfd(d) || !ours(fd, ports, n_ports)) continue;
        if (peer_uri(fd, uri, sizeof(uri)) && strcmp(uri, peer) == 0 && shut_counted(fd, tally)) done++;
    }
    fd_dir_close(d);
    return done;
}

int
flowctl_conn_count(const int *ports, int n_ports)
{
    DIR *d = fd_dir();
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] != '.' && fd != dirfd(d) && ours(fd, ports, n_ports)) n++;
    }
    fd_dir_close(d);
    return n;
}

/* ---- offenses: how often each peer misbehaved in the last second ------------------
 * A small table (OFFENDERS entries, the stalest replaced): a peer with more than `limit`
 * offenses in one second is abusive. Used by one thread at a time (the acceptor). */
static uint64_t
peer_hash(const char *peer)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)peer; *p; p++) h = (h ^ *p) * 1099511628211ULL;
    return h;
}

bool
flowctl_conn_offend(flowctl_offenders *t, const char *peer, int64_t now_ms, int limit)
{
    if (!peer) return false;
    uint64_t h = peer_hash(peer);
    flowctl_offender *e = NULL, *stalest = &t->e[0];
    for (int i = 0; i < FLOWCTL_OFFENDERS && !e; i++) {
        if (t->e[i].hash == h) e = &t->e[i];
        else if (t->e[i].since_ms < stalest->since_ms) stalest = &t->e[i];
    }
    if (!e) {
        e = stalest;
        e->hash = h;
        e->count = 0;
        e->since_ms = now_ms;
    }
    if (now_ms - e->since_ms > 1000) {
        e->since_ms = now_ms;
        e->count = 0;
    }
    if (++e->count <= limit) return false;
    e->count = 0;
    return true;
}

/* ---- the connection that sends the most ------------------------------------------ */
#include <linux/tcp.h> /* tcp_info with tcpi_bytes_received (glibc's lacks it) */
#include <sys/stat.h>
#include <time.h>

#define BUSIEST_MAX 4096

typedef struct {
    int fd;
    ino_t ino;
    uint64_t bytes;
} conn_sample;

static bool
received(int fd, uint64_t *bytes, ino_t *ino)
{
    struct tcp_info ti;
    socklen_t len = sizeof(ti);
    struct stat st;
    if (fstat(fd, &st) != 0 || getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return false;
    *bytes = ti.tcpi_bytes_received;
    *ino = st.st_ino;
    return true;
}

int
flowctl_conn_shutdown_busiest(const int *ports, int n_ports, int ms, _Atomic long *tally)
{
    conn_sample *s = malloc(sizeof(conn_sample) * BUSIEST_MAX);
    DIR *d = s ? fd_dir() : NULL;
    if (!d) {
        free(s);
        return 0;
    }
    int n = 0;
    for (struct dirent *e; n < BUSIEST_MAX && (e = readdir(d));) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd == dirfd(d) || !ours(fd, ports, n_ports)) continue;
        if (received(fd, &s[n].bytes, &s[n].ino)) s[n++].fd = fd;
    }
    fd_dir_close(d);
    struct timespec pause = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
    int best = -1;
    uint64_t most = 0;
    for (int i = 0; i < n; i++) {
        uint64_t now;
        ino_t ino;
        if (!received(s[i].fd, &now, &ino) || ino != s[i].ino || now - s[i].bytes <= most) continue;
        most = now - s[i].bytes;
        best = s[i].fd;
    }
    free(s);
    return best >= 0 && shut_counted(best, tally) ? 1 : 0;
}

size_t
flowctl_rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f) return 0;
    unsigned long size = 0, resident = 0;
    int got = fscanf(f, "%lu %lu", &size, &resident);
    fclose(f);
    return got == 2 ? (size_t)resident * (size_t)sysconf(_SC_PAGESIZE) : 0;
}

/* ---- listeners and the descriptor limit -------------------------------------------- */
#include <poll.h>
#include <sys/resource.h>

int
flowctl_conn_listener_pending(const int *ports, int n_ports)
{
    DIR *d = fd_dir();
    if (!d) return -1;
    int found = -1;
    for (struct dirent *e; (e = readdir(d));) {
        int fd = atoi(e->d_name), port = flowctl_conn_local_port(fd);
        if (e->d_name[0] == '.' || fd == dirfd(d) || !port || !flowctl_conn_listening(fd)) continue;
        for (int i = 0; i < n_ports; i++) {
            if (ports[i] != port) continue;
            struct pollfd p = {.fd = fd, .events = POLLIN};
            int pending = poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
            if (pending || found < 0) found = pending;
        }
    }
    fd_dir_close(d);
    return found;
}

int
flowctl_conn_close_listeners(const int *ports, int n_ports)
{
    DIR *d = fd_dir();
    if (!d) return 0;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        int fd = atoi(e->d_name), port = flowctl_conn_local_port(fd);
        if (e->d_name[0] == '.' || fd == dirfd(d) || !port || !flowctl_conn_listening(fd)) continue;
        for (int i = 0; i < n_ports; i++)
            if (ports[i] == port && shutdown(fd, SHUT_RDWR) == 0) n++;
    }
    fd_dir_close(d);
    return n;
}

/* Descriptors open in this process, and its soft limit. */
static int
fds_open(void)
{
    DIR *d = fd_dir();
    if (!d) return -1;
    int n = -1; /* the directory's own */
    while (readdir(d)) n++;
    fd_dir_close(d);
    return n - 2; /* . and .. */
}

int
flowctl_conn_fds_left(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return INT_MAX;
    int open_now = fds_open();
    return open_now < 0 ? 0 : (int)((long)rl.rlim_cur - open_now); /* none left to look */
}

typedef struct {
    int fd;
    uint32_t idle_ms;
} idle_conn;

static int
by_idle_desc(const void *a, const void *b)
{
    uint32_t x = ((const idle_conn *)a)->idle_ms, y = ((const idle_conn *)b)->idle_ms;
    return x < y ? 1 : x > y ? -1 : 0;
}

int
flowctl_conn_shed_idle(const int *ports, int n_ports, int reserve_div, _Atomic long *tally)
{
    struct rlimit rl;
    int open_now = fds_open();
    if (open_now < 0 || getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return 0;
    long limit = (long)rl.rlim_cur, reserve = limit / reserve_div < 16 ? 16 : limit / reserve_div;
    long excess = open_now - (limit - reserve);
    if (excess <= 0) return 0;
    idle_conn *c = malloc(sizeof(idle_conn) * BUSIEST_MAX);
    DIR *d = c ? fd_dir() : NULL;
    if (!d) {
        free(c);
        return 0;
    }
    int n = 0;
    for (struct dirent *e; n < BUSIEST_MAX && (e = readdir(d));) {
        int fd = atoi(e->d_name);
        struct tcp_info ti;
        socklen_t len = sizeof(ti);
        if (e->d_name[0] == '.' || fd == dirfd(d) || !ours(fd, ports, n_ports) ||
            getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0)
            continue;
        c[n].fd = fd;
        c[n++].idle_ms = ti.tcpi_last_data_recv;
    }
    fd_dir_close(d);
    qsort(c, (size_t)n, sizeof(idle_conn), by_idle_desc);
    int shed = 0;
    for (int i = 0; i < n && shed < excess + reserve / 2; i++)
        if (shut_counted(c[i].fd, tally)) shed++;
    free(c);
    return shed;
}
