/* kms_connlimit (the accept filter) and the kms_log rate limit. The filter
 * interposes accept4(), so this test's own accept4 calls go through it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "kms_connlimit.h"
#include "kms_log.h"

/* A non-blocking listener on 127.0.0.1:0; *port gets its port. */
static int listener(int *port)
{
    struct sockaddr_in a;
    socklen_t al = sizeof(a);
    int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    assert_true(s >= 0);
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof(a)), 0);
    assert_int_equal(listen(s, 64), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&a, &al), 0);
    *port = ntohs(a.sin_port);
    return s;
}

static int client(int port, const char *src)
{
    struct sockaddr_in a;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s >= 0);
    if (src != NULL) {
        memset(&a, 0, sizeof(a));
        a.sin_family = AF_INET;
        inet_pton(AF_INET, src, &a.sin_addr);
        assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof(a)), 0);
    }
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(s, (struct sockaddr *)&a, sizeof(a)), 0);
    return s;
}

static void test_per_address_cap(void **state)
{
    struct kms_connlimit lim = {.max_total = 10, .max_per_addr = 2};
    struct kms_connlimit_stats st;
    struct kms_err err;
    int port, l = listener(&port), c[4], got[4], n = 0, fd;
    (void)state;

    assert_int_equal(kms_connlimit_register(port, &lim, &err), 0);
    c[0] = client(port, "127.0.0.1");
    c[1] = client(port, "127.0.0.1");
    c[2] = client(port, "127.0.0.1"); /* over the cap: reset at accept */
    c[3] = client(port, "127.0.0.2"); /* another address: admitted */
    usleep(20000);
    while ((fd = accept4(l, NULL, NULL, SOCK_CLOEXEC)) >= 0) {
        got[n++] = fd;
    }
    assert_int_equal(errno, EAGAIN);
    assert_int_equal(n, 3);
    kms_connlimit_stats(port, &st);
    assert_int_equal(st.open, 3);
    assert_int_equal(st.rejected, 1);

    /* closing an admitted connection frees its slot (fd, inode tracking) */
    close(got[0]);
    close(c[2]);
    c[2] = client(port, "127.0.0.1");
    usleep(20000);
    fd = accept4(l, NULL, NULL, SOCK_CLOEXEC);
    assert_true(fd >= 0);
    close(fd);
    for (int i = 1; i < n; i++) {
        close(got[i]);
    }
    for (int i = 0; i < 4; i++) {
        close(c[i]);
    }
    kms_connlimit_unregister(port);
    close(l);
}

static void test_total_cap(void **state)
{
    struct kms_connlimit lim = {.max_total = 2, .max_per_addr = 0};
    struct kms_err err;
    int port, l = listener(&port), c[3], n = 0, fd, got[3];
    (void)state;

    assert_int_equal(kms_connlimit_register(port, &lim, &err), 0);
    c[0] = client(port, "127.0.0.3");
    c[1] = client(port, "127.0.0.4");
    c[2] = client(port, "127.0.0.5");
    usleep(20000);
    while ((fd = accept4(l, NULL, NULL, 0)) >= 0) {
        got[n++] = fd;
    }
    assert_int_equal(n, 2);
    for (int i = 0; i < n; i++) {
        close(got[i]);
    }
    for (int i = 0; i < 3; i++) {
        close(c[i]);
    }
    kms_connlimit_unregister(port);
    close(l);
}

static void test_unregistered_passes(void **state)
{
    int port, l = listener(&port), c[3], n = 0, fd;
    (void)state;
    for (int i = 0; i < 3; i++) {
        c[i] = client(port, NULL);
    }
    usleep(20000);
    while ((fd = accept4(l, NULL, NULL, 0)) >= 0) {
        close(fd);
        n++;
    }
    assert_int_equal(n, 3);
    for (int i = 0; i < 3; i++) {
        close(c[i]);
    }
    close(l);
}

struct acceptor {
    int l;
    atomic_int stop;
};

