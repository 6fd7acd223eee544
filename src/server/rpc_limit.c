/*
 * Accept filter for gRPC listeners: connection caps, EMFILE survival and
 * listener probes. Why an interposed accept4() and not kmsd accepting
 * itself: see kms_connlimit.h and docs/security.md ("Limits").
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <linux/tcp.h> /* tcp_info with tcpi_bytes_received (glibc's lacks it) */
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "kms_connlimit.h"
#include "kms_log.h"

#define MAX_PORTS 8
#define MAX_PROBES 8
#define FULL_SWEEP_MIN_MS 100 /* at most one full sweep per listener per 100 ms */
#define POLICE_MS 10          /* byte police period */
#define POLICED_RCVBUF 16384  /* SO_RCVBUF of policed connections (kernel doubles it) */
#define BAN_WINDOW_MS 10000   /* kills counted over this window for a ban */
#define MAX_BANS 256          /* addresses remembered (kills or ban), oldest replaced */

struct conn {
    int fd;
    ino_t ino;
    dev_t dev;
    uint8_t ip[16]; /* IPv4 as v4-mapped */
    unsigned long long bytes_seen; /* last TCP_INFO tcpi_bytes_received */
};

struct ban {
    uint8_t ip[16];
    int port;
    uint64_t window_start_ms;
    unsigned kills;
    uint64_t until_ms; /* banned until (0 = not banned) */
};

struct listener {
    int port; /* 0 = free slot */
    struct kms_connlimit lim;
    struct conn *conns;
    size_t n, cap;
    uint64_t last_full_sweep_ms;
    unsigned long long accepted, rejected, emfile, killed, banned;
};

struct probe {
    bool used;
    uint16_t src_port;
    bool seen;
};

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
static struct listener g_lis[MAX_PORTS];
static struct probe g_probes[MAX_PROBES];
static atomic_int g_n_ports;
static atomic_int g_fault_port = -1; /* -1: hook not read yet; 0: off */
static struct ban g_bans[MAX_BANS];
static bool g_police_started;
static int g_reserve_fd = -1; /* under g_reserve_mu */
static pthread_mutex_t g_reserve_mu = PTHREAD_MUTEX_INITIALIZER;

static int raw_accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags)
{
    return (int)syscall(SYS_accept4, fd, addr, alen, flags);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void close_rst(int fd)
{
    struct linger lg = {1, 0};
    (void)setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    close(fd);
}

static void reserve_take(void)
{
    if (g_reserve_fd < 0) {
        g_reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
}

static int sock_port(const struct sockaddr_storage *ss)
{
    if (ss->ss_family == AF_INET) {
        return ntohs(((const struct sockaddr_in *)ss)->sin_port);
    }
    if (ss->ss_family == AF_INET6) {
        return ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    }
    return -1;
}

static void sock_ip16(const struct sockaddr_storage *ss, uint8_t ip[16])
{
    memset(ip, 0, 16);
    if (ss->ss_family == AF_INET) {
        ip[10] = ip[11] = 0xff;
        memcpy(ip + 12, &((const struct sockaddr_in *)ss)->sin_addr, 4);
    } else if (ss->ss_family == AF_INET6) {
        memcpy(ip, &((const struct sockaddr_in6 *)ss)->sin6_addr, 16);
    }
}

static void ip16_str(const uint8_t ip[16], char *buf, size_t len)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (memcmp(ip, mapped, 12) == 0) {
        inet_ntop(AF_INET, ip + 12, buf, (socklen_t)len);
    } else {
        inet_ntop(AF_INET6, ip, buf, (socklen_t)len);
    }
}

/* Caller holds g_mu. */
static struct listener *listener_find(int port)
{
    for (int i = 0; i < MAX_PORTS; i++) {
        if (g_lis[i].port == port && port > 0) {
            return &g_lis[i];
        }
    }
    return NULL;
}

/* fstat/getsockopt/shutdown on connections gRPC owns: gRPC closes them on
 * its own threads without telling us, so an fd number may have been closed
 * and reused meanwhile (the inode and device comparison decides). These
 * calls go to the kernel directly: ThreadSanitizer models every fd as
 * memory and would report this by-design look at another thread's fd as a
 * data race. */
static int raw_fstat(int fd, struct stat *st)
{
#ifdef SYS_fstat
    return (int)syscall(SYS_fstat, fd, st);
#else
    return fstat(fd, st);
#endif
}

static int raw_getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
#ifdef SYS_getsockopt
    return (int)syscall(SYS_getsockopt, fd, level, name, val, len);
#else
    return getsockopt(fd, level, name, val, len);
#endif
}

