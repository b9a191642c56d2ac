import Foundation
import Synchronization

/// Polls `condition` every `interval` until it holds or `timeout` passes; returns whether it held.
/// Tests wait for what they expect with a generous deadline instead of looking once.
public func waitUntil(_ timeout: Duration, interval: Duration = .milliseconds(20), _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        if ContinuousClock.now >= deadline { return false }
        try? await Task.sleep(for: interval)
    }
    return true
}

/// Blocking work on a new OS thread (socket I/O stays off the Swift concurrency pool), and a way
/// to wait for its result.
public final class BackgroundThread<T: Sendable>: Sendable {
    private let done = DispatchSemaphore(value: 0)
    private let result = Mutex<Result<T, any Error>?>(nil)

    public init(_ body: @escaping @Sendable () throws -> T) {
        let thread = Thread { [self] in
            let outcome = Result { try body() }
            result.withLock { $0 = outcome }
            done.signal()
        }
        thread.start()
    }

    /// Waits for the thread and returns its result, or throws its error.
    public func join() throws -> T {
        done.wait()
        done.signal()
        guard let outcome = result.withLock({ $0 }) else { throw TestFailure("the thread finished without a result") }
        return try outcome.get()
    }
}

/// Runs blocking work (a process to its end, socket reads, sleeps) on an OS thread of its own and
/// awaits it, so that it never holds one of the few threads of the Swift concurrency pool, which
/// every test running at the same time shares (a held one starves their waits and pollers).
public func offThePool<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        Thread { continuation.resume(with: Result { try body() }) }.start()
    }
}
