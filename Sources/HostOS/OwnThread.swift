import Foundation

/// Runs blocking work (socket I/O, waits on other threads) on a new OS thread named `name`, never
/// on Swift's cooperative pool, and awaits its result without blocking the caller's thread.
public func onOwnThread<T: Sendable>(named name: String, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        let thread = Thread { continuation.resume(returning: body()) }
        thread.name = name
        thread.start()
    }
}
