#if canImport(Glibc)
import Glibc
#endif
import CSandbox

/// Landlock (`--landlock`): once the process is confined, it can open only the paths its rules
/// name, with the access they give — whatever its user could open otherwise.
///
/// A Landlock domain covers the thread that applies it and the threads that thread starts later;
/// until the kernel can apply one to every thread at once (Landlock ABI 8), the process must be
/// confined before it has a second thread, so `ferry` does it while it parses its command line.
public enum Landlock {
    /// One path the process may still open: read-only, or read-write (create, remove and rename
    /// beneath a directory included).
    public struct Rule: Equatable, Sendable {
        public var path: String
        public var write: Bool

        public init(_ path: String, write: Bool) {
            self.path = path
            self.write = write
        }
    }

    /// The kernel's Landlock ABI version, nil without Landlock.
    public static var abi: Int? {
        let version = ferry_landlock_abi()
        return version > 0 ? Int(version) : nil
    }

    /// Confines the process to `rules`; returns the ABI version used. Fails, confining nothing,
    /// without Landlock, on a path that cannot be opened, or once a second thread exists.
    @discardableResult
    public static func restrictProcess(to rules: [Rule]) throws(SystemError) -> Int {
        guard let abi else {
            throw SystemError("landlock", errno: 0, detail: "this kernel has no Landlock (Linux 5.13 or later, with landlock in its LSMs)")
        }
        var error = [CChar](repeating: 0, count: 512)
        func failure(_ operation: String) -> SystemError {
            SystemError(operation, errno: 0, detail: String(decoding: error.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        let ruleset = ferry_landlock_ruleset(Int32(abi), &error, error.count)
        guard ruleset >= 0 else { throw failure("landlock") }
        defer { close(ruleset) }
        for rule in rules where ferry_landlock_allow(ruleset, Int32(abi), rule.path, rule.write ? 1 : 0, &error, error.count) != 0 {
            throw failure("landlock rule")
        }
        guard ferry_landlock_restrict_process(ruleset, &error, error.count) == 0 else { throw failure("landlock") }
        return abi
    }
}
