/* One plain TCP stream over loopback, for benchmarks/migration to measure the link its
 * migrations share in the same run: a child process writes SIZE bytes from a buffer already in
 * memory, the parent reads them into another one already in memory (so that neither side pays
 * first-touch faults), and prints the bytes per second. Usage: plain-stream SIZE */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    size_t size = argc > 1 ? strtoull(argv[1], NULL, 0) : 512ul << 20;
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t length = sizeof address;
    if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, 1) != 0 ||
        getsockname(listener, (struct sockaddr *)&address, &length) != 0) {
        perror("plain-stream: listen");
        return 1;
    }
    int go[2];
    if (pipe(go) != 0) return 1;
    pid_t child = fork();
    /* Each side's buffer is its own, made after the fork (shared, the reader's writes would copy
     * every page), and mapped as Ferry maps guest RAM: transparent huge pages where possible. */
    char *buffer = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buffer == MAP_FAILED) return 1;
    madvise(buffer, size, MADV_HUGEPAGE);
    memset(buffer, 0x5a, size);
    if (child == 0) {
        int sender = socket(AF_INET, SOCK_STREAM, 0);
        char start;
        int on = 1;  /* as Ferry's migration sockets */
        setsockopt(sender, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
        if (connect(sender, (struct sockaddr *)&address, sizeof address) != 0 || read(go[0], &start, 1) != 1) _exit(1);
        for (size_t done = 0; done < size;) {
            ssize_t sent = write(sender, buffer + done, size - done);
            if (sent <= 0) _exit(1);
            done += (size_t)sent;
        }
        _exit(0);
    }
    int receiver = accept(listener, NULL, NULL);
    double began = now();
    if (receiver < 0 || write(go[1], "g", 1) != 1) return 1;
    for (size_t done = 0; done < size;) {
        ssize_t got = read(receiver, buffer + done, size - done);
        if (got <= 0) {
            perror("plain-stream: read");
            return 1;
        }
        done += (size_t)got;
    }
    double elapsed = now() - began;
    int status;
    waitpid(child, &status, 0);
    printf("%.0f\n", size / elapsed);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}
