import FerryTestSupport
import Foundation
import Synchronization

/// Collects a pipe's output as lines, from the pipe's reader thread. Lines are split at LF bytes
/// (Linux's console ends lines with CR LF, which Swift strings treat as one character) and lose
/// a trailing CR.
final class OutputCollector: Sendable {
    private let state = Mutex<(lines: [String], partial: [UInt8])>(([], []))
    let changed = NSCondition()

    func attach(to pipe: Pipe) {
        pipe.fileHandleForReading.readabilityHandler = { [self] handle in
            let data = handle.availableData
            guard !data.isEmpty else {
                handle.readabilityHandler = nil
                return
            }
            state.withLock { state in
                for byte in data {
                    if byte == UInt8(ascii: "\n") {
                        if state.partial.last == UInt8(ascii: "\r") { state.partial.removeLast() }
                        state.lines.append(String(decoding: state.partial, as: UTF8.self))
                        state.partial.removeAll(keepingCapacity: true)
                    } else {
                        state.partial.append(byte)
                    }
                }
            }
            changed.lock()
            changed.broadcast()
            changed.unlock()
        }
    }

    var lines: [String] { state.withLock { $0.lines } }
    var text: String { state.withLock { ($0.lines + [String(decoding: $0.partial, as: UTF8.self)]).joined(separator: "\n") } }
}

/// A `ferry` process under test: its console (standard output) and standard error are collected
/// line by line, and it is killed if a test ends while it still runs.
final class FerryProcess: Sendable {
    private let process: Process
    private let console = OutputCollector()
    private let errors = OutputCollector()

    init(arguments: [String], executable: URL = Repository.ferry) throws {
        process = Process()
        process.executableURL = executable
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        let stdout = Pipe()
        let stderr = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        console.attach(to: stdout)
        errors.attach(to: stderr)
        try process.run()
    }

    deinit {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    var consoleLines: [String] { console.lines }
    var standardError: String { errors.text }
    var pid: Int32 { process.processIdentifier }

    /// Waits until the console has a line for which `predicate` holds; returns it, or nil when the
    /// deadline passes or the process has exited without printing one.
    func waitForConsoleLine(timeout: Duration, where predicate: (String) -> Bool) -> String? {
        let deadline = ContinuousClock.now + timeout
        var exitedAt: ContinuousClock.Instant?
        while true {
            if let line = consoleLines.first(where: predicate) { return line }
            let now = ContinuousClock.now
            if now >= deadline { return nil }
            if !process.isRunning {
                // Give the pipe a moment to deliver the last output, then stop waiting.
                if let exitedAt, now - exitedAt > .milliseconds(500) { return nil }
                exitedAt = exitedAt ?? now
            }
            console.changed.lock()
            _ = console.changed.wait(until: Date().addingTimeInterval(0.1))
            console.changed.unlock()
        }
    }

    /// Waits for the process to exit; returns its status, or nil if it is still running at the deadline.
    func waitForExit(timeout: Duration) -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while process.isRunning {
            if ContinuousClock.now >= deadline { return nil }
            usleep(20_000)
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    func signal(_ number: Int32) {
        kill(process.processIdentifier, number)
    }
}

/// One event as read back from a Cloud Hypervisor-format event file.
struct RecordedEvent {
    var name: String           // "source.event"
    var properties: [String: String]
    var seconds: Double
}

enum EventFile {
    /// Parses an event monitor file: JSON objects separated by blank lines.
    static func read(_ path: String) throws -> [RecordedEvent] {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        return try text.components(separatedBy: "\n\n").filter { !$0.isEmpty }.map { chunk in
            let object = try JSONSerialization.jsonObject(with: Data(chunk.utf8)) as? [String: Any] ?? [:]
            let timestamp = object["timestamp"] as? [String: Any] ?? [:]
            let seconds = Double(timestamp["secs"] as? Int ?? 0) + Double(timestamp["nanos"] as? Int ?? 0) / 1e9
            return RecordedEvent(name: "\(object["source"] ?? "?").\(object["event"] ?? "?")",
                                 properties: object["properties"] as? [String: String] ?? [:], seconds: seconds)
        }
    }
}
