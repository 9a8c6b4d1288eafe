"""cffi builder for the system calls Python 3.11's standard library lacks.

Built by the normal install (setup.py lists it in cffi_modules); the compiled
module is ``native._syscalls``. Python wrappers live in ``native/syscalls.py``.
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    struct timespec { long tv_sec; long tv_nsec; };

    int renameat2(int olddirfd, const char *oldpath, int newdirfd,
                  const char *newpath, unsigned int flags);
    int fchownat(int dirfd, const char *pathname, unsigned int owner,
                 unsigned int group, int flags);
    int utimensat(int dirfd, const char *pathname,
                  const struct timespec times[2], int flags);
    int fallocate(int fd, int mode, long offset, long len);
    int syncfs(int fd);
    ssize_t getdents64(int fd, void *dirp, size_t count);
    int sync_file_range(int fd, int64_t offset, int64_t nbytes, unsigned int flags);
    int native_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                       uint64_t resolve);
    int unshare(int flags);
    int setns(int fd, int nstype);
    int mount(const char *source, const char *target, const char *filesystemtype,
              unsigned long mountflags, const void *data);
    int umount2(const char *target, int flags);
    int sethostname(const char *name, size_t len);
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5);
    int native_pivot_root(const char *new_root, const char *put_old);
    long native_join_session_keyring(const char *name);
    long native_bpf(int cmd, void *attr, unsigned int size);
    int native_pidfd_getfd(int pidfd, int targetfd);

    int native_name_to_handle(int fd, unsigned char *buf, int buflen, int *handle_type,
                              int *mount_id);
    int native_open_by_handle(int mount_fd, const unsigned char *buf, int len, int handle_type,
                              int flags);
    int native_detached_noatime_mount(int dirfd);

    struct native_cap_data { uint32_t effective; uint32_t permitted; uint32_t inheritable; };
    int native_capget(int pid, struct native_cap_data data[2]);
    int native_capset(struct native_cap_data data[2]);

    long native_xattr_at(int dirfd, const char *name, const char *xattr, char *buf,
                         size_t size);
    long native_xattr_via_proc(int dirfd, const char *name, const char *xattr, char *buf,
                               size_t size);

    struct native_probe {
        uint64_t st_dev; uint64_t st_ino; int64_t st_size; int64_t st_mtime_ns;
        int64_t st_ctime_ns; uint32_t st_mode; uint32_t st_uid; uint32_t st_gid;
        int64_t content_len; int64_t names_len;
    };
    int native_probe_file(int dirfd, const char *path, int flags, unsigned char *buf,
                          size_t buf_len, char *names, size_t names_len,
                          struct native_probe *out);
    """
)

