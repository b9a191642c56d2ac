#if canImport(Glibc)
import Glibc
#endif
import CSandbox
import Synchronization

/// Ferry's system-call filters (`--seccomp`), with the lists of `SeccompPolicy`.
///
/// `confineProcess(_:)` puts the VMM's list on every thread of the process, once, before the VMM
/// serves its API or runs a guest; threads that act for the guest then add their own list with
/// `confineCurrentThread(_:name:)`. Until the process is confined (`--seccomp false`, or code
/// running outside `ferry`, such as tests in one process), `confineCurrentThread` does nothing.
public enum Seccomp {
    /// `--seccomp`'s values, as Cloud Hypervisor spells them.
    public enum Mode: String, Sendable, CaseIterable {
        /// No filter.
        case off = "false"
        /// A forbidden call ends the process, naming the call and the thread.
        case enforce = "true"
        /// A forbidden call is allowed and logged by the kernel (the audit log, `dmesg`).
        case log
    }

    private static let processMode = Mutex<Mode>(.off)

    /// The mode the process was confined with; `off` before `confineProcess`.
    public static var mode: Mode { processMode.withLock { $0 } }

    /// Confines every thread of the process to the VMM's list. Call once, early.
    public static func confineProcess(_ mode: Mode) throws(SystemError) {
        guard mode != .off else { return }
        ferry_seccomp_install_reporter(0)
        try load(.vmm, mode: mode, allThreads: true, name: "ferry")
        processMode.withLock { $0 = mode }
    }

    /// Adds `kind`'s list to the calling thread, named `name` in a report, if the process is
    /// confined. With `ioctls`, `ioctl` is allowed with those requests only.
    public static func confineCurrentThread(_ kind: SeccompPolicy.ThreadKind, name: String, ioctls: [UInt] = []) throws(SystemError) {
        let mode = mode
        guard mode != .off else { return }
        try load(kind, mode: mode, allThreads: false, name: name, ioctls: ioctls)
    }

    /// Loads `kind`'s list on the calling thread (or all threads) with `mode`; with `ioctls`,
    /// `ioctl` only with those requests.
    static func load(_ kind: SeccompPolicy.ThreadKind, mode: Mode, allThreads: Bool, name: String, ioctls: [UInt] = []) throws(SystemError) {
        let names = Array(Set(SeccompPolicy.allowed(for: kind))).filter { ioctls.isEmpty || $0 != "ioctl" }.sorted()
        var error = [CChar](repeating: 0, count: 256)
        let cStrings = names.map { strdup($0) }
        defer { cStrings.forEach { free($0) } }
        let requests = ioctls.map { CUnsignedLong($0) }
        let result = cStrings.map { UnsafePointer<CChar>($0) }.withUnsafeBufferPointer { pointers in
            requests.withUnsafeBufferPointer { requests in
                ferry_seccomp_load(pointers.baseAddress, pointers.count, requests.baseAddress, requests.count,
                                   mode == .log ? Int32(FERRY_SECCOMP_LOG) : Int32(FERRY_SECCOMP_TRAP), allThreads ? 1 : 0, name,
                                   &error, error.count)
            }
        }
        guard result == 0 else {
            let reason = String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            throw SystemError("seccomp (\(kind.rawValue) list)", errno: 0, detail: reason)
        }
    }
}
