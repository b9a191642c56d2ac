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

    init(count: Int) {
        self.count = count
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

    func threadStarted() {
        condition.lock()
        running += 1
        condition.unlock()
    }

    func threadExited() {
        condition.lock()
        running -= 1
        condition.broadcast()
        condition.unlock()
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused, returns false on exit.
    func waitUntilRunnable(_ vcpu: KVMVCPU) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        threads[vcpu.id] = pthread_self()
        var isParked = false
        while command == .pause {
            if !isParked {
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

    private func kick(_ vcpus: [KVMVCPU]) {
        for vcpu in vcpus {
            vcpu.setImmediateExit(true)
            if let thread = threads[vcpu.id] { pthread_kill(thread, Self.kickSignal) }
        }
    }

    func pauseAll(_ vcpus: [KVMVCPU]) {
        condition.lock()
        defer { condition.unlock() }
        guard command == .run else { return }
        command = .pause
        kick(vcpus)
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
        condition.unlock()
    }

    /// Ends every vCPU thread and waits until all have exited.
    func exitAll(_ vcpus: [KVMVCPU]) {
        condition.lock()
        defer { condition.unlock() }
        command = .exit
        state = .stopped
        condition.broadcast()
        kick(vcpus)
        while running > 0 {
            condition.wait()
        }
    }
}