static int raw_shutdown(int fd, int how)
{
#ifdef SYS_shutdown
    return (int)syscall(SYS_shutdown, fd, how);
#else
    return shutdown(fd, how);
#endif
}

/* Is entry i still the socket we accepted? */
static bool conn_alive(const struct conn *c)
{
    struct stat st;
    return raw_fstat(c->fd, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_ino == c->ino &&
           st.st_dev == c->dev;
}

/* Caller holds g_mu. Drops dead entries; ip NULL = all, else only that
 * address's entries are checked. */
static void listener_sweep(struct listener *l, const uint8_t *ip)
{
    size_t w = 0;
    for (size_t r = 0; r < l->n; r++) {
        bool keep = true;
        if (ip == NULL || memcmp(l->conns[r].ip, ip, 16) == 0) {
            keep = conn_alive(&l->conns[r]);
        }
        if (keep) {
            l->conns[w++] = l->conns[r];
        }
    }
    l->n = w;
}

static unsigned listener_count(const struct listener *l, const uint8_t ip[16])
{
    unsigned n = 0;
    for (size_t i = 0; i < l->n; i++) {
        if (memcmp(l->conns[i].ip, ip, 16) == 0) {
            n++;
        }
    }
    return n;
}

/* Caller holds g_mu. Returns NULL to admit, or the cap that refuses. */
static const char *listener_admit(struct listener *l, int fd, const uint8_t ip[16])
{
    struct stat st;
    struct conn *c;

    if (l->lim.ban_ms > 0) {
        uint64_t now = now_ms();
        for (int i = 0; i < MAX_BANS; i++) {
            if (g_bans[i].port == l->port && g_bans[i].until_ms > now &&
                memcmp(g_bans[i].ip, ip, 16) == 0) {
                l->banned++;
                return "address banned after repeated abuse";
            }
        }
    }
    /* the fd number was closed by gRPC and reused: that entry is dead */
    for (size_t i = 0; i < l->n; i++) {
        if (l->conns[i].fd == fd) {
            l->conns[i] = l->conns[--l->n];
            break;
        }
    }
    /* Counts include entries that may have closed since: sweep only when a
     * cap would refuse (stale entries make us stricter, never laxer). */
    if (l->lim.max_per_addr > 0 && listener_count(l, ip) >= l->lim.max_per_addr) {
        listener_sweep(l, ip);
        if (listener_count(l, ip) >= l->lim.max_per_addr) {
            return "per-address connection cap";
        }
    }
    if (l->lim.max_total > 0 && l->n >= l->lim.max_total) {
        uint64_t now = now_ms();
        if (now - l->last_full_sweep_ms >= FULL_SWEEP_MIN_MS) {
            l->last_full_sweep_ms = now;
            listener_sweep(l, NULL);
        }
        if (l->n >= l->lim.max_total) {
            return "total connection cap";
        }
    }
    if (raw_fstat(fd, &st) != 0) {
        return NULL; /* cannot track it; let gRPC have it */
    }
    if (l->n == l->cap) {
        size_t ncap = l->cap == 0 ? 64 : l->cap * 2;
        struct conn *nc = realloc(l->conns, ncap * sizeof(*nc));
        if (nc == NULL) {
            return NULL; /* untracked, still served */
        }
        l->conns = nc;
        l->cap = ncap;
    }
    c = &l->conns[l->n++];
    c->fd = fd;
    c->bytes_seen = 0;
    c->ino = st.st_ino;
    c->dev = st.st_dev;
    memcpy(c->ip, ip, 16);
    return NULL;
}

/* Caller holds g_mu. A probe's own connection? Probes come from this host
 * (loopback or one of its addresses), so the source port identifies them;
 * a remote peer that happens to use the same source port at that instant
 * only gets its connection reset. */
static bool probe_match(const struct sockaddr_storage *peer)
{
    int p = sock_port(peer);
    for (int i = 0; i < MAX_PROBES; i++) {
        if (g_probes[i].used && g_probes[i].src_port == p) {
            g_probes[i].seen = true;
            pthread_cond_broadcast(&g_cv);
            return true;
        }
    }
    return false;
}

/* Out of descriptors: free the reserve, take the oldest pending connection
 * off the backlog and reset it. True when one was dropped. */
static bool drop_pending(int lfd)
{
    int nfd = -1;
    pthread_mutex_lock(&g_reserve_mu);
    reserve_take(); /* lost to another thread last time? try again */
    if (g_reserve_fd >= 0) {
        close(g_reserve_fd);
        g_reserve_fd = -1;
        nfd = raw_accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (nfd >= 0) {
            close_rst(nfd);
        }
        reserve_take();
    }
    pthread_mutex_unlock(&g_reserve_mu);
    return nfd >= 0;
}

/* Interposes libc's accept4 for the whole process (see kms_connlimit.h). */
__attribute__((visibility("default"))) int accept4(int fd, struct sockaddr *addr,
                                                 socklen_t *alen, int flags)
{
    struct sockaddr_storage local;
    socklen_t ll = sizeof(local);
    int lport;

    if (atomic_load(&g_n_ports) == 0 ||
        getsockname(fd, (struct sockaddr *)&local, &ll) != 0 ||
        (lport = sock_port(&local)) <= 0) {
        return raw_accept4(fd, addr, alen, flags);
    }
    pthread_mutex_lock(&g_mu);
    if (listener_find(lport) == NULL) {
        pthread_mutex_unlock(&g_mu);
        return raw_accept4(fd, addr, alen, flags);
    }
    pthread_mutex_unlock(&g_mu);

    for (;;) {
        struct sockaddr_storage peer;
        socklen_t pl = sizeof(peer);
        struct listener *l;
        const char *why = NULL;
        uint8_t ip[16];
        int nfd;

        if (atomic_load(&g_fault_port) == lport &&
            atomic_exchange(&g_fault_port, 0) == lport) {
            /* test fault hook: one fatal accept error, as gRPC 1.51 meets
             * on paths the filter does not cover; its accept loop stops */
            errno = EBADFD;
            return -1;
        }
        nfd = raw_accept4(fd, (struct sockaddr *)&peer, &pl, flags);

        if (nfd < 0) {
            int e = errno;
            if (e == EMFILE || e == ENFILE) {
                bool dropped = drop_pending(fd);
                pthread_mutex_lock(&g_mu);
                if ((l = listener_find(lport)) != NULL && dropped) {
                    l->emfile++;
                }
                pthread_mutex_unlock(&g_mu);
                {
                    char p[16];
                    snprintf(p, sizeof(p), "%d", lport);
                    kms_log(KMS_LOG_ERROR, "net",
                            "out of file descriptors: resetting a new connection "
                            "(the listener keeps accepting)",
                            "port", p, NULL);
                }
                if (dropped) {
                    continue;
                }
                errno = EAGAIN; /* keep gRPC's accept loop alive */
                return -1;
            }
            switch (e) {
            case ENETDOWN: case EPROTO: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
            case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH: case EPERM:
            case ETIMEDOUT: case ECONNRESET:
                /* that pending connection failed (accept(2) reports its
                 * network error): gRPC 1.51 would stop accepting; take
                 * the next one */
                continue;
            case ENOBUFS: case ENOMEM:
                errno = EAGAIN; /* transient: gRPC re-arms, the probe re-triggers */
                return -1;
            default:
                /* EINVAL after kms_rpc_server_stop shut the socket down,
                 * EBADF, EINTR, EAGAIN: gRPC's own handling is right */
                errno = e;
                return -1;
            }
        }
        sock_ip16(&peer, ip);
        pthread_mutex_lock(&g_mu);
        if (probe_match(&peer)) {
            pthread_mutex_unlock(&g_mu);
            close_rst(nfd);
            continue;
        }
        l = listener_find(lport);
        if (l != NULL) {
            why = listener_admit(l, nfd, ip);
            if (why != NULL) {
                l->rejected++;
            } else {
                l->accepted++;
                if (l->lim.max_conn_bytes > 0) {
                    /* a small receive buffer keeps what the kernel takes in
                     * for gRPC (beyond what the police has seen) small */
                    int rcv = POLICED_RCVBUF;
                    (void)setsockopt(nfd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
                }
            }
        }
        pthread_mutex_unlock(&g_mu);
        if (why != NULL) {
            char a[INET6_ADDRSTRLEN], p[16];
            ip16_str(ip, a, sizeof(a));
            snprintf(p, sizeof(p), "%d", lport);
            kms_log(KMS_LOG_WARN, "net", "connection refused: limit reached", "limit", why,
                    "peer", a, "port", p, NULL);
            close_rst(nfd);
            continue;
        }
        if (addr != NULL && alen != NULL) {
            socklen_t n = *alen < pl ? *alen : pl;
            memcpy(addr, &peer, n);
            *alen = pl;
        }
        return nfd;
    }
}

/* Caller holds g_mu. Counts a kill of ip on port; bans it after enough. */
static bool ban_note(int port, const uint8_t ip[16], const struct kms_connlimit *lim,
                     uint64_t now)
{
    struct ban *b = NULL, *spare = NULL;
    for (int i = 0; i < MAX_BANS; i++) {
        struct ban *x = &g_bans[i];
        if (x->port == port && memcmp(x->ip, ip, 16) == 0) {
            b = x;
            break;
        }
        /* reuse a free slot, else the oldest one not banned right now */
        if (x->until_ms <= now &&
            (spare == NULL || x->port == 0 ||
             (spare->port != 0 && x->window_start_ms < spare->window_start_ms))) {
            spare = x;
        }
    }
    if (b == NULL && spare == NULL) {
        return false; /* every slot holds a live ban: count nothing new */
    }
    if (b == NULL) {
        b = spare;
        memset(b, 0, sizeof(*b));
        memcpy(b->ip, ip, 16);
        b->port = port;
    }
    if (now - b->window_start_ms > BAN_WINDOW_MS) {
        b->window_start_ms = now;
        b->kills = 0;
    }
    b->kills++;
    if (lim->ban_after > 0 && lim->ban_ms > 0 && b->kills >= lim->ban_after) {
        b->until_ms = now + lim->ban_ms;
        b->kills = 0;
        return true;
    }
    return false;
}

/* One police pass over every listener with a byte budget. */
static void police_pass(void)
{
    uint64_t now = now_ms();
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < MAX_PORTS; i++) {
        struct listener *l = &g_lis[i];
        if (l->port == 0 || l->lim.max_conn_bytes == 0) {
            continue;
        }
        for (size_t k = 0; k < l->n; k++) {
            struct conn *c = &l->conns[k];
            struct tcp_info ti;
            socklen_t tl = sizeof(ti);
            memset(&ti, 0, sizeof(ti));
            if (raw_getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) != 0) {
                continue;
            }
            c->bytes_seen = ti.tcpi_bytes_received;
            if (c->bytes_seen <= l->lim.max_conn_bytes || !conn_alive(c)) {
                continue;
            }
            /* gRPC owns the fd: shut the socket down (it sees EOF and
             * tears the transport down with all its streams), never close */
            (void)raw_shutdown(c->fd, SHUT_RDWR);
            l->killed++;
            {
                char a[INET6_ADDRSTRLEN], p[16], b[32];
                bool banned = ban_note(l->port, c->ip, &l->lim, now);
                ip16_str(c->ip, a, sizeof(a));
                snprintf(p, sizeof(p), "%d", l->port);
                snprintf(b, sizeof(b), "%llu", c->bytes_seen);
                kms_log(KMS_LOG_WARN, "net",
                        banned ? "connection over its byte budget shut down; address banned"
                               : "connection over its byte budget shut down",
                        "peer", a, "port", p, "bytes", b, NULL);
            }
            c->bytes_seen = 0;
            l->conns[k] = l->conns[--l->n];
            k--;
        }
    }
    pthread_mutex_unlock(&g_mu);
}

