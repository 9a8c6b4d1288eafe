/* Try one privileged operation, as root in a guest would; print "ok" or the
 * errno's name (EPERM, ENOSYS, ...). Usage: try OPERATION [ARG]. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/reboot.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/time.h>
#include <sys/un.h>
#include <stddef.h>
#include <netinet/in.h>
#include <time.h>
#include <unistd.h>

/* An fd a host process passes over the abstract unix socket name (a leak, say). */
static int receive_fd(const char *name)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char byte, control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1,
                         .msg_control = control, .msg_controllen = sizeof control};
    int sock = socket(AF_UNIX, SOCK_STREAM, 0);
    strncpy(addr.sun_path + 1, name, sizeof addr.sun_path - 2);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr,
                            offsetof(struct sockaddr_un, sun_path) + 1 + strlen(name)) < 0
        || recvmsg(sock, &msg, 0) <= 0 || !CMSG_FIRSTHDR(&msg)) {
        perror("try: no fd received");
        exit(3);
    }
    return *(int *)CMSG_DATA(CMSG_FIRSTHDR(&msg));
}

static long attempt(const char *op, const char *arg)
{
    if (!strcmp(op, "leaked-read") || !strcmp(op, "leaked-write")) {
        /* arg: the socket's name; the fd is a host directory holding "secret" */
        int write_it = !strcmp(op, "leaked-write");
        char buf[64];
        int fd = openat(receive_fd(arg), "secret", write_it ? O_WRONLY | O_APPEND : O_RDONLY);
        if (fd < 0)
            return -1;
        return write_it ? write(fd, "guest was here\n", 15) : read(fd, buf, sizeof buf);
    }
    if (!strcmp(op, "mount"))
        return mount("none", arg ? arg : "/mnt", "tmpfs", 0, NULL);
    if (!strcmp(op, "mknod")) { /* arg: MAJOR:MINOR of a block device */
        unsigned major = 8, minor = 0;
        if (arg)
            sscanf(arg, "%u:%u", &major, &minor);
        return mknod("/tmp/blockdev", S_IFBLK | 0600, makedev(major, minor));
    }
    if (!strcmp(op, "open-blockdev")) {
        int fd = open("/tmp/blockdev", O_RDONLY);
        char sector[512];
        if (fd < 0)
            return -1;
        return read(fd, sector, sizeof sector) < 0 ? -1 : 0;
    }
    if (!strcmp(op, "init_module")) {
        static char image[64] = "\177ELF";
        return syscall(SYS_init_module, image, sizeof image, "");
    }
    if (!strcmp(op, "settimeofday")) {
        struct timeval tv = {978307200, 0}; /* 2001-01-01 */
        return settimeofday(&tv, NULL);
    }
    if (!strcmp(op, "clock_settime")) {
        struct timespec ts = {978307200, 0};
        return clock_settime(CLOCK_REALTIME, &ts);
    }
    if (!strcmp(op, "reboot")) /* asks for nothing even if allowed: Ctrl-Alt-Del off */
        return syscall(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2,
                       LINUX_REBOOT_CMD_CAD_OFF, NULL);
    if (!strcmp(op, "sethostname"))
        return sethostname("other", 5);
    if (!strcmp(op, "raw-socket"))
        return socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    if (!strcmp(op, "unshare-user"))
        return unshare(CLONE_NEWUSER);
    if (!strcmp(op, "write")) { /* arg: a path to open for writing */
        int fd = open(arg, O_WRONLY);
        if (fd < 0)
            return -1;
        return write(fd, "1\n", 2) < 0 ? -1 : 0;
    }
    if (!strcmp(op, "chroot-escape")) { /* run inside a chroot: climb out, list "/" */
        mkdir("esc", 0700);
        if (chroot("esc") < 0) /* the cwd is now outside the root */
            return -1;
        for (int i = 0; i < 64; i++)
            if (chdir("..") < 0)
                return -1;
        if (chroot(".") < 0)
            return -1;
        DIR *root = opendir("/");
        if (!root)
            return -1;
        for (struct dirent *e; (e = readdir(root));)
            printf("%s\n", e->d_name);
        closedir(root);
        return 0;
    }
    if (!strcmp(op, "syscall")) /* arg: a raw call number, made with no arguments */
        return syscall(atol(arg), 0, 0, 0, 0, 0, 0);
    fprintf(stderr, "try: unknown operation %s\n", op);
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: try OPERATION [ARG]\n");
        return 2;
    }
    errno = 0;
    long result = attempt(argv[1], argc > 2 ? argv[2] : NULL);
    if (result < 0)
        printf("%s\n", strerrorname_np(errno));
    else
        printf("ok\n");
    return 0;
}
