import CSandbox
import Foundation
import Synchronization

/// Starts `body` on a new OS thread that carries `name` (its first 15 bytes, all the kernel keeps)
/// where `top -H`, gdb, libvirt and the seccomp reporter read it: `/proc/PID/task/*/comm`.
/// Foundation's `Thread.name` does not reach the kernel on Linux when set before `start()`, nor,
/// reliably, when the new thread sets it before `start()` has returned to its starter.
public func startThread(named name: String, stackSize: Int? = nil, _ body: @escaping @Sendable () -> Void) {
    var truncated = ""
    for scalar in name.unicodeScalars {
        guard truncated.utf8.count + String(scalar).utf8.count <= 15 else { break }
        truncated.unicodeScalars.append(scalar)
    }
    let kernelName = truncated
    let thread = Thread {
        ferry_name_current_thread(kernelName)
        body()
    }
    if let stackSize { thread.stackSize = stackSize }
    thread.start()
}

/// Runs blocking work (socket I/O, waits on other threads) on a new OS thread named `name`, never
/// on Swift's cooperative pool, and awaits its result without blocking the caller's thread.
public func onOwnThread<T: Sendable>(named name: String, _ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        startThread(named: name) { continuation.resume(returning: body()) }
    }
}

/// Runs work on one long-lived thread of its own, in the order it was posted. For a thread under a
/// narrow seccomp list (a vCPU's) that must reach Swift's concurrency: starting a `Task` there
/// could make the runtime create a pool thread from it, and that thread would inherit the narrow
/// list; posting here only wakes the courier's thread, which starts the task instead.
public final class Courier: Sendable {
    /// The process's courier; its thread starts on first use, which must be on a thread with the
    /// VMM's filters only (`VirtualMachineMonitor` touches it when it is made).
    public static let shared = Courier(name: "courier")

    private let work = Mutex<[@Sendable () -> Void]>([])
    private let posted = DispatchSemaphore(value: 0)

    private init(name: String) {
        startThread(named: name) { [self] in
            while true {
                posted.wait()
                let batch = work.withLock { work in
                    defer { work.removeAll() }
                    return work
                }
                for item in batch { item() }
            }
        }
    }

    /// Hands `item` to the courier's thread; never blocks and never creates a thread.
    public func post(_ item: @escaping @Sendable () -> Void) {
        work.withLock { $0.append(item) }
        posted.signal()
    }
}