static void *acceptor_main(void *arg)
{
    struct acceptor *a = arg;
    while (!atomic_load(&a->stop)) {
        int fd = accept4(a->l, NULL, NULL, 0);
        if (fd >= 0) {
            close(fd);
        } else {
            usleep(1000);
        }
    }
    return NULL;
}

static void test_probe(void **state)
{
    struct kms_connlimit lim = {.max_total = 1, .max_per_addr = 1};
    struct kms_err err;
    struct acceptor a;
    pthread_t t;
    char listen_addr[32];
    int port, hog;
    (void)state;

    a.l = listener(&port);
    atomic_init(&a.stop, 0);
    snprintf(listen_addr, sizeof(listen_addr), "127.0.0.1:%d", port);
    assert_int_equal(kms_connlimit_register(port, &lim, &err), 0);
    /* nobody accepts: connected, never accepted */
    assert_int_equal(kms_connlimit_probe(listen_addr, port, 200), KMS_PROBE_NO_ACCEPT);
    /* drain the stale probe connection from the backlog */
    {
        int fd;
        while ((fd = accept4(a.l, NULL, NULL, 0)) >= 0) {
            close(fd);
        }
    }
    assert_int_equal(pthread_create(&t, NULL, acceptor_main, &a), 0);
    /* probes are answered by the filter itself, whatever else connects */
    hog = client(port, "127.0.0.1");
    usleep(20000);
    assert_int_equal(kms_connlimit_probe(listen_addr, port, 1000), KMS_PROBE_OK);
    assert_int_equal(kms_connlimit_probe("0.0.0.0:1", port, 1000), KMS_PROBE_OK);
    atomic_store(&a.stop, 1);
    pthread_join(t, NULL);
    close(hog);
    kms_connlimit_unregister(port);
    close(a.l);
    /* nothing listens any more */
    assert_int_equal(kms_connlimit_probe(listen_addr, port, 200), KMS_PROBE_REFUSED);
}

/* Lines of the file at path containing needle (all lines: NULL). */
static int count_lines(const char *path, const char *needle)
{
    char line[8192];
    int n = 0;
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        if (needle == NULL || strstr(line, needle) != NULL) {
            n++;
        }
    }
    fclose(f);
    return n;
}

static void test_log_rate_limit(void **state)
{
    char path[] = "/tmp/kms-test-log-XXXXXX";
    int fd = mkstemp(path), saved = dup(STDERR_FILENO);
    unsigned long long sup0 = kms_log_suppressed_total();
    (void)state;
    assert_true(fd >= 0 && saved >= 0);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);

    for (int i = 0; i < 200; i++) {
        kms_log(KMS_LOG_WARN, "test", "same failure again", "i", "x", NULL);
    }
    for (int i = 0; i < 30; i++) {
        kms_logf(KMS_LOG_INFO, "test", "formatted %d", i); /* keyed by the format */
    }
    for (int i = 0; i < 50; i++) {
        kms_log(KMS_LOG_INFO, "audit", "unseal", NULL); /* audit at info: never dropped */
    }
    kms_log_flush_suppressed();

    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    close(fd);
    {
        /* a burst of 20; the 2/s refill may add a line on a slow machine */
        int a = count_lines(path, "\"msg\":\"same failure again\"");
        int b = count_lines(path, "\"msg\":\"formatted ");
        char want[64];
        assert_true(a >= 20 && a <= 22);
        assert_true(b >= 20 && b <= 22);
        assert_int_equal(count_lines(path, "\"mod\":\"audit\""), 50);
        assert_int_equal(count_lines(path, "repeated log lines suppressed"), 2);
        snprintf(want, sizeof(want), "\"suppressed\":\"%d\"", 200 - a);
        assert_int_equal(count_lines(path, want), 1);
        snprintf(want, sizeof(want), "\"suppressed\":\"%d\"", 30 - b);
        assert_int_equal(count_lines(path, want), 1);
        assert_true(kms_log_suppressed_total() - sup0 == (unsigned long long)(230 - a - b));
    }
    unlink(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_per_address_cap),
        cmocka_unit_test(test_total_cap),
        cmocka_unit_test(test_unregistered_passes),
        cmocka_unit_test(test_probe),
        cmocka_unit_test(test_log_rate_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
