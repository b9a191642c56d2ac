import Foundation
import Synchronization
import Testing

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

/// Runs `attempt` up to three times, until one is conclusive (returns true). An attempt returns
/// false when the machine's load let the moment it aimed at pass before it acted, so it proved
/// nothing either way; `inconclusive` says what happened, and is printed (with `prefix`) before
/// the next attempt and recorded as an issue if no attempt was conclusive.
public func retryingInconclusive(_ inconclusive: String, prefix: String = "", sourceLocation: SourceLocation = #_sourceLocation,
                                 _ attempt: () async throws -> Bool) async throws {
    let attempts = 3
    for number in 1...attempts {
        if try await attempt() { return }
        print("\(prefix)attempt \(number): \(inconclusive); again")
    }
    Issue.record("\(inconclusive), \(attempts) times", sourceLocation: sourceLocation)
}
