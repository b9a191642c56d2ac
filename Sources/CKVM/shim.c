// The few C functions whose declarations need _GNU_SOURCE, which the Swift importer's view of
// the C library does not define: Linux's O_DIRECT, fallocate(2) modes and pthread_setname_np.
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include "CKVM.h"

void ckvm_name_current_thread(const char *name) {
    char truncated[16];   // the kernel keeps 15 bytes and the NUL (TASK_COMM_LEN)
    strncpy(truncated, name, sizeof truncated - 1);
    truncated[sizeof truncated - 1] = '\0';
    pthread_setname_np(pthread_self(), truncated);
}

int ckvm_open_direct_flag(void) {
    return O_DIRECT;
}

int ckvm_fallocate(int fd, int punch_hole, long long offset, long long length) {
    int mode = FALLOC_FL_KEEP_SIZE | (punch_hole ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
    return fallocate(fd, mode, offset, length);
}
