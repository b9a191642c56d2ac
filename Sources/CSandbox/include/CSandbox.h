// C shim over libseccomp (Debian's) and Landlock for Ferry's confinement (docs/security.md), and
// the thread names its reporter and every other tool read.
//
// The allow-lists themselves are Swift (HostOS/SeccompPolicy.swift); this side builds and loads
// the filter and reports a forbidden call from the SIGSYS handler, where only async-signal-safe
// code may run.
#ifndef FERRY_CSANDBOX_H
#define FERRY_CSANDBOX_H

#include <stddef.h>

enum {
    /// A forbidden call raises SIGSYS; the reporter names it and ends the process.
    FERRY_SECCOMP_TRAP = 0,
    /// A forbidden call is allowed and the kernel logs it (audit, in the kernel log).
    FERRY_SECCOMP_LOG = 1,
};

/// Loads a filter that allows the system calls named in `names` and handles every other one as
/// `mode` says: on the calling thread, or on every thread of the process with `all_threads`.
/// With `ioctl_count` > 0, `ioctl` is allowed only with the requests in `ioctls` (and must not be
/// in `names`). `thread_name` is what the reporter calls this thread. 0, or -1 with `error`.
int ferry_seccomp_load(const char *const *names, size_t count, const unsigned long *ioctls, size_t ioctl_count, int mode,
                       int all_threads, const char *thread_name, char *error, size_t error_size);

/// Installs the SIGSYS handler that reports a forbidden call: it writes the call's name, number and
/// the thread to standard error and ends the process with status 159 (128 + SIGSYS). With
/// `record_only` (for tests) it records the call instead, makes it fail with ENOSYS, and returns.
void ferry_seccomp_install_reporter(int record_only);

/// The number of the last call the reporter recorded (record-only mode), or -1.
long ferry_seccomp_last_recorded(void);

/// The number of the system call `name` on this architecture, or -1.
long ferry_seccomp_number(const char *name);

// Landlock: the paths the process may still open once it is confined.

/// The highest Landlock ABI the kernel offers, or -1 without Landlock (errno says why).
int ferry_landlock_abi(void);

/// A ruleset handling every file-system access `abi` knows; -1 with `error` on failure.
int ferry_landlock_ruleset(int abi, char *error, size_t error_size);

/// Allows `path` (a file or a directory) read-only or, with `write`, read-write; -1 with `error`.
int ferry_landlock_allow(int ruleset, int abi, const char *path, int write, char *error, size_t error_size);

/// Confines the process to `ruleset`. A Landlock domain covers the calling thread and the
/// threads it starts later, so this refuses (-1, with `error`) once the process has a second
/// thread: it must come before any other thread exists.
int ferry_landlock_restrict_process(int ruleset, char *error, size_t error_size);

/// Names the calling thread where /proc/PID/task/TID/comm shows it (the kernel keeps 15 bytes;
/// the caller truncates), so that top -H, gdb and libvirt (which looks for vcpuN) find it.
void ferry_name_current_thread(const char *name);

#endif
