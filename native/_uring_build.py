"""cffi builder for ``native._uring``: the few io_uring calls cowfs's reads and writes need.

cowfs hands a read that would wait for the disk, and a write the filesystem
cannot promise to do without waiting, to the kernel through io_uring instead
of to a worker thread: the kernel completes it asynchronously and posts
the result to an eventfd that the trio loop watches, so no Python thread has to
wake up and take the GIL (a thread hand-off cost ~100 µs a read on the
development VM). liburing (Debian's liburing-dev) sets the ring up; the Python
side is ``cowfs/serve/uring.py``.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    struct cowfs_ring;
    struct cowfs_ring *cowfs_ring_open(unsigned entries, int eventfd, int *err);
    int cowfs_ring_read(struct cowfs_ring *r, int fd, void *buf, unsigned len,
                        uint64_t offset, uint64_t tag);
    int cowfs_ring_write(struct cowfs_ring *r, int fd, const void *buf, unsigned len,
                         uint64_t offset, uint64_t tag);
    int cowfs_ring_wait(struct cowfs_ring *r, long timeout_ns);
    int cowfs_ring_notify(struct cowfs_ring *r, int enabled);
    int cowfs_ring_reap(struct cowfs_ring *r, uint64_t *tags, int *results, int max);
    void cowfs_ring_close(struct cowfs_ring *r);
    """
)

ffibuilder.set_source(
    "native._uring",
    """
    #include <errno.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <liburing.h>

    struct cowfs_ring { struct io_uring ring; };

    /* A ring whose every completion signals eventfd; NULL and *err on failure
       (ENOSYS on old kernels, EPERM where io_uring is disabled). */
    static struct cowfs_ring *cowfs_ring_open(unsigned entries, int eventfd, int *err)
    {
        struct cowfs_ring *r = calloc(1, sizeof *r);
        int rc;
        if (!r) { *err = ENOMEM; return NULL; }
        rc = io_uring_queue_init(entries, &r->ring, 0);
        if (rc < 0) { free(r); *err = -rc; return NULL; }
        rc = io_uring_register_eventfd(&r->ring, eventfd);
        if (rc < 0) { io_uring_queue_exit(&r->ring); free(r); *err = -rc; return NULL; }
        return r;
    }

    /* Queue and submit one read (write=0) or write; its completion carries tag.
       0 or -errno. */
    static int cowfs_ring_submit(struct cowfs_ring *r, int write, int fd, void *buf,
                                 unsigned len, uint64_t offset, uint64_t tag)
    {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
        int rc;
        if (!sqe) return -EBUSY;
        if (write)
            io_uring_prep_write(sqe, fd, buf, len, offset);
        else
            io_uring_prep_read(sqe, fd, buf, len, offset);
        io_uring_sqe_set_data64(sqe, tag);
        rc = io_uring_submit(&r->ring);
        return rc < 0 ? rc : 0;
    }

    static int cowfs_ring_read(struct cowfs_ring *r, int fd, void *buf, unsigned len,
                               uint64_t offset, uint64_t tag)
    {
        return cowfs_ring_submit(r, 0, fd, buf, len, offset, tag);
    }

    static int cowfs_ring_write(struct cowfs_ring *r, int fd, const void *buf, unsigned len,
                                uint64_t offset, uint64_t tag)
    {
        return cowfs_ring_submit(r, 1, fd, (void *)buf, len, offset, tag);
    }

    /* Block up to timeout_ns for a completion: 0 once one is there, -ETIME if none
       came, -EOPNOTSUPP on kernels before 5.11 (no timed wait without a timeout SQE). */
    static int cowfs_ring_wait(struct cowfs_ring *r, long timeout_ns)
    {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts = { 0, timeout_ns };
        if (!(r->ring.features & IORING_FEAT_EXT_ARG)) return -EOPNOTSUPP;
        return io_uring_wait_cqe_timeout(&r->ring, &cqe, &ts);
    }

    /* Whether completions signal the eventfd (off while the loop waits itself). */
    static int cowfs_ring_notify(struct cowfs_ring *r, int enabled)
    {
        return io_uring_cq_eventfd_toggle(&r->ring, enabled);
    }

    /* Up to max completions: their tags and results (bytes read or written, or -errno). */
    static int cowfs_ring_reap(struct cowfs_ring *r, uint64_t *tags, int *results, int max)
    {
        struct io_uring_cqe *cqe;
        unsigned head;
        int n = 0;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            if (n == max) break;
            tags[n] = io_uring_cqe_get_data64(cqe);
            results[n] = cqe->res;
            n++;
        }
        io_uring_cq_advance(&r->ring, n);
        return n;
    }

    static void cowfs_ring_close(struct cowfs_ring *r)
    {
        io_uring_queue_exit(&r->ring);
        free(r);
    }
    """,
    libraries=["uring"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
