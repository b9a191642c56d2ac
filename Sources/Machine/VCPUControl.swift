import Foundation
import HostOS
import KVM

/// The machine's phase and the vCPU threads that follow it: one lock guards both, so every change
/// of phase and what the threads do about it happen in one critical section.
///
/// A vCPU thread only enters `KVM_RUN` while the phase is `running`. To take a vCPU out of a run in
/// progress, the controller sets the vCPU's `immediate_exit` flag and sends its thread a signal
/// (`kickSignal`); both happen under the lock the thread checks before entering, so no change of
/// phase is ever missed.
final class VCPUControl: @unchecked Sendable {
    /// The signal that interrupts `KVM_RUN`; its handler does nothing, the interruption is the point.
    static let kickSignal = SIGUSR1

    private let lock = ConditionLock()
    private let changed: ConditionLock.Condition
    // Guarded by `lock`:
    private var phase: Machine.Phase
    /// vCPU threads started and not yet exited.
    private var running = 0
    /// The vCPU threads have been started (by `start`, or earlier by `launchParked`).
    private var launched = false
    /// vCPU threads parked in a pause, their last exit finished.
    private var parked = 0
    private var threads: [UInt32: pthread_t] = [:]
    private let vcpus: [KVMVCPU]
    /// The share of time each vCPU is kept out of the guest (auto-converge), 0–99.
    private var throttlePercent = 0
    /// vCPUs the throttle's ticker has sent to sleep, until they have slept.
    private var throttleDue: Set<UInt32> = []
    private var tickerRunning = false

    init(vcpus: [KVMVCPU], phase: Machine.Phase) {
        self.vcpus = vcpus
        self.phase = phase
        changed = ConditionLock.Condition(lock)
    }

    static func installKickSignalHandler() {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0   // no SA_RESTART: KVM_RUN must return EINTR
        sigaction(kickSignal, &action, nil)
    }

    var currentPhase: Machine.Phase {
        lock.withLock { phase }
    }

    /// `ready` → `running`: `startDevices` first, then every vCPU counts as running and `launch`
    /// starts their threads, unless `launchParked` started them already: those are woken instead.
    func start(startDevices: () -> Void, launch: () -> Void) throws(MachineError) {
        try lock.withLock { () throws(MachineError) in try require(.ready, toBecome: .running) }
        startDevices()
        let needsLaunch = try lock.withLock { () throws(MachineError) -> Bool in
            try require(.ready, toBecome: .running)  // a stop may have come meanwhile
            phase = .running
            changed.broadcast()
            guard !launched else { return false }
            launched = true
            running = vcpus.count
            return true
        }
        if needsLaunch { launch() }
    }

    /// Before `start`, on a machine awaiting its state or ready: counts every vCPU as running and
    /// has `launch` start their threads, which wait (parked outside `KVM_RUN`) until `start` or a
    /// stop. What starting a thread costs is then paid before the guest's pause, not in it.
    func launchParked(_ launch: () -> Void) {
        let needsLaunch = lock.withLock { () -> Bool in
            guard !launched, phase == .awaitingState || phase == .ready else { return false }
            launched = true
            running = vcpus.count
            return true
        }
        if needsLaunch { launch() }
    }

    /// `running` → `paused`, once every vCPU thread has finished its last exit and parked.
    func pause() throws(MachineError) {
        try lock.withLock { () throws(MachineError) in
            try require(.running, toBecome: .paused)
            phase = .pausing
            changed.broadcast()  // a vCPU asleep under the throttle parks now
            kickAll()
            while phase == .pausing && parked < running {
                changed.wait()
            }
            guard phase == .pausing else {
                throw MachineError(.wrongPhase, "the VM became \(phase.rawValue) while it was pausing")
            }
            phase = .paused
        }
    }

    /// `paused` → `running`.
    func resume() throws(MachineError) {
        try lock.withLock { () throws(MachineError) in
            try require(.paused, toBecome: .running)
            phase = .running
            changed.broadcast()
        }
    }

    /// Runs `body` while the machine is in one of the `allowed` phases, holding the lock so that
    /// nothing else changes the phase meanwhile; `body` may move it on. Refuses, naming the phase,
    /// otherwise.
    func whileIn<T>(_ allowed: Machine.Phase..., to operation: String,
                    _ body: (inout Machine.Phase) throws(MachineError) -> T) throws(MachineError) -> T {
        try lock.withLock { () throws(MachineError) -> T in
            guard allowed.contains(phase) else {
                let names = allowed.map(\.rawValue).joined(separator: " or ")
                throw MachineError(.wrongPhase, "the VM is \(phase.rawValue); it must be \(names) to \(operation)")
            }
            return try body(&phase)
        }
    }

    private func require(_ required: Machine.Phase, toBecome next: Machine.Phase) throws(MachineError) {
        guard phase == required else {
            throw MachineError(.wrongPhase, "the VM is \(phase.rawValue); it must be \(required.rawValue) to become \(next.rawValue)")
        }
    }

    // MARK: The vCPU threads' side

