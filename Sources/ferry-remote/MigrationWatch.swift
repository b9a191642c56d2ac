import APIModels
import Events
import FerryClient
import Foundation
import HostOS

/// How a followed migration ended, from its terminal event (docs/events.md §4).
enum MigrationEnding: Sendable {
    case finished(VMEvent.MigrationFinished)
    case failed(error: String, phase: String)
    case cancelled(reason: String)
    /// The source VMM went away before saying how the migration ended.
    case unknown(String)

    init?(_ event: Event) {
        if let finished = try? event.decode(VMEvent.MigrationFinished.self) {
            self = .finished(finished)
        } else if let failed = try? event.decode(VMEvent.MigrationFailed.self) {
            self = .failed(error: failed.error, phase: failed.phase.rawValue)
        } else if let cancelled = try? event.decode(VMEvent.MigrationCancelled.self) {
            self = .cancelled(reason: cancelled.reason.rawValue)
        } else {
            return nil
        }
    }

    /// The ending a progress report shows, if the migration has ended: for when the events are
    /// lost. Its byte count is page data only, without the state.
    init?(_ progress: MigrationProgressReport) {
        switch progress.state {
        case .ongoing: return nil
        case .finished:
            let info = progress.memory_transmission_info
            self = .finished(VMEvent.MigrationFinished(
                migrationID: progress.migration_id ?? "?", totalMs: Int64(progress.total_ms ?? 0),
                downtimeMs: Int64(progress.downtime_ms ?? 0), bytesTotal: info.memory_bytes_transmitted,
                iterations: info.memory_iteration + 1))
        case let .failed(message): self = .failed(error: message, phase: "see vm.migration-progress")
        case .cancelled: self = .cancelled(reason: "see vm.migration-progress")
        }
    }

    var succeeded: Bool {
        if case .finished = self { true } else { false }
    }
}

/// Follows one outgoing migration from `vm.send-migration` to its terminal event: the events say
/// where passes end and how the migration ended; `vm.migration-progress`, polled, gives the live
/// numbers in between.
///
/// The event subscription is made before the request, so no event of this migration is missed.
/// After `vm.migration-finished` the source VMM exits (unless asked to stay), taking the event
/// stream and the API with it; by then the outcome is known, so that is no error.
struct MigrationWatch {
    let client: APIClient
    /// Print the migration's events as NDJSON instead of the progress line and summary.
    let json: Bool
    /// How often the live line is refreshed from `vm.migration-progress`.
    static let pollInterval: Duration = .milliseconds(200)

    /// Starts the migration with `request` (a `SendMigrationData` body) and reports it until it
    /// ends. A refused request is reported and thrown as `ExitCode.failure`.
    func follow(starting request: Data) async throws -> MigrationEnding {
        var subscription: AsyncThrowingStream<Data, any Error>?
        try await perform {
            subscription = try await self.client.events(sinceStart: false)
            try await self.client.send(.vmSendMigration, body: request)
        }
        guard let events = subscription else { return .unknown("no event stream") }
        let display = ProgressDisplay(live: !json && isatty(STDOUT_FILENO) == 1, quiet: json)
        let (client, json) = (self.client, self.json)
        var ending = await withTaskGroup(of: MigrationEnding?.self) { group in
            group.addTask { await Self.readEvents(events, display: display, json: json) }
            if display.live {
                group.addTask {
                    while !Task.isCancelled {
                        if let progress = await Self.progress(client) { await display.show(progress) }
                        try? await Task.sleep(for: Self.pollInterval)
                    }
                    return nil
                }
            }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first ?? .unknown("no event stream")
        }
        if case .unknown = ending, let ended = await endingFromProgress() { ending = ended }
        await display.end()
        report(ending)
        return ending
    }

    static func progress(_ client: APIClient) async -> MigrationProgressReport? {
        guard let data = try? await client.send(.vmMigrationProgress) else { return nil }
        return try? JSONDecoder().decode(MigrationProgressReport.self, from: data)
    }

    /// Without events (a subscriber that fell behind is disconnected), the outcome can still be
    /// read from `vm.migration-progress` while the VMM answers: polled until the migration ended.
    private func endingFromProgress() async -> MigrationEnding? {
        while let progress = await Self.progress(client), progress.direction == .outgoing {
            if let ending = MigrationEnding(progress) { return ending }
            try? await Task.sleep(for: Self.pollInterval)
        }
        return nil
    }

    /// Reads events until this migration's terminal event; the migration is the one the first
    /// `vm.migration-started` names. Returns `.unknown` if the stream ends first.
    static func readEvents(_ events: AsyncThrowingStream<Data, any Error>, display: ProgressDisplay,
                           json: Bool) async -> MigrationEnding {
        var migrationID: String?
        do {
            for try await line in events {
                guard let event = try? EventReader.event(json: line) else { continue }
                if migrationID == nil, let started = try? event.decode(VMEvent.MigrationStarted.self) { migrationID = started.migrationID }
                guard migrationID != nil else { continue }
                if let id = event.properties?["migration_id"], id != migrationID { continue }
                if json { printLine(String(decoding: line, as: UTF8.self)) }
                if let ending = MigrationEnding(event) { return ending }
                await display.note(event)
            }
            return .unknown("the VMM's event stream ended before the migration did")
        } catch {
            return .unknown("the VMM's event stream broke off before the migration ended: \(error)")
        }
    }

