#if canImport(Glibc)
import Glibc
#endif

/// Owns one open file descriptor and closes it exactly once, when the owner goes away.
public final class OwnedFileDescriptor: Sendable {
    public let rawValue: Int32

    public init(_ rawValue: Int32) {
        self.rawValue = rawValue
    }

    deinit {
        close(rawValue)
    }
}
