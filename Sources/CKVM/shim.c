// The few C functions whose declarations need _GNU_SOURCE, which the Swift importer's view of
// the C library does not define: Linux's O_DIRECT and fallocate(2) modes.
#define _GNU_SOURCE
#include <fcntl.h>
#include "CKVM.h"

int ckvm_open_direct_flag(void) {
    return O_DIRECT;
}

int ckvm_fallocate(int fd, int punch_hole, long long offset, long long length) {
    int mode = FALLOC_FL_KEEP_SIZE | (punch_hole ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
    return fallocate(fd, mode, offset, length);
}
