/*
 * fdio.h - file descriptor I/O helpers of execnet._execnet (fdio.c).
 *
 * This header deliberately does not include Python.h: fdio.c includes only
 * it and system headers, so the compiler guarantees that the code which
 * runs without the GIL cannot call the Python API.  _execnet.h includes it
 * for the other files.
 *
 * Contract of every helper: no Python API, no allocation; errors are
 * reported as -1 with errno set.  EINTR is *returned* (with the progress
 * made so far recorded in the in/out arguments) instead of retried, so the
 * caller can take the GIL, run signal handlers (PEP 475) and call again.
 */
#ifndef EXN_FDIO_H
#define EXN_FDIO_H

#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

/* The pipe size asked for with F_SETPIPE_SZ (Linux); 1 MiB is the default
   /proc/sys/fs/pipe-max-size, so unprivileged processes get it too. */
#define EXN_FDIO_PIPE_SIZE (1 << 20)

/* One read(2) of at most `n` bytes.  Returns the count (0 at EOF), or -1
   with errno set (EINTR included). */
ssize_t exn_fdio_read(int fd, void *buf, size_t n);

/* Read until `*done` == `n`, starting at buf + *done.  Returns 0 when all
   `n` bytes are there, 1 at EOF before that, -1 with errno set (EINTR
   included).  *done always tells how many bytes are in buf. */
int exn_fdio_read_full(int fd, char *buf, size_t n, size_t *done);

/* Write all bytes described by (*iov, *iovcnt) with writev(2), handling
   partial writes.  Returns 0 when everything is written, -1 with errno set
   (EINTR included); on return *iov and *iovcnt describe what is still to
   be written (the first entry is advanced in place).  A short write is
   reported as EINTR: on a blocking fd only a signal causes one. */
int exn_fdio_writev_all(int fd, struct iovec **iov, int *iovcnt);

/* Like exn_fdio_writev_all, but with vmsplice(2) (Linux, `fd` the write
   end of a pipe): the pipe references the caller's pages instead of
   copying them, so they must stay unchanged until the reader consumed
   them (see engine.c).  A short vmsplice is normal (it moves what fits)
   and is continued; EINVAL/EBADF (not a pipe) and ENOSYS are returned
   before anything is written, so the caller can fall back to writev. */
int exn_fdio_vmsplice_all(int fd, struct iovec **iov, int *iovcnt);

/* Wait until `fd` is ready for `events` (POLLIN / POLLOUT) or
   `timeout_ms` passes (-1: no limit).  Returns poll(2)'s result: 1 ready,
   0 timed out, -1 with errno set (EINTR included). */
int exn_fdio_poll(int fd, short events, int timeout_ms);

/* If `fd` is a pipe, try to raise its capacity to `size` bytes (Linux
   F_SETPIPE_SZ).  Returns the new capacity, 0 if `fd` is no pipe or the
   platform cannot do it, -1 with errno set if the kernel refused. */
int exn_fdio_set_pipe_size(int fd, int size);

/* The capacity of the pipe `fd` in bytes (Linux F_GETPIPE_SZ); 0 if `fd`
   is no pipe or the platform cannot tell, -1 with errno set on error. */
int exn_fdio_pipe_size(int fd);

/* Bytes still unread in the pipe `fd` (FIONREAD; either end of a pipe);
   -1 if it cannot tell. */
int exn_fdio_unread(int fd);

/* Close `fd`, not retrying on EINTR (Linux closes the fd anyway).
   Returns 0, or -1 with errno set. */
int exn_fdio_close(int fd);

#endif /* EXN_FDIO_H */
