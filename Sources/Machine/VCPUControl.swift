import Foundation
import KVM

/// Coordinates the vCPU threads: run, park (pause) and exit, with every command acknowledged.
///
/// A vCPU thread only enters `KVM_RUN` while the command is `run`. To take a vCPU out of a run in
/// progress, the controller sets the vCPU's `immediate_exit` flag and sends its thread a signal
/// (`kickSignal`); both happen under the same lock the thread checks before entering, so a
/// command is never missed.
final class VCPUControl: @unchecked Sendable {
    enum Command { case run, pause, exit }

    /// The signal that interrupts `KVM_RUN`; its handler does nothing, the interruption is the point.
    static let kickSignal = SIGUSR1

    private let condition = NSCondition()
    private let count: Int
    // Guarded by `condition`:
    private var command: Command = .run
    private var state: Machine.State = .created
    private var parked = 0
    private var running = 0
    private var threads: [UInt32: pthread_t] = [:]
    private var vcpus: [KVMVCPU] = []

    init(count: Int) {
        self.count = count
    }

    /// Hands over the vCPUs to control; called once, before any thread starts.
    func attach(_ vcpus: [KVMVCPU]) {
        condition.lock()
        self.vcpus = vcpus
        condition.unlock()
    }

    static func installKickSignalHandler() {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0   // no SA_RESTART: KVM_RUN must return EINTR
        sigaction(kickSignal, &action, nil)
    }

    var machineState: Machine.State {
        condition.lock()
        defer { condition.unlock() }
        return state
    }

    /// Moves the machine's state, refusing transitions that do not start from one of `allowed`.
    func transition(from allowed: Set<Machine.State>, to next: Machine.State) throws {
        condition.lock()
        defer { condition.unlock() }
        guard allowed.contains(state) else {
            throw MachineError("the VM is \(state.rawValue); it must be \(allowed.map(\.rawValue).sorted().joined(separator: " or ")) to become \(next.rawValue)")
        }
        state = next
    }

    /// Registers the calling thread as `vcpu`'s, so that kicks reach it. Threads inherit their
    /// creator's signal mask, and the creator may be a pool thread that blocks signals, so the
    /// kick signal is unblocked here explicitly.
    func threadStarted(_ vcpu: KVMVCPU) {
        var kickOnly = sigset_t()
        sigemptyset(&kickOnly)
        sigaddset(&kickOnly, Self.kickSignal)
        pthread_sigmask(SIG_UNBLOCK, &kickOnly, nil)
        condition.lock()
        running += 1
        threads[vcpu.id] = pthread_self()
        condition.unlock()
    }

    /// Unregisters the calling vCPU thread: a thread that has ended must never be signalled.
    func threadExited(_ vcpu: KVMVCPU) {
        condition.lock()
        running -= 1
        threads[vcpu.id] = nil
        condition.broadcast()
        condition.unlock()
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused, returns false on exit.
    /// On a pause, `beforeParking` runs first, without the lock, so that the vCPU counts as parked
    /// (and its state may be saved) only once it is done.
    func waitUntilRunnable(_ vcpu: KVMVCPU, beforeParking: () -> Void) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        var isParked = false
        while command == .pause {
            if !isParked {
                condition.unlock()
                beforeParking()
                condition.lock()
                guard command == .pause else { break }
                isParked = true
                parked += 1
                condition.broadcast()
            }
            condition.wait()
        }
        if isParked { parked -= 1 }
        guard command == .run else { return false }
        vcpu.setImmediateExit(false)
        return true
    }

    /// Runs `body` while the machine is in `required` state, holding the lock so that no
    /// transition can happen meanwhile; refuses, naming the current state, otherwise.
    func whileIn<T>(_ required: Machine.State, to operation: String, _ body: () throws -> T) throws -> T {
        condition.lock()
        defer { condition.unlock() }
        guard state == required else {
            throw MachineError("the VM is \(state.rawValue); it must be \(required.rawValue) to \(operation)")
        }
        return try body()
    }

    /// Takes every vCPU out of `KVM_RUN`; called with the lock held.
    private func kickAll() {
        for vcpu in vcpus {
            vcpu.setImmediateExit(true)
            if let thread = threads[vcpu.id] { pthread_kill(thread, Self.kickSignal) }
        }
    }

    func pauseAll() {
        condition.lock()
        defer { condition.unlock() }
        guard command == .run else { return }
        command = .pause
        kickAll()
        while parked < running {
            condition.wait()
        }
    }

    func resumeAll() {
        condition.lock()
        if command == .pause { command = .run }
        condition.broadcast()
        condition.unlock()
    }

    /// Asks every vCPU thread to exit without waiting (safe from a vCPU thread itself).
    func requestExit() {
        condition.lock()
        command = .exit
        state = .stopped
        condition.broadcast()
        kickAll()
        condition.unlock()
    }

    /// Ends every vCPU thread and waits until all have exited or `timeout` has passed; returns
    /// whether all exited. (A vCPU inside a long emulated instruction on a nested host can take
    /// a while to notice the signal.)
    @discardableResult
    func exitAll(timeout: TimeInterval) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        command = .exit
        state = .stopped
        condition.broadcast()
        kickAll()
        let deadline = Date().addingTimeInterval(timeout)
        while running > 0 {
            if !condition.wait(until: deadline) { return running == 0 }
        }
        return true
    }
}