ffibuilder.set_source(
    "native._syscalls",
    """
    #define _GNU_SOURCE
    #include <dirent.h>
    #include <fcntl.h>
    #include <stdio.h>
    #include <sched.h>
    #include <stdint.h>
    #include <unistd.h>
    #include <sys/mount.h>
    #include <sys/prctl.h>
    #include <sys/stat.h>
    #include <sys/xattr.h>
    #include <string.h>
    #include <errno.h>
    #include <sys/syscall.h>
    #include <linux/capability.h>

    /* File handles of the inode behind fd (AT_EMPTY_PATH): kept so that an
       fd can be closed and the same inode reopened later, whatever its name. */
    static int native_name_to_handle(int fd, unsigned char *buf, int buflen, int *handle_type,
                                     int *mount_id)
    {
        union { struct file_handle fh; char space[sizeof(struct file_handle) + MAX_HANDLE_SZ]; } u;
        u.fh.handle_bytes = MAX_HANDLE_SZ;
        if (name_to_handle_at(fd, "", &u.fh, mount_id, AT_EMPTY_PATH) < 0)
            return -1;
        if ((int)u.fh.handle_bytes > buflen) { errno = EOVERFLOW; return -1; }
        memcpy(buf, u.fh.f_handle, u.fh.handle_bytes);
        *handle_type = u.fh.handle_type;
        return u.fh.handle_bytes;
    }

    static int native_open_by_handle(int mount_fd, const unsigned char *buf, int len,
                                     int handle_type, int flags)
    {
        union { struct file_handle fh; char space[sizeof(struct file_handle) + MAX_HANDLE_SZ]; } u;
        if (len > MAX_HANDLE_SZ) { errno = EINVAL; return -1; }
        u.fh.handle_bytes = len;
        u.fh.handle_type = handle_type;
        memcpy(u.fh.f_handle, buf, len);
        return open_by_handle_at(mount_fd, &u.fh, flags);
    }

    /* A mount of dirfd's tree attached nowhere (open_tree OPEN_TREE_CLONE), with
     * MOUNT_ATTR_NOATIME: files opened through it are never marked accessed. */
    static int native_detached_noatime_mount(int dirfd)
    {
    #if defined(SYS_open_tree) && defined(SYS_mount_setattr)
        struct { uint64_t attr_set, attr_clr, propagation, userns_fd; } attr = {
            0x00000010 /* MOUNT_ATTR_NOATIME */, 0x00000070 /* MOUNT_ATTR__ATIME */, 0, 0 };
        int fd = syscall(SYS_open_tree, dirfd, "",
                         1 /* OPEN_TREE_CLONE */ | O_CLOEXEC | AT_EMPTY_PATH);
        if (fd < 0)
            return -1;
        if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &attr, sizeof attr) < 0) {
            int saved = errno;
            close(fd);
            errno = saved;
            return -1;
        }
        return fd;
    #else
        (void) dirfd;
        errno = ENOSYS;
        return -1;
    #endif
    }

    struct native_open_how { uint64_t flags; uint64_t mode; uint64_t resolve; };

    static int native_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                              uint64_t resolve)
    {
        struct native_open_how how = { flags, mode, resolve };
        return syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
    }

    /* keyctl(KEYCTL_JOIN_SESSION_KEYRING): NULL makes a new anonymous keyring, so that
       nothing of the caller's session keyring passes on to what it runs. */
    static long native_join_session_keyring(const char *name)
    {
        return syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, name);
    }

    static long native_bpf(int cmd, void *attr, unsigned int size)
    {
        return syscall(SYS_bpf, cmd, attr, size);
    }

    static int native_pidfd_getfd(int pidfd, int targetfd)
    {
        return syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
    }

    static int native_pivot_root(const char *new_root, const char *put_old)
    {
        return syscall(SYS_pivot_root, new_root, put_old);
    }

    struct native_cap_data { uint32_t effective; uint32_t permitted; uint32_t inheritable; };

    static int native_capget(int pid, struct native_cap_data data[2])
    {
        struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, pid };
        return syscall(SYS_capget, &hdr, (struct __user_cap_data_struct *)data);
    }

    static int native_capset(struct native_cap_data data[2])
    {
        struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
        return syscall(SYS_capset, &hdr, (struct __user_cap_data_struct *)data);
    }

    /* The value of extended attribute xattr of dirfd/name (a symlink itself, not
       followed) into buf: its length, or -1 with errno (ENODATA if it has none).
       getxattrat(2) (Linux 6.13) where the kernel has it: no path through
       /proc/self/fd, which costs twice as much; else that path. */
    #ifndef SYS_getxattrat
    #define SYS_getxattrat 464  /* one number on every architecture but alpha */
    #endif
    struct native_xattr_args { uint64_t value; uint32_t size; uint32_t flags; };

    /* The same through the /proc/self/fd path of dirfd: for kernels before 6.13. */
    static long native_xattr_via_proc(int dirfd, const char *name, const char *xattr, char *buf,
                                      size_t size)
    {
        char path[64 + 4096];
        if (snprintf(path, sizeof(path), "/proc/self/fd/%d/%s", dirfd, name)
            >= (int)sizeof(path)) {
            errno = ENAMETOOLONG;
            return -1;
        }
        return lgetxattr(path, xattr, buf, size);
    }

    static long native_xattr_at(int dirfd, const char *name, const char *xattr, char *buf,
                                size_t size)
    {
        static int have_getxattrat = 1;
        if (have_getxattrat) {
            struct native_xattr_args args = { (uint64_t)(uintptr_t)buf, (uint32_t)size, 0 };
            long got = syscall(SYS_getxattrat, dirfd, name, AT_SYMLINK_NOFOLLOW, xattr, &args,
                               sizeof(args));
            if (got >= 0 || errno != ENOSYS)
                return got;
            have_getxattrat = 0;
        }
        return native_xattr_via_proc(dirfd, name, xattr, buf, size);
    }

    struct native_probe {
        uint64_t st_dev; uint64_t st_ino; int64_t st_size; int64_t st_mtime_ns;
        int64_t st_ctime_ns; uint32_t st_mode; uint32_t st_uid; uint32_t st_gid;
        int64_t content_len; int64_t names_len;
    };

    /* What hashify needs of a small file, in one call instead of six from Python:
       open path beneath dirfd (openat2: no "..", no symlinks), fstat it, list its
       extended attribute names into names (names_len -1 if they do not fit), read
       all of it into buf (content_len -1 if it holds more than buf_len - 1 bytes),
       close it. -1 with errno if it could not be opened, stat'ed or read. Only a
       regular file is listed or read: for anything else (what a name the caller
       saw as a file reaches now) only the stat is filled in, with both lengths -1. */
    static int native_probe_file(int dirfd, const char *path, int flags, unsigned char *buf,
                                 size_t buf_len, char *names, size_t names_len,
                                 struct native_probe *out)
    {
        /* RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, as open_beneath */
        int fd = native_openat2(dirfd, path, (uint64_t)(flags | O_CLOEXEC), 0, 0x08 | 0x04 | 0x02);
        if (fd < 0)
            return -1;
        struct stat st;
        if (fstat(fd, &st) < 0)
            goto fail;
        out->st_dev = st.st_dev;
        out->st_ino = st.st_ino;
        out->st_size = st.st_size;
        out->st_mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
        out->st_ctime_ns = (int64_t)st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
        out->st_mode = st.st_mode;
        out->st_uid = st.st_uid;
        out->st_gid = st.st_gid;
        out->content_len = -1;
        out->names_len = -1;
        if (!S_ISREG(st.st_mode)) {
            close(fd);
            return 0;
        }
        ssize_t listed = flistxattr(fd, names, names_len);
        if (listed < 0) {
            if (errno != ERANGE)
                goto fail;
            listed = -1;
        }
        out->names_len = listed;
        if ((uint64_t)st.st_size < buf_len) {
            /* One read asking for more than the file holds: a short read is its
               end (the caller checks the length against st_size); a full buffer
               means the file grew, too big after all. */
            ssize_t got;
            do
                got = pread(fd, buf, buf_len, 0);
            while (got < 0 && errno == EINTR);
            if (got < 0)
                goto fail;
            if ((size_t)got < buf_len)
                out->content_len = got;
        }
        close(fd);
        return 0;
    fail:
        {
            int saved = errno;
            close(fd);
            errno = saved;
        }
        return -1;
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
