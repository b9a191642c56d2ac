#define _GNU_SOURCE
#include "CSandbox.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/landlock.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

// Rights newer than Debian 12's kernel headers.
#ifndef LANDLOCK_ACCESS_FS_TRUNCATE
#define LANDLOCK_ACCESS_FS_TRUNCATE (1ULL << 14)
#endif
#ifndef LANDLOCK_ACCESS_FS_IOCTL_DEV
#define LANDLOCK_ACCESS_FS_IOCTL_DEV (1ULL << 15)
#endif

// What a rule may grant on a file (the rest only make sense on a directory).
static const uint64_t file_rights = LANDLOCK_ACCESS_FS_EXECUTE | LANDLOCK_ACCESS_FS_WRITE_FILE | LANDLOCK_ACCESS_FS_READ_FILE |
                                    LANDLOCK_ACCESS_FS_TRUNCATE | LANDLOCK_ACCESS_FS_IOCTL_DEV;

// Every file-system right of ABI `abi`.
static uint64_t handled(int abi) {
    uint64_t rights = (LANDLOCK_ACCESS_FS_MAKE_SYM << 1) - 1;  // ABI 1: bits 0-12
    if (abi >= 2) rights |= LANDLOCK_ACCESS_FS_REFER;
    if (abi >= 3) rights |= LANDLOCK_ACCESS_FS_TRUNCATE;
    if (abi >= 5) rights |= LANDLOCK_ACCESS_FS_IOCTL_DEV;
    return rights;
}

int ferry_landlock_abi(void) {
    return (int)syscall(SYS_landlock_create_ruleset, NULL, 0, LANDLOCK_CREATE_RULESET_VERSION);
}

int ferry_landlock_ruleset(int abi, char *error, size_t error_size) {
    struct landlock_ruleset_attr attributes = {.handled_access_fs = handled(abi)};
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attributes, sizeof attributes, 0);
    if (ruleset < 0) snprintf(error, error_size, "landlock_create_ruleset: %s", strerror(errno));
    return ruleset;
}

int ferry_landlock_allow(int ruleset, int abi, const char *path, int write, char *error, size_t error_size) {
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0) {
        snprintf(error, error_size, "%s: %s", path, strerror(errno));
        return -1;
    }
    struct stat status;
    if (fstat(fd, &status) != 0) {
        snprintf(error, error_size, "%s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    uint64_t read_rights = LANDLOCK_ACCESS_FS_READ_FILE | LANDLOCK_ACCESS_FS_READ_DIR;
    uint64_t rights = (write ? handled(abi) : read_rights) & ~LANDLOCK_ACCESS_FS_EXECUTE;
    if (!S_ISDIR(status.st_mode)) rights &= file_rights;
    rights &= handled(abi);
    struct landlock_path_beneath_attr rule = {.allowed_access = rights, .parent_fd = fd};
    int result = (int)syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, &rule, 0);
    if (result != 0) snprintf(error, error_size, "%s: landlock_add_rule: %s", path, strerror(errno));
    close(fd);
    return result;
}

// The number of threads in this process, from /proc/self/task; -1 if it cannot be read.
static int thread_count(void) {
    DIR *tasks = opendir("/proc/self/task");
    if (!tasks) return -1;
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(tasks))) {
        if (entry->d_name[0] != '.') count++;
    }
    closedir(tasks);
    return count;
}

int ferry_landlock_restrict_process(int ruleset, char *error, size_t error_size) {
    int threads = thread_count();
    if (threads != 1) {
        snprintf(error, error_size, "the process already runs %d threads; Landlock on this kernel confines only the "
                 "thread that applies it and the threads it starts later", threads);
        return -1;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) {
        snprintf(error, error_size, "prctl(PR_SET_NO_NEW_PRIVS): %s", strerror(errno));
        return -1;
    }
    if (syscall(SYS_landlock_restrict_self, ruleset, 0) != 0) {
        snprintf(error, error_size, "landlock_restrict_self: %s", strerror(errno));
        return -1;
    }
    return 0;
}
