import Dispatch
import Events
import Foundation
import Logging
import Machine
import Synchronization

/// The VMM core: owns the one VM, drives its lifecycle and reports every edge as an event.
public final class VirtualMachineMonitor: Sendable {
    /// Ferry's version, as `vmm.starting` and `vmm.ping` report it.
    public static let version = "0.1.0"

    /// How the VMM's run ended, and the process exit status that goes with it.
    public enum Outcome: Equatable, Sendable {
        case guestShutdown
        case signalled(Int32)
        case failed(String)

        public var exitStatus: Int32 {
            switch self {
            case .guestShutdown, .signalled: 0
            case .failed: 1
            }
        }
    }

    public let events: EventMonitor
    private let logger: Logger
    private let outcome = Mutex<Outcome?>(nil)
    private let finished = DispatchSemaphore(value: 0)

    public init(events: EventMonitor, logger: Logger) {
        self.events = events
        self.logger = logger
        events.emitStarting(version: Self.version)
    }

    /// Records the first outcome and wakes `run`.
    private func finish(_ result: Outcome) {
        let first = outcome.withLock { current in
            guard current == nil else { return false }
            current = result
            return true
        }
        if first { finished.signal() }
    }

    /// Creates and boots the VM, then runs until the guest stops, a signal arrives, or the VM fails.
    /// Emits `vm.booting`, `vm.booted`, `vm.shutdown` and `vmm.shutdown`, and closes the event monitor.
    public func run(_ configuration: VMConfiguration) -> Outcome {
        let signalSources = [SIGTERM, SIGINT].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler { [self] in finish(.signalled(number)) }
            source.resume()
            return source
        }
        defer { signalSources.forEach { $0.cancel() } }

        var machine: Machine?
        var console: HostConsole?
        do {
            console = try HostConsole(mode: configuration.serial)
            events.emit(.vm, "booting")
            let booted = try Machine(configuration: configuration.machine, serialOutput: console?.output,
                                     onStop: { [self] stop in
                                         switch stop {
                                         case .guest: finish(.guestShutdown)
                                         case let .failed(message): finish(.failed(message))
                                         case .requested: break
                                         }
                                     })
            machine = booted
            try booted.start()
            events.emit(.vm, "booted")
            console?.forwardInput(to: booted)
            logger.info("VM booted", metadata: ["cpus": "\(configuration.machine.cpus)",
                                                "memory": "\(configuration.machine.memorySize >> 20) MiB"])
        } catch {
            finish(.failed("\(error)"))
        }

        finished.wait()
        let result = outcome.withLock { $0 } ?? .failed("no outcome")
        if let machine, !machine.stop() {
            logger.warning("a vCPU did not stop within the grace period; exiting without it")
        }
        console?.restore()
        if machine != nil {
            switch result {
            case .guestShutdown:
                events.emit(.vm, "shutdown", ["reason": "guest"])
            case .signalled:
                events.emit(.vm, "shutdown", ["reason": "api"])
            case let .failed(message):
                events.emit(.vm, "shutdown", ["reason": "guest", "error": message])
            }
        }
        events.emit(.vmm, "shutdown")
        events.close()
        return result
    }
}
