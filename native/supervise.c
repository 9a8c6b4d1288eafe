/*
 * contextd-supervise: a guest's supervisor once the guest runs (contextd/supervisor.py).
 *
 * The supervisor makes the guest's context in Python, then execs this program: the
 * same process, still init's parent and a child subreaper, without the ~4 MiB of
 * private memory a Python process keeps while it waits. It does what the Python
 * loop did: copies the console to the log (keeping it under MAX_LOG and its last
 * lines), waits for init, replaces the FUSE server of the guest's root when it dies
 * (a successor `python -m contextd.rootserver successor ...` on the same session;
 * contextd/rootserver.py), ends the guest when that cannot be, and writes the exit
 * record contextd reads (contextd/runstate.py) when init has ended.
 *
 * Arguments (fds are inherited): init=PID,PIDFD console=FD peer=FD log=FD
 * exit-record=PATH, and for the root's server: server=PID,PIDFD session=FD
 * mount=JSON server-record=PATH python=EXE.
 *
 * With keep=MOUNTPOINT instead of the console, log and exit record, it is an OCI
 * container's root keeper (contextd/oci/keeper.py): init is the engine's child, not
 * ours, and is only watched; the keeper replaces the root's server while init runs
 * and the root is mounted, ends (0) once either is gone, and kills init (1) when the
 * server cannot be replaced.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef P_PIDFD
#define P_PIDFD 3
#endif

#define MAX_LOG (8 << 20)
#define TAIL_KEEP 16384
#define TAIL_LINES 20
#define MAX_DEATHS 5
#define DEATH_WINDOW 60.0
#define SUCCESSOR_TIMEOUT_MS 30000

static pid_t init_pid = -1, server_pid = -1;
static int init_pidfd = -1, console = -1, peer = -1, log_fd = -1;
static int server_pidfd = -1, session = -1;
static const char *exit_record, *mount_json, *server_record, *python, *keep_mountpoint;
static char tail[TAIL_KEEP];
static size_t tail_len;
static double deaths[MAX_DEATHS + 1];
static int death_count, restarts;
static char failure[512];

static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double now_real(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int pidfd_open_(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

static void write_all(int fd, const char *data, size_t size) {
    while (size > 0) {
        ssize_t n = write(fd, data, size);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        data += n;
        size -= (size_t)n;
    }
}

/* path holds data, replaced in one step (cowfs/atomicfile.py's way). */
static void write_atomically(const char *path, const char *data, size_t size) {
    char tmp[4096];
    const char *slash = strrchr(path, '/');
    int dir_len = slash ? (int)(slash - path + 1) : 0;
    snprintf(tmp, sizeof tmp, "%.*s.%s.tmp%d", dir_len, path, slash ? slash + 1 : path,
             (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    write_all(fd, data, size);
    close(fd);
    if (rename(tmp, path) != 0)
        unlink(tmp);
}

/* A growable string for the JSON records. */
struct text {
    char *data;
    size_t len, cap;
};

static void add(struct text *t, const char *s, size_t n) {
    if (t->len + n + 1 > t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 1024;
        while (cap < t->len + n + 1)
            cap *= 2;
        char *grown = realloc(t->data, cap);
        if (!grown)
            return;
        t->data = grown;
        t->cap = cap;
    }
    memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = 0;
}

static void addf(struct text *t, const char *format, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, format);
    int n = vsnprintf(buf, sizeof buf, format, ap);
    va_end(ap);
    if (n > 0)
        add(t, buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

/* The UTF-8 sequence at s (n bytes left): its length if valid, else 0 with *bad the
 * length of its maximal invalid part, which Python's decoder replaces with one U+FFFD. */
static size_t utf8_sequence(const unsigned char *s, size_t n, size_t *bad, unsigned int *cp) {
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    *bad = 1;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF)
        need = 1;
    else if (c >= 0xE0 && c <= 0xEF)
        need = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4)
        need = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else
        return 0;
    unsigned int value = c & (0x3F >> need);
    for (size_t k = 1; k <= need; k++) {
        unsigned char min = k == 1 ? lo : 0x80, max = k == 1 ? hi : 0xBF;
        if (k >= n || s[k] < min || s[k] > max) {
            *bad = k;
            return 0;
        }
        value = (value << 6) | (s[k] & 0x3F);
    }
    *cp = value;
    return need + 1;
}

/* A JSON string of bytes, as Python's json.dumps(b.decode(errors="replace")) writes it. */
static void add_json_string(struct text *t, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    add(t, "\"", 1);
    for (size_t i = 0; i < n;) {
        size_t bad;
        unsigned int cp;
        size_t len = utf8_sequence(u + i, n - i, &bad, &cp);
        if (len == 0) {
            add(t, "\\ufffd", 6);
            i += bad;
            continue;
        }
        i += len;
        if (cp == '"' || cp == '\\') {
            char escaped[2] = {'\\', (char)cp};
            add(t, escaped, 2);
        } else if (cp >= 0x20 && cp < 0x7F) {
            char plain = (char)cp;
            add(t, &plain, 1);
        } else if (cp < 0x10000) {
            addf(t, "\\u%04x", cp);
        } else {
            cp -= 0x10000;
            addf(t, "\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
        }
    }
    add(t, "\"", 1);
}

/* The length of the line break at s (n bytes left), 0 if none: the breaks of Python's
 * str.splitlines() (\r\n counts as one), as bytes of UTF-8. */
static size_t line_break(const unsigned char *s, size_t n) {
    switch (s[0]) {
    case '\r':
        return n > 1 && s[1] == '\n' ? 2 : 1;
    case '\n': case 0x0B: case 0x0C: case 0x1C: case 0x1D: case 0x1E:
        return 1;
    case 0xC2:
        return n > 1 && s[1] == 0x85 ? 2 : 0;
    case 0xE2:
        return n > 2 && s[1] == 0x80 && (s[2] == 0xA8 || s[2] == 0xA9) ? 3 : 0;
    default:
        return 0;
    }
}

static void halve_log(void) {
    struct stat st;
    if (fstat(log_fd, &st) != 0 || st.st_size <= MAX_LOG)
        return;
    size_t keep = MAX_LOG / 2;
    char *buf = malloc(keep);
    if (!buf)
        return;
    ssize_t got = pread(log_fd, buf, keep, st.st_size - (off_t)keep);
    if (got > 0 && ftruncate(log_fd, 0) == 0)
        write_all(log_fd, buf, (size_t)got);
    free(buf);
}

/* Keep the last TAIL_KEEP bytes of the console (as the Python supervisor's tail). */
static void keep_tail(const char *buf, size_t n) {
    size_t take = n > TAIL_KEEP ? TAIL_KEEP : n;
    if (tail_len + take > TAIL_KEEP) {
        size_t drop = tail_len + take - TAIL_KEEP;
        memmove(tail, tail + drop, tail_len - drop);
        tail_len -= drop;
    }
    memcpy(tail + tail_len, buf + n - take, take);
    tail_len += take;
}

/* Copy what the console has to the log; 0 once nothing of the guest holds it. */
static int copy_console(void) {
    char buf[65536];
    ssize_t n = read(console, buf, sizeof buf);
    if (n < 0 && (errno == EINTR))
        return 1;
    if (n <= 0) /* EAGAIN when drained, EIO when the last holder closed it, or the end */
        return 0;
    write_all(log_fd, buf, (size_t)n);
    keep_tail(buf, (size_t)n);
    halve_log();
    return 1;
}

static void close_server(void) {
    if (server_pidfd >= 0)
        close(server_pidfd);
    if (session >= 0)
        close(session);
    server_pidfd = session = -1;
}

static void note_replacement(double took) {
    struct text t = {0};
    addf(&t, "{\"replacements\": %d, \"last\": %.6f, \"took\": %.3f, \"pid\": %d}", restarts,
         now_real(), took, (int)server_pid);
    if (server_record && t.data)
        write_atomically(server_record, t.data, t.len);
    free(t.data);
}

/* Start a successor on the session; 0 once it serves, else -1 with failure said. */
static int start_successor(void) {
    int answer[2];
    if (pipe2(answer, O_CLOEXEC) != 0) {
        snprintf(failure, sizeof failure,
                 "its cowfs server died and could not be replaced: %s", strerror(errno));
        return -1;
    }
    double started = now_mono();
    pid_t pid = fork();
    if (pid == 0) {
        char session_arg[16], answer_arg[16];
        signal(SIGTERM, SIG_DFL);
        setsid();
        int w = fcntl(answer[1], F_DUPFD, 3); /* without O_CLOEXEC: the successor's */
        int s = fcntl(session, F_DUPFD, 3);
        snprintf(session_arg, sizeof session_arg, "%d", s);
        snprintf(answer_arg, sizeof answer_arg, "%d", w);
        execl(python, python, "-m", "contextd.rootserver", "successor", session_arg, answer_arg,
              mount_json, (char *)NULL);
        _exit(127);
    }
    close(answer[1]);
    char said[256] = "";
    if (pid > 0) {
        struct pollfd p = {.fd = answer[0], .events = POLLIN};
        int ready;
        do
            ready = poll(&p, 1, SUCCESSOR_TIMEOUT_MS);
        while (ready < 0 && errno == EINTR);
        if (ready > 0) {
            ssize_t n = read(answer[0], said, sizeof said - 1);
            said[n > 0 ? n : 0] = 0;
            said[strcspn(said, "\n")] = 0;
        }
    }
    close(answer[0]);
    if (pid > 0 && strcmp(said, "ok") == 0) {
        server_pid = pid;
        server_pidfd = pidfd_open_(pid);
        restarts++;
        note_replacement(now_mono() - started);
        return 0;
    }
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    snprintf(failure, sizeof failure, "its cowfs server died and could not be replaced: %s",
             said[0] ? said : "it did not answer");
    return -1;
}

/* The root's server has died: a successor, or -1 (failure said) if there can be none. */
static int server_ended(void) {
    siginfo_t info;
    /* Ours if it was a successor: reaped here, or it would pass on as a zombie. */
    waitid(P_PIDFD, (id_t)server_pidfd, &info, WEXITED);
    close(server_pidfd);
    server_pidfd = -1;
    double now = now_mono();
    int kept = 0;
    for (int i = 0; i < death_count; i++)
        if (now - deaths[i] < DEATH_WINDOW)
            deaths[kept++] = deaths[i];
    if (kept > MAX_DEATHS)
        kept = MAX_DEATHS;
    deaths[kept++] = now;
    death_count = kept;
    if (session < 0 || !mount_json) {
        snprintf(failure, sizeof failure, "its cowfs server ended, and with it the guest's root");
        return -1;
    }
    if (death_count > MAX_DEATHS) {
        snprintf(failure, sizeof failure, "its cowfs server died %d times within %g s",
                 death_count, DEATH_WINDOW);
        return -1;
    }
    return start_successor();
}

/* The console's last TAIL_LINES lines, a JSON list, as str.splitlines() makes them. */
static void add_tail_lines(struct text *t) {
    size_t starts[TAIL_LINES + 1], ends[TAIL_LINES + 1];
    int lines = 0;
    size_t begin = 0;
    const unsigned char *u = (const unsigned char *)tail;
    for (size_t i = 0; i <= tail_len;) {
        size_t brk = i < tail_len ? line_break(u + i, tail_len - i) : 0;
        if (i < tail_len && brk == 0) {
            i++;
            continue;
        }
        if (i == tail_len && begin == tail_len)
            break;
        if (lines == TAIL_LINES + 1) {
            memmove(starts, starts + 1, TAIL_LINES * sizeof *starts);
            memmove(ends, ends + 1, TAIL_LINES * sizeof *ends);
            lines--;
        }
        starts[lines] = begin;
        ends[lines] = i;
        lines++;
        if (i == tail_len)
            break;
        i += brk;
        begin = i;
    }
    int first = lines > TAIL_LINES ? lines - TAIL_LINES : 0;
    add(t, "[", 1);
    for (int l = first; l < lines; l++) {
        if (l > first)
            add(t, ", ", 2);
        add_json_string(t, tail + starts[l], ends[l] - starts[l]);
    }
    add(t, "]", 1);
}

static void write_exit_record(int status) {
    struct text t = {0};
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        const char *asked = sig == SIGHUP ? "\"reboot\"" : sig == SIGINT ? "\"halt\"" : "null";
        addf(&t, "{\"signal\": %d, \"exit_status\": null, \"asked\": %s", sig, asked);
    } else if (WIFEXITED(status)) {
        addf(&t, "{\"signal\": null, \"exit_status\": %d, \"asked\": null", WEXITSTATUS(status));
    } else {
        addf(&t, "{\"signal\": null, \"exit_status\": null, \"asked\": null");
    }
    if (failure[0]) {
        add(&t, ", \"failure\": ", 13);
        add_json_string(&t, failure, strlen(failure));
    }
    addf(&t, ", \"ended\": %.6f, \"console_tail\": ", now_real());
    add_tail_lines(&t);
    add(&t, "}", 1);
    if (t.data)
        write_atomically(exit_record, t.data, t.len);
    free(t.data);
}

/* Whether path (a real path) is a mount point in this mount namespace. */
static int is_mounted(const char *path) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return 1; /* cannot tell: keep the root served */
    char *line = NULL;
    size_t size = 0;
    int found = 0;
    while (!found && getline(&line, &size, f) > 0) {
        char *field = line;
        for (int i = 0; i < 4 && field; i++) { /* the fifth field: the mount point */
            field = strchr(field, ' ');
            if (field)
                field++;
        }
        if (!field)
            continue;
        char point[4096];
        size_t n = 0;
        for (char *c = field; *c && *c != ' ' && n < sizeof point - 1; c++) {
            if (c[0] == '\\' && c[1] >= '0' && c[1] <= '3' && c[2] && c[3]) {
                point[n++] = (char)((c[1] - '0') * 64 + (c[2] - '0') * 8 + (c[3] - '0'));
                c += 3;
            } else {
                point[n++] = *c;
            }
        }
        point[n] = 0;
        found = strcmp(point, path) == 0;
    }
    free(line);
    fclose(f);
    return found;
}

