import CTestSupport
import Foundation
import HostOS
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// A race between closing a socket and shutting it down from another thread: the shutting-down
/// thread runs at idle priority on the same CPU as the owner, so the owner preempts it wherever it
/// is — also between its check that the socket is open and its shutdown(2). After each close the
/// owner opens a new socket pair, which takes the freed descriptor number; a shutdown that reaches
/// it is the bug this catches.
public enum ShutdownRace {
    public struct Outcome: Sendable {
        public var rounds: Int
        /// Rounds whose new socket pair took the closed descriptor's number.
        public var reusedNumbers: Int
        /// Rounds whose new socket pair was shut down.
        public var hits: Int
        public var shutdowns: Int
    }

    /// Runs `rounds` rounds. `own` makes the owner of one end of a fresh socket pair, `close`
    /// closes it and `shutdown` shuts it down (from the racing thread).
    public static func run<Owner: Sendable>(rounds: Int, own: (FileDescriptor) -> Owner, close: (Owner) -> Void,
                                            shutdown: @escaping @Sendable (Owner) -> Void) throws -> Outcome {
        let current = Mutex<Owner?>(nil)
        let stop = Atomic<Bool>(false)
        let shutdowns = Atomic<Int>(0)
        let cpu = max(0, ferry_test_first_cpu())
        let done = DispatchSemaphore(value: 0)
        let shutter = Thread {
            _ = ferry_test_pin_thread(cpu)
            var parameters = sched_param()
            _ = sched_setscheduler(0, idlePolicy, &parameters)
            while !stop.load(ordering: .relaxed) {
                if let owner = current.withLock({ $0 }) {
                    shutdown(owner)
                    shutdowns.add(1, ordering: .relaxed)
                }
            }
            done.signal()
        }
        shutter.start()
        _ = ferry_test_pin_thread(cpu)
        defer {
            stop.store(true, ordering: .relaxed)
            _ = ferry_test_unpin_thread()
            done.wait()
        }

        var outcome = Outcome(rounds: rounds, reusedNumbers: 0, hits: 0, shutdowns: 0)
        for _ in 0..<rounds {
            let (owned, peer) = try socketPair()
            let number = owned.rawValue
            let owner = own(owned)
            current.withLock { $0 = owner }
            Poll.sleep(for: .microseconds(200))   // the shutter runs
            current.withLock { $0 = nil }
            close(owner)
            let next = try socketPair()
            if next.0.rawValue == number || next.1.rawValue == number { outcome.reusedNumbers += 1 }
            Poll.sleep(for: .microseconds(200))   // a shutter preempted mid-call finishes it now
            if !carries(next) { outcome.hits += 1 }
            withExtendedLifetime(peer) {}
        }
        outcome.shutdowns = shutdowns.load(ordering: .relaxed)
        return outcome
    }

    /// `SCHED_IDLE` (linux/sched.h): runs only when nothing else wants the CPU.
    static let idlePolicy: Int32 = 5

    public static func socketPair() throws -> (FileDescriptor, FileDescriptor) {
        var fds: [Int32] = [-1, -1]
        try systemCall("socketpair") { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (FileDescriptor(fds[0]), FileDescriptor(fds[1]))
    }

    /// Whether a byte still crosses the pair: neither end was shut down.
    public static func carries(_ pair: (FileDescriptor, FileDescriptor)) -> Bool {
        var byte: UInt8 = 0x5A
        guard send(pair.0.rawValue, &byte, 1, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)) == 1 else { return false }
        byte = 0
        return recv(pair.1.rawValue, &byte, 1, Int32(MSG_DONTWAIT)) == 1 && byte == 0x5A
    }
}
