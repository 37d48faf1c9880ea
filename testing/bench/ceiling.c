/* What this machine allows, measured next to the benchmark's workloads:
   the same traffic over the same kind of pipes, in plain C, with no
   interpreter, no protocol and no threads.  run.py compiles this file and
   runs it interleaved with stock and ours.

       ceiling pingpong N        N round trips of one byte over two pipes
                                 between two processes
       ceiling bulk SIZE SECS    SIZE-byte payloads one way for ~SECS, in the
                                 pattern the native engine uses for a big
                                 bytes object (see below)

   Prints one JSON object on stdout.

   The bulk pattern is the one a `channel.send(big_bytes)` makes: a 15-byte
   frame header written with write(), the payload vmspliced from a malloc'd
   buffer at the page offset a bytes object's data has (48), and the 1-byte
   STOP opcode written after it; the pipe is grown to 1 MiB.  The reader
   reads the header, then the payload straight into one of two alternating
   malloc'd buffers (a consumer holds one received object while the next
   one is filled), which is the one copy `receive()` returning a distinct
   bytes object cannot avoid. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define HEADER 15
#define DATA_OFFSET 48

static double
now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void
die(const char *what)
{
    perror(what);
    exit(2);
}

static void
read_exact(int fd, char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) {
            die("read");
        }
        got += (size_t)r;
    }
}

static void
write_exact(int fd, const char *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, buf + done, n - done);
        if (w <= 0) {
            die("write");
        }
        done += (size_t)w;
    }
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int
pingpong(long n)
{
    int to[2], from[2];
    pid_t pid;
    char c = 'x';
    double *rt;
    long i, warmup = n / 10;

    if (pipe(to) < 0 || pipe(from) < 0) {
        die("pipe");
    }
    pid = fork();
    if (pid < 0) {
        die("fork");
    }
    if (pid == 0) {
        close(to[1]);
        close(from[0]);
        for (;;) {
            ssize_t r = read(to[0], &c, 1);
            if (r <= 0) {
                _exit(0);
            }
            write_exact(from[1], &c, 1);
        }
    }
    close(to[0]);
    close(from[1]);
    rt = malloc(sizeof(double) * (size_t)n);
    if (rt == NULL) {
        die("malloc");
    }
    for (i = -warmup; i < n; i++) {
        double t0 = now();
        write_exact(to[1], &c, 1);
        read_exact(from[0], &c, 1);
        if (i >= 0) {
            rt[i] = (now() - t0) * 1e6;
        }
    }
    close(to[1]);
    waitpid(pid, NULL, 0);
    qsort(rt, (size_t)n, sizeof(double), cmp_double);
    printf("{\"rt_median_us\": %.3f, \"rt_p99_us\": %.3f, \"n\": %ld}\n",
           rt[n / 2], rt[(n * 99) / 100], n);
    return 0;
}

static void
bulk_send(int fd, size_t size, long count)
{
    char *mem = aligned_alloc(4096, size + 2 * 4096);
    char *payload, header[HEADER];
    long i;

    if (mem == NULL) {
        die("aligned_alloc");
    }
    payload = mem + DATA_OFFSET;
    for (size_t k = 0; k < size; k++) {
        payload[k] = (char)(k * 7 + 1);
    }
    memset(header, 'H', sizeof(header));
    for (i = 0; i < count; i++) {
        size_t off = 0;
        write_exact(fd, header, HEADER);
        while (off < size) {
            struct iovec v = {payload + off, size - off};
            ssize_t w = vmsplice(fd, &v, 1, 0);
            if (w <= 0) {
                die("vmsplice");
            }
            off += (size_t)w;
        }
        write_exact(fd, "Q", 1);
    }
}

/* One timed run of `count` payloads; returns the seconds it took. */
static double
bulk_once(size_t size, long count, char **bufs)
{
    int p[2];
    pid_t pid;
    char header[HEADER + 1];
    double t0, t;
    long i;

    if (pipe(p) < 0) {
        die("pipe");
    }
    (void)fcntl(p[1], F_SETPIPE_SZ, 1 << 20);
    pid = fork();
    if (pid < 0) {
        die("fork");
    }
    if (pid == 0) {
        close(p[0]);
        bulk_send(p[1], size, count);
        _exit(0);
    }
    close(p[1]);
    t0 = now();
    for (i = 0; i < count; i++) {
        read_exact(p[0], header, i == 0 ? HEADER : HEADER + 1);
        read_exact(p[0], bufs[i & 1] + DATA_OFFSET, size);
    }
    read_exact(p[0], header, 1);
    t = now() - t0;
    close(p[0]);
    waitpid(pid, NULL, 0);
    return t;
}

static int
bulk(size_t size, double target)
{
    char *bufs[2];
    long count = 4;
    double t;

    for (int k = 0; k < 2; k++) {
        bufs[k] = malloc(size + DATA_OFFSET);
        if (bufs[k] == NULL) {
            die("malloc");
        }
        memset(bufs[k], 0, size + DATA_OFFSET);
    }
    /* Grow the count until one run takes at least `target` seconds. */
    for (;;) {
        t = bulk_once(size, count, bufs);
        if (t >= target || count >= 1000000) {
            break;
        }
        count = t > 0 ? (long)(count * (target * 1.2 / t)) + 1 : count * 10;
    }
    printf("{\"MB_per_s\": %.1f, \"n\": %ld, \"seconds\": %.4f}\n",
           (double)size * (double)count / t / 1e6, count, t);
    return 0;
}

int
main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "pingpong") == 0) {
        return pingpong(atol(argv[2]));
    }
    if (argc == 4 && strcmp(argv[1], "bulk") == 0) {
        return bulk((size_t)atol(argv[2]), atof(argv[3]));
    }
    fprintf(stderr, "usage: ceiling pingpong N | ceiling bulk SIZE SECS\n");
    return 2;
}
