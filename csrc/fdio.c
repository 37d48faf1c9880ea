/*
 * fdio.c - read/write/writev/poll helpers for blocking file descriptors.
 *
 * This is the only code of the core that runs without the GIL (besides
 * PyThread lock waits), so it includes no Python header at all: see
 * fdio.h for the contract (-1 + errno, EINTR returned to the caller).
 */
#define _GNU_SOURCE 1

#include "fdio.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

/* Largest single read/write request: keep counts within ssize_t. */
#define MAX_IO_CHUNK ((size_t)1 << 30)

ssize_t
exn_fdio_read(int fd, void *buf, size_t n)
{
    if (n > MAX_IO_CHUNK) {
        n = MAX_IO_CHUNK;
    }
    return read(fd, buf, n);
}

int
exn_fdio_read_full(int fd, char *buf, size_t n, size_t *done)
{
    while (*done < n) {
        ssize_t r = exn_fdio_read(fd, buf + *done, n - *done);
        if (r < 0) {
            return -1;
        }
        if (r == 0) {
            return 1;
        }
        *done += (size_t)r;
    }
    return 0;
}

/* Drop the first `n` bytes from the iovec array (*v, *cnt): skip the
   entries they cover, cut into the next, skip empty entries after it. */
static void
iov_advance(struct iovec **v, int *cnt, size_t n)
{
    while (*cnt > 0 && n >= (*v)->iov_len) {
        n -= (*v)->iov_len;
        (*v)++;
        (*cnt)--;
    }
    if (*cnt > 0) {
        (*v)->iov_base = (char *)(*v)->iov_base + n;
        (*v)->iov_len -= n;
        while (*cnt > 0 && (*v)->iov_len == 0) {
            (*v)++;
            (*cnt)--;
        }
    }
}

int
exn_fdio_writev_all(int fd, struct iovec **iov, int *iovcnt)
{
    struct iovec *v = *iov;
    int cnt = *iovcnt;

    /* Skip empty entries so a zero-length request never reaches writev. */
    while (cnt > 0 && v->iov_len == 0) {
        v++;
        cnt--;
    }
    while (cnt > 0) {
        int batch = cnt < IOV_MAX ? cnt : IOV_MAX;
        /* One buffer (the common case): write() spares the kernel the
           iovec copy. */
        ssize_t r = batch == 1 ? write(fd, v->iov_base, v->iov_len)
                               : writev(fd, v, batch);
        if (r < 0) {
            *iov = v;
            *iovcnt = cnt;
            return -1;
        }
        /* Drop what went out, advance into the entry that was cut. */
        size_t left = (size_t)r;
        int short_write = 0;
        for (int i = 0; i < batch; i++) {
            if (left < v[i].iov_len) {
                short_write = 1;
                break;
            }
            left -= v[i].iov_len;
        }
        iov_advance(&v, &cnt, (size_t)r);
        if (short_write && cnt > 0) {
            /* A blocking pipe or socket writes everything unless a signal
               cuts the call short after some progress: report that as
               EINTR too, so the caller runs the signal handlers instead
               of blocking again with a Ctrl-C pending. */
            *iov = v;
            *iovcnt = cnt;
            errno = EINTR;
            return -1;
        }
    }
    *iov = v;
    *iovcnt = 0;
    return 0;
}

int
exn_fdio_vmsplice_all(int fd, struct iovec **iov, int *iovcnt)
{
#if defined(__linux__) && defined(SPLICE_F_GIFT)
    struct iovec *v = *iov;
    int cnt = *iovcnt;

    while (cnt > 0 && v->iov_len == 0) {
        v++;
        cnt--;
    }
    while (cnt > 0) {
        int batch = cnt < IOV_MAX ? cnt : IOV_MAX;
        /* No SPLICE_F_GIFT: the pages stay the caller's. */
        ssize_t r = vmsplice(fd, v, (unsigned long)batch, 0);
        if (r <= 0) {
            if (r == 0) {
                /* Not expected with data to move: let the caller fall
                   back to writev, which reports the real state. */
                errno = EINVAL;
            }
            *iov = v;
            *iovcnt = cnt;
            return -1;
        }
        /* A blocking pipe takes what fits, then the next call waits for
           room (or returns EINTR for a signal): just go on. */
        iov_advance(&v, &cnt, (size_t)r);
        *iov = v;
        *iovcnt = cnt;
    }
    return 0;
#else
    (void)fd;
    (void)iov;
    (void)iovcnt;
    errno = ENOSYS;
    return -1;
#endif
}

int
exn_fdio_poll(int fd, short events, int timeout_ms)
{
    struct pollfd p;
    p.fd = fd;
    p.events = events;
    p.revents = 0;
    return poll(&p, 1, timeout_ms);
}

int
exn_fdio_set_pipe_size(int fd, int size)
{
#ifdef F_SETPIPE_SZ
    struct stat sb;
    int cur;

    if (fstat(fd, &sb) < 0) {
        return -1;
    }
    if (!S_ISFIFO(sb.st_mode)) {
        return 0;
    }
    cur = fcntl(fd, F_GETPIPE_SZ);
    if (cur >= size) {
        return cur;
    }
    return fcntl(fd, F_SETPIPE_SZ, size);
#else
    (void)fd;
    (void)size;
    return 0;
#endif
}

int
exn_fdio_unread(int fd)
{
#ifdef FIONREAD
    int n = 0;

    if (ioctl(fd, FIONREAD, &n) < 0) {
        return -1;
    }
    return n;
#else
    (void)fd;
    return -1;
#endif
}

int
exn_fdio_pipe_size(int fd)
{
#ifdef F_GETPIPE_SZ
    struct stat sb;

    if (fstat(fd, &sb) < 0) {
        return -1;
    }
    if (!S_ISFIFO(sb.st_mode)) {
        return 0;
    }
    return fcntl(fd, F_GETPIPE_SZ);
#else
    (void)fd;
    return 0;
#endif
}

int
exn_fdio_close(int fd)
{
    int r = close(fd);
    if (r < 0 && errno == EINTR) {
        /* The fd is released even when close() is interrupted (Linux,
           and POSIX 2024); retrying could close somebody else's fd. */
        return 0;
    }
    return r;
}
