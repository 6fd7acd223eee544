/* synclog.so: LD_PRELOAD shim for power-loss emulation (docs/reliability.md).
 * After every successful fsync/fdatasync it appends "<path> <size>\n" to
 * $JP_SYNC_LOG (O_APPEND, one write per line). powerloss.py later truncates
 * files back to their last synced size. Only libc calls are seen (RocksDB's);
 * libraft's AIO writes with RWF_DSYNC are durable when they complete and are
 * not tracked.
 * Build: gcc -O2 -shared -fPIC -o synclog.so synclog.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int logfd = -2;

static void note(int fd)
{
    char p[64], path[4096], line[4200];
    struct stat st;
    ssize_t n;
    if (logfd == -2) {
        const char *l = getenv("JP_SYNC_LOG");
        logfd = l ? open(l, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644) : -1;
    }
    if (logfd < 0 || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    snprintf(p, sizeof(p), "/proc/self/fd/%d", fd);
    n = readlink(p, path, sizeof(path) - 1);
    if (n <= 0) return;
    path[n] = 0;
    n = snprintf(line, sizeof(line), "%s %lld\n", path, (long long)st.st_size);
    if (write(logfd, line, (size_t)n) < 0) return;
}

int fsync(int fd)
{
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    if (rc == 0) note(fd);
    return rc;
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    if (rc == 0) note(fd);
    return rc;
}