static void *police_main(void *arg)
{
    struct timespec ts = {0, POLICE_MS * 1000000L};
    (void)arg;
    for (;;) {
        nanosleep(&ts, NULL);
        police_pass();
    }
    return NULL;
}

int kms_connlimit_register(int port, const struct kms_connlimit *lim, struct kms_err *err)
{
    struct listener *l;
    int rc = 0;

    if (port <= 0 || port > 65535 || lim == NULL) {
        return kms_err_set(err, KMS_EINVAL, "connection limits: bad port %d", port);
    }
    pthread_mutex_lock(&g_reserve_mu);
    reserve_take();
    pthread_mutex_unlock(&g_reserve_mu);
    if (atomic_load(&g_fault_port) == -1) {
        const char *f = getenv("KMSD_TEST_ACCEPT_FAULT_PORT");
        int fp = f != NULL ? atoi(f) : 0;
        atomic_store(&g_fault_port, fp > 0 && fp < 65536 ? fp : 0);
        if (fp > 0) {
            kms_log(KMS_LOG_WARN, "net",
                    "TEST FAULT HOOK: the first accept on this port fails fatally "
                    "(KMSD_TEST_ACCEPT_FAULT_PORT); never set this in production",
                    "port", f, NULL);
        }
    }
    pthread_mutex_lock(&g_mu);
    if ((l = listener_find(port)) == NULL) {
        for (int i = 0; i < MAX_PORTS && l == NULL; i++) {
            if (g_lis[i].port == 0) {
                l = &g_lis[i];
                memset(l, 0, sizeof(*l));
                l->port = port;
                atomic_fetch_add(&g_n_ports, 1);
            }
        }
    }
    if (l == NULL) {
        rc = kms_err_set(err, KMS_ERANGE, "connection limits: more than %d listeners",
                         MAX_PORTS);
    } else {
        l->lim = *lim;
        if (lim->max_conn_bytes > 0 && !g_police_started) {
            /* process-lifetime helper: it only sleeps and scans the table */
            pthread_t t;
            pthread_attr_t a;
            pthread_attr_init(&a);
            pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
            if (pthread_create(&t, &a, police_main, NULL) == 0) {
                g_police_started = true;
            } else {
                rc = kms_err_set(err, KMS_ENOMEM, "connection limits: cannot start a thread");
            }
            pthread_attr_destroy(&a);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

void kms_connlimit_unregister(int port)
{
    struct listener *l;
    pthread_mutex_lock(&g_mu);
    if ((l = listener_find(port)) != NULL) {
        free(l->conns);
        memset(l, 0, sizeof(*l));
        atomic_fetch_sub(&g_n_ports, 1);
    }
    pthread_mutex_unlock(&g_mu);
}

void kms_connlimit_stats(int port, struct kms_connlimit_stats *out)
{
    struct listener *l;
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&g_mu);
    if ((l = listener_find(port)) != NULL) {
        listener_sweep(l, NULL);
        out->open = (unsigned)l->n;
        out->accepted = l->accepted;
        out->rejected = l->rejected;
        out->emfile = l->emfile;
        out->killed = l->killed;
        out->banned = l->banned;
    }
    pthread_mutex_unlock(&g_mu);
}

const char *kms_probe_result_name(enum kms_probe_result r)
{
    switch (r) {
    case KMS_PROBE_OK:
        return "ok";
    case KMS_PROBE_NO_ACCEPT:
        return "connected but not accepted";
    case KMS_PROBE_REFUSED:
        return "connection refused";
    case KMS_PROBE_NO_FD:
        return "no file descriptor left";
    }
    return "unknown";
}

/* Target of a probe: the listen host, wildcards mapped to loopback. */
static int probe_target(const char *listen, int port, struct sockaddr_storage *ss,
                        socklen_t *sl)
{
    char host[128];
    const char *colon = listen != NULL ? strrchr(listen, ':') : NULL;
    size_t n = colon != NULL ? (size_t)(colon - listen) : 0;

    if (n >= sizeof(host)) {
        return -1;
    }
    memcpy(host, listen, n);
    host[n] = '\0';
    if (host[0] == '[') {
        memmove(host, host + 1, strlen(host));
        host[strcspn(host, "]")] = '\0';
    }
    memset(ss, 0, sizeof(*ss));
    if (host[0] == '\0' || strcmp(host, "0.0.0.0") == 0 || strcmp(host, "localhost") == 0) {
        snprintf(host, sizeof(host), "127.0.0.1");
    } else if (strcmp(host, "::") == 0) {
        snprintf(host, sizeof(host), "::1");
    }
    if (strchr(host, ':') != NULL) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        if (inet_pton(AF_INET6, host, &s6->sin6_addr) != 1) {
            return -1;
        }
        *sl = sizeof(*s6);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &s4->sin_addr) != 1) {
            return -1;
        }
        *sl = sizeof(*s4);
    }
    return 0;
}

