import Foundation
import Synchronization

/// A guest console in the test process: bytes from a machine's UART, split into lines at LF, from any thread.
public final class GuestConsole: Sendable {
    private let state = Mutex<(lines: [String], partial: [UInt8])>(([], []))

    /// Starts with the unfinished line of another console: a restored guest finishes the line the
    /// saved one was in the middle of.
    public init(continuing previous: GuestConsole? = nil) {
        if let previous {
            let partial = previous.partial
            state.withLock { $0.partial = partial }
        }
    }

    public var output: @Sendable ([UInt8]) -> Void {
        { [self] bytes in
            state.withLock { state in
                for byte in bytes {
                    if byte == UInt8(ascii: "\n") {
                        state.lines.append(String(decoding: state.partial, as: UTF8.self))
                        state.partial.removeAll(keepingCapacity: true)
                    } else {
                        state.partial.append(byte)
                    }
                }
            }
        }
    }

    public var lines: [String] { state.withLock { $0.lines } }
    public var partial: [UInt8] { state.withLock { $0.partial } }

    /// Waits until the guest is in the middle of printing a line; returns whether it was caught so.
    public func waitUntilMidLine(timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if !partial.isEmpty { return true }
            Thread.sleep(forTimeInterval: 0.0005)
        }
        return false
    }

    /// Waits until `done` holds for the lines so far; returns whether it did before the deadline.
    public func wait(timeout: Duration, until done: ([String]) -> Bool) -> Bool {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if done(lines) { return true }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return done(lines)
    }
}
