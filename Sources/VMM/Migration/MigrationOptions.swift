import Foundation
import Machine
import Migration

/// A checked `vm.send-migration` request (Cloud Hypervisor's `SendMigrationData`).
public struct SendMigrationOptions: Equatable, Sendable {
    /// Ferry sends over exactly one connection; `connections` is accepted for Cloud Hypervisor's
    /// API only with this value.
    public static let connections = 1

    public var destination: MigrationURL
    public var policy: PrecopyPolicy
    /// The source VMM stays up after the migration finished (its VM is deleted either way).
    public var keepAlive: Bool

    public init(destination: MigrationURL, policy: PrecopyPolicy = PrecopyPolicy(), keepAlive: Bool = false) {
        self.destination = destination
        self.policy = policy
        self.keepAlive = keepAlive
    }
}

/// The `state` payload of a migration: the machine state, and whether the guest ran on the
/// source (a guest paused there stays paused on the destination).
struct MigrationStateDocument: Codable {
    var machine: MachineState
    var guestRunning: Bool
}

/// Where a migration is, as its `phase` property and progress report it.
enum MigrationPhase: String, Sendable {
    /// Connecting, the start and config requests.
    case starting
    /// Pre-copy passes while the guest runs (source); memory requests (destination).
    case memoryPrecopy = "memory-precopy"
    /// From the switch-over on: the last memory, the state, the destination resuming.
    case completing

    var progressPhase: MigrationProgress.Phase {
        switch self {
        case .starting: .starting
        case .memoryPrecopy: .memoryPrecopy
        case .completing: .completing
        }
    }
}

extension Duration {
    /// Whole milliseconds, as events carry durations.
    var wholeMilliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }

    var seconds: Double {
        Double(components.seconds) + Double(components.attoseconds) / 1e18
    }
}

/// Runs `body` (typically a call on the VMM actor) and waits for its result, blocking the calling
/// thread. Only for a migration's own thread, never for a thread of Swift's cooperative pool.
func waitFor<T: Sendable>(_ body: @escaping @Sendable () async -> T) -> T {
    let box = WaitBox<T>()
    Task {
        box.value = await body()
        box.done.signal()
    }
    box.done.wait()
    return box.value!
}

/// The result of `waitFor`'s task, handed over under the semaphore's ordering.
private final class WaitBox<T>: @unchecked Sendable {
    var value: T?
    let done = DispatchSemaphore(value: 0)
}