enum kms_probe_result kms_connlimit_probe(const char *listen, int port, unsigned timeout_ms)
{
    struct sockaddr_storage dst, src;
    socklen_t dl = 0, sl = sizeof(src);
    struct pollfd pfd;
    struct timespec end;
    enum kms_probe_result res = KMS_PROBE_REFUSED;
    int s, slot = -1, soerr = 0;
    socklen_t el = sizeof(soerr);
    uint64_t t0 = now_ms();

    if (probe_target(listen, port, &dst, &dl) != 0) {
        return KMS_PROBE_REFUSED;
    }
    s = socket(dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0) {
        return errno == EMFILE || errno == ENFILE ? KMS_PROBE_NO_FD : KMS_PROBE_REFUSED;
    }
    memset(&src, 0, sizeof(src));
    src.ss_family = dst.ss_family;
    if (bind(s, (struct sockaddr *)&src,
             dst.ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                      : sizeof(struct sockaddr_in6)) != 0 ||
        getsockname(s, (struct sockaddr *)&src, &sl) != 0) {
        close(s);
        return KMS_PROBE_REFUSED;
    }
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < MAX_PROBES; i++) {
        if (!g_probes[i].used) {
            g_probes[i].used = true;
            g_probes[i].seen = false;
            g_probes[i].src_port = (uint16_t)sock_port(&src);
            slot = i;
            break;
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (slot < 0) {
        close(s);
        return KMS_PROBE_REFUSED;
    }
    if (connect(s, (struct sockaddr *)&dst, dl) != 0 && errno != EINPROGRESS) {
        goto out;
    }
    pfd.fd = s;
    pfd.events = POLLOUT;
    (void)poll(&pfd, 1, (int)timeout_ms);
    /* The filter may already have accepted and reset the connection (on
     * loopback before poll returns), so SO_ERROR alone decides nothing:
     * the accept being seen does. */
    (void)getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &el);
    clock_gettime(CLOCK_REALTIME, &end);
    {
        uint64_t spent = now_ms() - t0;
        uint64_t left = timeout_ms > spent ? timeout_ms - spent : 0;
        end.tv_sec += (time_t)(left / 1000);
        end.tv_nsec += (long)(left % 1000) * 1000000L;
        if (end.tv_nsec >= 1000000000L) {
            end.tv_sec++;
            end.tv_nsec -= 1000000000L;
        }
    }
    pthread_mutex_lock(&g_mu);
    while (!g_probes[slot].seen && (soerr == 0 || soerr == ECONNRESET)) {
        if (pthread_cond_timedwait(&g_cv, &g_mu, &end) == ETIMEDOUT) {
            break;
        }
    }
    if (g_probes[slot].seen) {
        res = KMS_PROBE_OK;
    } else {
        res = soerr != 0 && soerr != ECONNRESET ? KMS_PROBE_REFUSED : KMS_PROBE_NO_ACCEPT;
    }
    pthread_mutex_unlock(&g_mu);
out:
    pthread_mutex_lock(&g_mu);
    g_probes[slot].used = false;
    pthread_mutex_unlock(&g_mu);
    close_rst(s);
    return res;
}
