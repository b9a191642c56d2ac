import CKVM
import HostOS
#if canImport(Glibc)
import Glibc
#endif

/// An eventfd(2) counter: a descriptor that one side signals and another waits on, and that KVM
/// can signal (ioeventfd: a guest's write to a doorbell) or wait on (irqfd: inject an interrupt)
/// without a return to user space.
public final class EventFD: Sendable {
    public let descriptor: FileDescriptor
    public var rawValue: Int32 { descriptor.rawValue }

    /// A non-blocking counter starting at zero.
    public init() throws(SystemError) {
        let fd = try systemCall("eventfd") { ckvm_eventfd() }
        descriptor = FileDescriptor(fd)
    }

    /// Adds one to the counter, waking a waiter.
    public func signal() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(rawValue, $0.baseAddress, 8) }
    }

    /// Reads and resets the counter; false if it was zero.
    @discardableResult
    public func consume() -> Bool {
        var value: UInt64 = 0
        return withUnsafeMutableBytes(of: &value) { Glibc.read(rawValue, $0.baseAddress, 8) } == 8
    }
}

