/* Reach the kernel keyrings: the session keyring this process was given and
 * root's user keyring (one per uid for the whole host without a user
 * namespace). Usage: keys DESCRIPTION; prints one line per attempt:
 * "<what> ok <value>" or "<what> <errno name>". */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_SEARCH 10
#define KEYCTL_READ 11
#define KEY_SPEC_SESSION_KEYRING -3
#define KEY_SPEC_USER_KEYRING -4

static void report(const char *what, long result, const char *value)
{
    if (result < 0)
        printf("%s %s\n", what, strerrorname_np(errno));
    else
        printf("%s ok %s\n", what, value ? value : "");
}

int main(int argc, char **argv)
{
    const char *description = argc > 1 ? argv[1] : "contextd-test";
    char buffer[256] = "";
    char id[32];
    long session = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0);
    snprintf(id, sizeof id, "%ld", session);
    report("session", session, id);
    long key = syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, "user", description, 0);
    report("search", key, NULL);
    if (key >= 0) {
        long n = syscall(SYS_keyctl, KEYCTL_READ, key, buffer, sizeof buffer - 1);
        if (n >= 0)
            buffer[n < (long)sizeof buffer - 1 ? n : (long)sizeof buffer - 1] = 0;
        report("read", n, buffer);
    }
    return 0;
}