    /// Registers the calling thread as `vcpu`'s, so that kicks reach it. Threads inherit their
    /// creator's signal mask, and the creator may be a pool thread that blocks signals, so the
    /// kick signal is unblocked here explicitly.
    func threadStarted(_ vcpu: KVMVCPU) {
        var kickOnly = sigset_t()
        sigemptyset(&kickOnly)
        sigaddset(&kickOnly, Self.kickSignal)
        pthread_sigmask(SIG_UNBLOCK, &kickOnly, nil)
        lock.withLock { threads[vcpu.id] = pthread_self() }
    }

    /// Unregisters the calling vCPU thread: a thread that has ended must never be signalled.
    func threadExited(_ vcpu: KVMVCPU) {
        lock.withLock {
            running -= 1
            threads[vcpu.id] = nil
            changed.broadcast()
        }
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while the machine is pausing or
    /// paused, sleeps its share when the throttle's ticker sent it; returns false once stopped.
    /// Before parking, `settle` runs without the lock, so that the vCPU counts as parked (and its
    /// state may be saved) only once it is done.
    func waitUntilRunnable(_ vcpu: KVMVCPU, settle: () -> Void) -> Bool {
        lock.withLock {
            // Launched early (`launchParked`): wait for `start`, or a stop.
            while phase == .awaitingState || phase == .ready { changed.wait() }
            while true {
                var isParked = false
                while phase == .pausing || phase == .paused {
                    if !isParked {
                        lock.withoutLock(settle)
                        guard phase == .pausing || phase == .paused else { break }
                        isParked = true
                        parked += 1
                        changed.broadcast()
                    }
                    changed.wait()
                }
                if isParked { parked -= 1 }
                guard phase == .running else { return false }
                if throttleDue.remove(vcpu.id) != nil, throttlePercent > 0 {
                    // Kept out of the guest for its share of the time slice; a pause or a stop
                    // ends the sleep at once and is handled above.
                    let deadline = ContinuousClock.now + Self.throttleSleep(percent: throttlePercent)
                    while phase == .running, throttlePercent > 0, changed.wait(until: deadline) {}
                    continue
                }
                vcpu.setImmediateExit(false)
                return true
            }
        }
    }

    // MARK: Throttling (auto-converge)

    /// The time a vCPU runs between two of the throttle's sleeps, as QEMU's CPU throttle
    /// (`throttleSleep` is in the same unit).
    static let throttleSlice: Duration = .milliseconds(10)

    /// How long a vCPU throttled to `percent` sleeps after each slice in the guest, so that it is
    /// out of the guest `percent` % of the time.
    static func throttleSleep(percent: Int) -> Duration {
        .nanoseconds(Int64(10_000_000 * Double(percent) / Double(100 - percent)))
    }

    /// The current throttle, 0 when the vCPUs run freely.
    var throttle: Int { lock.withLock { throttlePercent } }

    /// Keeps every vCPU out of the guest `percent` % of the time (0–99), from now until it is set
    /// back to 0 or the machine stops: a ticker thread takes each vCPU out of `KVM_RUN` after every
    /// slice, and the vCPU sleeps for its share before it goes back in.
    func setThrottle(_ percent: Int) {
        let startTicker = lock.withLock { () -> Bool in
            throttlePercent = min(max(percent, 0), 99)
            changed.broadcast()
            guard throttlePercent > 0, !tickerRunning, phase != .stopped else { return false }
            tickerRunning = true
            return true
        }
        guard startTicker else { return }
        startThread(named: "vcpu-throttle") { [self] in tick() }
    }

    /// The ticker: after each slice plus sleep, sends every running vCPU to its sleep; ends when
    /// the throttle is lifted or the machine stops.
    private func tick() {
        lock.withLock {
            defer { tickerRunning = false }
            while throttlePercent > 0, phase != .stopped {
                let period = Self.throttleSlice + Self.throttleSleep(percent: throttlePercent)
                let deadline = ContinuousClock.now + period
                while throttlePercent > 0, phase != .stopped, changed.wait(until: deadline) {}
                guard throttlePercent > 0, phase == .running else { continue }
                throttleDue.formUnion(vcpus.map(\.id))
                kickAll()
            }
            throttleDue.removeAll()
        }
    }

    /// Takes every vCPU out of `KVM_RUN`; called with the lock held.
    private func kickAll() {
        for vcpu in vcpus {
            vcpu.setImmediateExit(true)
            if let thread = threads[vcpu.id] { pthread_kill(thread, Self.kickSignal) }
        }
    }

    // MARK: Stopping

    /// Moves the machine to `stopped` and asks every vCPU thread to exit, without waiting (safe
    /// from a vCPU thread itself).
    func requestExit() {
        lock.withLock {
            phase = .stopped
            changed.broadcast()
            kickAll()
        }
    }

    /// Moves the machine to `stopped`, ends every vCPU thread and waits until all have exited or
    /// `timeout` has passed; returns whether all exited. (A vCPU inside a long emulated
    /// instruction on a nested host can take a while to notice the signal.)
    func exitAll(timeout: Duration) -> Bool {
        let deadline = ContinuousClock.now + timeout
        return lock.withLock {
            phase = .stopped
            changed.broadcast()
            kickAll()
            while running > 0 {
                if !changed.wait(until: deadline) { return running == 0 }
            }
            return true
        }
    }
}