/* An OCI container's root keeper (keep=MOUNTPOINT): see the top of this file. */
static int keep(void) {
    for (;;) {
        struct pollfd p[2];
        int n = 0, init_at = -1;
        p[n++] = (struct pollfd){.fd = server_pidfd, .events = POLLIN};
        if (init_pidfd >= 0)
            init_at = n, p[n++] = (struct pollfd){.fd = init_pidfd, .events = POLLIN};
        if (poll(p, (nfds_t)n, -1) < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        if (init_at >= 0 && p[init_at].revents) {
            close(init_pidfd);
            init_pidfd = -1;
            continue;
        }
        if (!p[0].revents)
            continue;
        if (init_pidfd < 0 || !is_mounted(keep_mountpoint)) {
            siginfo_t info;
            waitid(P_PIDFD, (id_t)server_pidfd, &info, WEXITED); /* a successor of ours */
            close_server();
            return 0;
        }
        if (server_ended() != 0) {
            close_server();
            syscall(SYS_pidfd_send_signal, init_pidfd, SIGKILL, NULL, 0);
            return 1;
        }
    }
}

static int parse_pair(const char *value, pid_t *pid, int *fd) {
    return sscanf(value, "%d,%d", pid, fd) == 2 ? 0 : -1;
}

/* The tail of stdin's bytes as the exit record's console_tail: for tests only. */
static int print_tail(void) {
    char buf[65536];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) {
        keep_tail(buf, (size_t)n);
    }
    struct text t = {0};
    add_tail_lines(&t);
    if (t.data)
        write_all(1, t.data, t.len);
    free(t.data);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "--console-tail"))
        return print_tail();
    for (int i = 1; i < argc; i++) {
        const char *eq = strchr(argv[i], '=');
        if (!eq || eq - argv[i] >= 16)
            continue;
        char key[16]; /* copied: argv stays as ps shows it */
        memcpy(key, argv[i], (size_t)(eq - argv[i]));
        key[eq - argv[i]] = 0;
        const char *value = eq + 1;
        if (!strcmp(key, "init"))
            parse_pair(value, &init_pid, &init_pidfd);
        else if (!strcmp(key, "console"))
            console = atoi(value);
        else if (!strcmp(key, "peer"))
            peer = atoi(value);
        else if (!strcmp(key, "log"))
            log_fd = atoi(value);
        else if (!strcmp(key, "exit-record"))
            exit_record = value;
        else if (!strcmp(key, "server"))
            parse_pair(value, &server_pid, &server_pidfd);
        else if (!strcmp(key, "session"))
            session = atoi(value);
        else if (!strcmp(key, "mount"))
            mount_json = value;
        else if (!strcmp(key, "server-record"))
            server_record = value;
        else if (!strcmp(key, "python"))
            python = value;
        else if (!strcmp(key, "keep"))
            keep_mountpoint = value;
    }
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    if (keep_mountpoint) {
        if (server_pidfd < 0 || !python) {
            fprintf(stderr, "contextd-supervise: run by contextd's OCI keeper only\n");
            return 2;
        }
        return keep();
    }
    /* The guest's init's parent ends only when init has: not at a SIGTERM meant for the
     * daemon, such as `systemctl kill contextd` sends to every process of its unit (this
     * one is there), after which contextd found the guest's supervisor dead and ended
     * the guest. (Its successors get the default back.) */
    signal(SIGTERM, SIG_IGN);
    if (init_pid <= 0 || init_pidfd < 0 || console < 0 || log_fd < 0 || !exit_record ||
        (server_pidfd >= 0 && !python)) {
        fprintf(stderr, "contextd-supervise: run by contextd's supervisor only\n");
        return 2;
    }
    int console_open = 1;
    for (;;) {
        struct pollfd p[3];
        int n = 0, init_at = n++, console_at = -1, server_at = -1;
        p[init_at] = (struct pollfd){.fd = init_pidfd, .events = POLLIN};
        if (console_open)
            console_at = n, p[n++] = (struct pollfd){.fd = console, .events = POLLIN};
        if (server_pidfd >= 0)
            server_at = n, p[n++] = (struct pollfd){.fd = server_pidfd, .events = POLLIN};
        if (poll(p, (nfds_t)n, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (console_at >= 0 && p[console_at].revents)
            console_open = copy_console();
        if (p[init_at].revents)
            break;
        if (server_at >= 0 && p[server_at].revents && server_ended() != 0) {
            close_server();
            syscall(SYS_pidfd_send_signal, init_pidfd, SIGKILL, NULL, 0);
        }
    }
    int status = 0;
    while (waitpid(init_pid, &status, 0) < 0 && errno == EINTR)
        ;
    close_server();
    if (peer >= 0)
        close(peer);
    fcntl(console, F_SETFL, fcntl(console, F_GETFL) | O_NONBLOCK);
    while (console_open && copy_console())
        ;
    write_exit_record(status);
    return 0;
}
