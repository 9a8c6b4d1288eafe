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
    int unshare(int flags);
    int setns(int fd, int nstype);
    int mount(const char *source, const char *target, const char *filesystemtype,
              unsigned long mountflags, const void *data);
    int umount2(const char *target, int flags);
    int sethostname(const char *name, size_t len);
    int prctl(int option, unsigned long arg2, unsigned long arg3,
              unsigned long arg4, unsigned long arg5);
    int native_pivot_root(const char *new_root, const char *put_old);

    struct native_cap_data { uint32_t effective; uint32_t permitted; uint32_t inheritable; };
    int native_capget(int pid, struct native_cap_data data[2]);
    int native_capset(struct native_cap_data data[2]);
    """
)

ffibuilder.set_source(
    "native._syscalls",
    """
    #define _GNU_SOURCE
    #include <fcntl.h>
    #include <stdio.h>
    #include <sched.h>
    #include <stdint.h>
    #include <unistd.h>
    #include <sys/mount.h>
    #include <sys/prctl.h>
    #include <sys/stat.h>
    #include <sys/syscall.h>
    #include <linux/capability.h>

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
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
