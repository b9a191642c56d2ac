/// The system calls each kind of Ferry thread may make: one list per kind, in one place
/// (docs/security.md says what each defends). Everything else is forbidden: with `--seccomp true`
/// (the default) a forbidden call ends the process with a message naming it, with `log` it is
/// allowed and the kernel logs it.
///
/// Filters stack: a thread is held to its own list and to the process's. The process's list is
/// the VMM's, installed on every thread at start; vCPU threads, which run the guest and emulate
/// its exits, and device threads, which serve its queues, each add their own narrower list before
/// they handle anything the guest wrote. Other threads keep the VMM's list: Swift's runtime
/// creates its pool threads from whichever thread first needs one, and a new thread inherits its
/// creator's filters, so a narrow list on an API, migration or event-writer thread could end up on
/// a pool thread that serves every request.
public enum SeccompPolicy {
    public enum ThreadKind: String, Sendable, CaseIterable {
        /// Every thread of the process: the API server, Swift's pool (the VMM core), migrations,
        /// the event writer, consoles.
        case vmm
        /// `vcpuN`: `KVM_RUN` and the exits it emulates (port I/O, MMIO, the consoles' output).
        case vcpu
        /// One per virtio device: queues, disk files, taps, interrupts.
        case deviceIO = "device-io"
    }

    /// What any thread does under Swift's runtime and glibc: memory, locks, signals, time, and
    /// ending itself.
    static let runtime = [
        "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
        "futex", "sched_yield", "sched_getaffinity", "rseq", "set_robust_list",
        "rt_sigprocmask", "rt_sigreturn", "sigaltstack",
        "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday",
        "getpid", "gettid", "getrandom",
        "exit", "exit_group",
        // The kernel resumes an interrupted timed wait (futex, poll, nanosleep) after a stop and
        // continue (SIGSTOP, a debugger, the cgroup freezer) through this call.
        "restart_syscall",
        // Writing a log line or an error to standard error.
        "write", "writev",
    ]

    /// `vcpuN`: runs the guest (`KVM_RUN`, and the vCPU's own state when it is saved or set),
    /// emulates the exits (its `ioctl` requests are limited further by the caller, see
    /// `Machine.guestThreadIoctls`), signals interrupts (irqfd, `KVM_SIGNAL_MSI`), writes the consoles' output
    /// (a file, a pseudo-terminal or a socket), and waits while the machine is paused.
    static let vcpu = runtime + [
        "ioctl", "read", "pread64", "pwrite64", "sendto", "sendmsg", "poll", "ppoll",
        // Kicking the other vCPUs out of KVM_RUN when the guest stops the machine; closing a
        // vCPU's descriptors when its thread is the last to let go of them.
        "tgkill", "close",
    ]

    /// A virtio device's thread: waits on its doorbells and backend (ppoll), moves a disk's data
    /// straight between the image and guest memory, frames between a tap and guest memory, entropy
    /// from the kernel, and signals the guest (irqfd writes). Its `ioctl` requests are limited as a
    /// vCPU's are.
    static let deviceIO = runtime + [
        "read", "readv", "pread64", "preadv", "preadv2", "pwrite64", "pwritev", "pwritev2",
        "fsync", "fdatasync", "fallocate", "lseek", "fstat", "newfstatat",
        "poll", "ppoll", "ioctl", "close",
        // A console's output to a socket client; abort() on a crash signals the thread itself.
        "sendto", "tgkill",
        // A device thread was caught opening a file while its VMM shut down (3 of 11 full test
        // runs under load, always a virtio-blk thread; which file, and why, is not known). It
        // may, so that this does not end a VMM; Landlock, where on, still limits what it can open.
        "openat",
    ]

    /// The VMM: everything above, and what building, running, saving and moving a VM takes — files
    /// (kernel, disks, snapshots, consoles), sockets (the API, migrations, consoles, taps), KVM,
    /// threads, and the API server's event loops.
    static let vmm = Array(Set(vcpu + deviceIO + [
        // Files and directories.
        "openat", "close", "close_range", "dup", "dup2", "dup3", "fcntl", "flock", "fstat", "newfstatat", "statx",
        "lseek", "ftruncate", "fallocate", "readlink", "readlinkat", "getdents64", "mkdirat", "unlinkat",
        "renameat", "renameat2", "fchmod", "fchmodat", "faccessat", "faccessat2", "getcwd", "umask",
        "memfd_create", "mincore", "copy_file_range", "sendfile", "statfs", "fstatfs", "utimensat",
        // Foundation's FileManager also uses the older calls.
        "open", "stat", "lstat", "access", "mkdir", "rmdir", "unlink", "rename", "chmod", "readlink",
        // Sockets: the API (also with descriptors passed over it), migrations, consoles, taps.
        "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "shutdown",
        "getsockname", "getpeername", "getsockopt", "setsockopt",
        "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg",
        // Waiting: the API server's event loops, pipes and eventfds between threads.
        "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "eventfd2", "pipe2", "timerfd_create",
        "timerfd_settime", "select", "pselect6",
        // Threads and signals (libdispatch's workers set their priority and wait on signals).
        "clone", "clone3", "rt_sigaction", "rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait", "signalfd4",
        "tgkill", "kill", "prctl", "sched_setaffinity", "setpriority", "getpriority",
        // A vCPU or device thread adding its own list (prctl sets no_new_privs first).
        "seccomp",
        "getuid", "geteuid", "getgid", "getegid", "getppid", "uname", "sysinfo", "prlimit64", "getrlimit",
        "clock_getres",
    ])).sorted()

    /// The list of `kind`.
    public static func allowed(for kind: ThreadKind) -> [String] {
        switch kind {
        case .vmm: vmm
        case .vcpu: vcpu
        case .deviceIO: deviceIO
        }
    }
}