    private func report(_ ending: MigrationEnding) {
        switch ending {
        case let .finished(totals):
            if json { return }
            let passes = totals.iterations
            printLine("migration \(totals.migrationID) finished in \(Human.milliseconds(UInt64(totals.totalMs))): "
                      + "downtime \(Human.milliseconds(UInt64(totals.downtimeMs))), \(Human.bytes(totals.bytesTotal)) sent "
                      + "in \(passes) pre-copy pass\(passes == 1 ? "" : "es") and the final copy")
        case let .failed(error, phase):
            printError("migration failed (\(phase)): \(error); the guest runs on the source")
        case let .cancelled(reason):
            printError("migration cancelled (\(reason == "timeout" ? "--timeout-s reached" : reason)); the guest runs on the source")
        case let .unknown(message):
            printError("\(message); its outcome is unknown (see the destination)")
        }
    }
}

/// The progress output of `send-migration`. On a terminal: one line, rewritten in place from each
/// progress report. Otherwise: one line per finished pass and one at the switch-over.
actor ProgressDisplay {
    /// Rewrite one line in place (standard output is a terminal).
    let live: Bool
    /// Print nothing (`--json` prints the events instead).
    let quiet: Bool
    private var lineShown = false
    private var ended = false
    private let began = ContinuousClock.now

    init(live: Bool, quiet: Bool) {
        self.live = live
        self.quiet = quiet
    }

    /// A progress report: rewrites the live line.
    func show(_ progress: MigrationProgressReport) {
        guard live, !quiet, !ended, case let .ongoing(phase, _) = progress.state else { return }
        let info = progress.memory_transmission_info
        let elapsed = Human.seconds(ContinuousClock.now - began)
        let expected = progress.downtime_estimated_ms > 0 ? Human.milliseconds(progress.downtime_estimated_ms) : "-"
        let text = switch phase {
        case .starting:
            "[\(elapsed)] starting"
        case .memoryPrecopy:
            "[\(elapsed)] pass \(info.memory_iteration): sent \(Human.bytes(info.memory_bytes_transmitted)), "
                + "\(Human.bytes(info.memory_bytes_remaining_iteration)) left in pass, \(Human.rate(info.memory_transmission_bps)), "
                + "expected downtime \(expected)"
        case .completing:
            "[\(elapsed)] switch-over after \(info.memory_iteration) passes: sent \(Human.bytes(info.memory_bytes_transmitted)), "
                + "\(Human.bytes(info.memory_bytes_remaining_iteration)) left, expected downtime \(expected)"
        }
        FileHandle.standardOutput.write(Data((Self.clearLine + text).utf8))
        lineShown = true
    }

    /// An event of the migration: its start gets a line; without a live line, so do pass ends
    /// and the switch-over.
    func note(_ event: Event) {
        guard !quiet, !ended else { return }
        let elapsed = Human.seconds(ContinuousClock.now - began)
        if let started = try? event.decode(VMEvent.MigrationStarted.self) {
            clear()
            printLine("[\(elapsed)] migration \(started.migrationID) to \(started.destinationURL) started "
                      + "(downtime limit \(started.downtimeMs) ms)")
        } else if !live, let pass = try? event.decode(VMEvent.MigrationMemoryIteration.self) {
            printLine("[\(elapsed)] pass \(pass.id): sent \(Human.bytes(pass.bytes)) in "
                      + "\(Human.milliseconds(UInt64(pass.durationMs))) at \(Human.rate(pass.bandwidthBytesPerS)), "
                      + "\(Human.bytes(pass.remainingBytes)) dirtied meanwhile, "
                      + "expected downtime \(pass.estimatedDowntimeMs) ms")
        } else if !live, let downtime = try? event.decode(VMEvent.MigrationDowntime.self) {
            printLine("[\(elapsed)] switch-over: pausing the guest to send the last \(Human.bytes(downtime.remainingBytes)) "
                      + "(expected downtime \(downtime.estimatedDowntimeMs) ms)")
        }
    }

    /// The migration ended: the live line is cleared and nothing more is drawn.
    func end() {
        clear()
        ended = true
    }

    private func clear() {
        if lineShown { FileHandle.standardOutput.write(Data(Self.clearLine.utf8)) }
        lineShown = false
    }

    /// Carriage return, then erase to the end of the line (ANSI `EL`).
    static let clearLine = "\r\u{1B}[K"
}

func printError(_ text: String) {
    FileHandle.standardError.write(Data("ferry-remote: \(text)\n".utf8))
}
