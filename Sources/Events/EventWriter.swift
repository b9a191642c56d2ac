#if canImport(Glibc)
import Glibc
#endif
import HostOS

/// The dedicated OS thread that opens the sink and writes queued events to it, so that no caller of
/// `EventMonitor.emit` ever waits for I/O (docs/events.md §2, guarantee 3). It never holds the monitor's lock
/// while it opens or writes.
final class EventWriter {
    private let core: MonitorCore
    private let target: EventSinkTarget

    private init(core: MonitorCore, target: EventSinkTarget) {
        self.core = core
        self.target = target
    }

    /// Starts the writer thread; throws if the thread cannot be created.
    static func start(core: MonitorCore, target: EventSinkTarget) throws(EventsError) {
        let context = Unmanaged.passRetained(EventWriter(core: core, target: target)).toOpaque()
        var thread = pthread_t()
        let result = pthread_create(&thread, nil, { context in
            guard let context else { return nil }
            Unmanaged<EventWriter>.fromOpaque(context).takeRetainedValue().run()
            return nil
        }, context)
        guard result == 0 else {
            Unmanaged<EventWriter>.fromOpaque(context).release()
            throw EventsError(.sinkFailed, "the event writer thread cannot start", cause: SystemError("pthread_create", errno: result))
        }
        pthread_detach(thread)
    }

    private func run() {
        Self.prepareThread()
        var report = WriterReport()
        let sink: EventSink
        do {
            guard let opened = try EventSink.open(target, patience: core.timeLeftBeforeGivingUp) else {
                report.lastError = EventsError(.sinkFailed, "event monitor \(target): no reader opened the FIFO before the monitor closed")
                core.writerDidStop(after: report)
                return
            }
            sink = opened
        } catch {
            report.lastError = error
            core.writerDidStop(after: report)
            return
        }

        writing: while let batch = core.nextBatch(after: &report) {
            for (index, event) in batch.enumerated() {
                switch sink.write(EventEncoding.cloudHypervisor(event), patience: core.timeLeftBeforeGivingUp) {
                case .written:
                    report.written += 1
                case .failed(let error):
                    // Typically EPIPE: the FIFO's reader went away. Keep going; a new reader may come.
                    report.failedWrites += 1
                    report.lastError = error
                case .abandoned:
                    report.discarded += batch.count - index
                    break writing
                }
                core.publish(&report)
            }
        }
        sink.close()
        core.writerDidStop(after: report)
    }

    /// Blocks SIGPIPE on this thread: a write to a FIFO whose reader went away then fails with EPIPE
    /// instead of killing the process, and the signal's disposition stays as it was for the rest of
    /// the process.
    private static func prepareThread() {
        var signals = sigset_t()
        sigemptyset(&signals)
        sigaddset(&signals, SIGPIPE)
        pthread_sigmask(SIG_BLOCK, &signals, nil)
    }
}
