#define _GNU_SOURCE
#include "CSandbox.h"

#include <errno.h>
#include <seccomp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

// System call names by number, resolved when the reporter is installed: the handler may not call
// libseccomp (it allocates).
#define NAMED_CALLS 512
static char call_names[NAMED_CALLS][32];
// The name a thread gave when it added its own list; empty on threads with the process's only.
static __thread char confined_thread[32];
static volatile sig_atomic_t recorded = -1;
static int record_only_mode;

int ferry_seccomp_load(const char *const *names, size_t count, const unsigned long *ioctls, size_t ioctl_count, int mode,
                       int all_threads, const char *thread_name, char *error, size_t error_size) {
    scmp_filter_ctx context = seccomp_init(mode == FERRY_SECCOMP_LOG ? SCMP_ACT_LOG : SCMP_ACT_TRAP);
    if (!context) {
        snprintf(error, error_size, "seccomp_init failed");
        return -1;
    }
    int result = 0;
    for (size_t index = 0; index < count && result == 0; index++) {
        int number = seccomp_syscall_resolve_name(names[index]);
        if (number == __NR_SCMP_ERROR) {
            snprintf(error, error_size, "unknown system call '%s' in the allow-list", names[index]);
            result = -1;
        } else if ((result = seccomp_rule_add_array(context, SCMP_ACT_ALLOW, number, 0, NULL)) != 0) {
            snprintf(error, error_size, "allowing %s: %s", names[index], strerror(-result));
            result = -1;
        }
    }
    // The request is an unsigned int in the kernel: compare its low 32 bits only.
    for (size_t index = 0; index < ioctl_count && result == 0; index++) {
        struct scmp_arg_cmp request = {.arg = 1, .op = SCMP_CMP_MASKED_EQ, .datum_a = 0xffffffffUL, .datum_b = ioctls[index] & 0xffffffffUL};
        if ((result = seccomp_rule_add_array(context, SCMP_ACT_ALLOW, SCMP_SYS(ioctl), 1, &request)) != 0) {
            snprintf(error, error_size, "allowing ioctl 0x%lx: %s", ioctls[index], strerror(-result));
            result = -1;
        }
    }
    // The kernel's audit log records a trapped call too, not only the logged ones.
    if (result == 0 && (result = seccomp_attr_set(context, SCMP_FLTATR_CTL_LOG, 1)) != 0) {
        snprintf(error, error_size, "logging trapped calls: %s", strerror(-result));
        result = -1;
    }
    if (result == 0 && all_threads && (result = seccomp_attr_set(context, SCMP_FLTATR_CTL_TSYNC, 1)) != 0) {
        snprintf(error, error_size, "synchronising the filter across threads: %s", strerror(-result));
        result = -1;
    }
    if (result == 0 && (result = seccomp_load(context)) != 0) {
        snprintf(error, error_size, "loading the filter: %s", strerror(-result));
        result = -1;
    }
    seccomp_release(context);
    if (result == 0 && thread_name) {
        snprintf(confined_thread, sizeof confined_thread, "%s", thread_name);
    }
    return result;
}

static void append(char *line, size_t *length, size_t size, const char *text) {
    while (*text && *length + 1 < size) line[(*length)++] = *text++;
    line[*length] = 0;
}

static void append_number(char *line, size_t *length, size_t size, long value) {
    char digits[24];
    int count = 0;
    unsigned long magnitude = value < 0 ? (unsigned long)-value : (unsigned long)value;
    do {
        digits[count++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude && count < 23);
    if (value < 0) append(line, length, size, "-");
    while (count > 0 && *length + 1 < size) line[(*length)++] = digits[--count];
    line[*length] = 0;
}

static void report(int signal, siginfo_t *info, void *context) {
    (void)signal;
    long number = info->si_syscall;
    if (record_only_mode) {
        recorded = number;
        ucontext_t *machine = context;
        machine->uc_mcontext.gregs[REG_RAX] = -ENOSYS;
        return;
    }
    char line[512];
    size_t length = 0;
    append(line, &length, sizeof line, "ferry: seccomp: forbidden system call ");
    append(line, &length, sizeof line, number >= 0 && number < NAMED_CALLS && call_names[number][0] ? call_names[number] : "?");
    append(line, &length, sizeof line, " (");
    append_number(line, &length, sizeof line, number);
    // A file the thread tried to open says most about why.
    ucontext_t *machine = context;
    const char *path = NULL;
    if (number == SYS_openat) path = (const char *)machine->uc_mcontext.gregs[REG_RSI];
    if (number == SYS_open) path = (const char *)machine->uc_mcontext.gregs[REG_RDI];
    if (path) {
        append(line, &length, sizeof line, " of ");
        char shown[128];
        size_t index = 0;
        while (index + 1 < sizeof shown && path[index]) { shown[index] = path[index]; index++; }
        shown[index] = 0;
        append(line, &length, sizeof line, shown);
    }
    append(line, &length, sizeof line, ") on thread ");
    char name[17] = {0};
    if (confined_thread[0] == 0) prctl(PR_GET_NAME, name, 0, 0, 0);  // in the VMM's list
    append(line, &length, sizeof line, confined_thread[0] ? confined_thread : name[0] ? name : "?");
    append(line, &length, sizeof line, "; the process ends (--seccomp log allows and logs instead)\n");
    ssize_t ignored = write(STDERR_FILENO, line, length);
    (void)ignored;
    _exit(128 + SIGSYS);
}

void ferry_seccomp_install_reporter(int record_only) {
    for (int number = 0; number < NAMED_CALLS; number++) {
        char *name = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, number);
        if (name) {
            snprintf(call_names[number], sizeof call_names[number], "%s", name);
            free(name);
        }
    }
    record_only_mode = record_only;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = report;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSYS, &action, NULL);
}

long ferry_seccomp_last_recorded(void) {
    return recorded;
}

long ferry_seccomp_number(const char *name) {
    int number = seccomp_syscall_resolve_name(name);
    return number == __NR_SCMP_ERROR ? -1 : number;
}
