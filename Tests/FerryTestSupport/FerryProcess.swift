import Foundation
import Synchronization

/// Collects a pipe's output as lines, from the pipe's reader thread. Lines are split at LF bytes
/// (Linux's console ends lines with CR LF, which Swift strings treat as one character) and lose
/// a trailing CR.
public final class OutputCollector: Sendable {
    private let state = Mutex<(lines: [String], partial: [UInt8], ended: Bool)>(([], [], false))
    let changed = NSCondition()

    public init() {}

    public func attach(to pipe: Pipe) {
        pipe.fileHandleForReading.readabilityHandler = { [self] handle in
            let data = handle.availableData
            guard !data.isEmpty else {
                handle.readabilityHandler = nil
                state.withLock { $0.ended = true }
                changed.lock()
                changed.broadcast()
                changed.unlock()
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

    public var lines: [String] { state.withLock { $0.lines } }

    /// Waits until the pipe has delivered everything (its writer closed it), or `deadline`.
    func waitForEnd(until deadline: Date) {
        changed.lock()
        defer { changed.unlock() }
        while !state.withLock({ $0.ended }), changed.wait(until: deadline) {}
    }
    public var text: String { state.withLock { ($0.lines + [String(decoding: $0.partial, as: UTF8.self)]).joined(separator: "\n") } }
}

/// A `ferry` process under test (or any helper process): its console (standard output) and
/// standard error are collected line by line, and it is killed if a test ends while it still runs.
public final class FerryProcess: Sendable {
    private let process: Process
    private let console = OutputCollector()
    private let errors = OutputCollector()

    /// - Parameter standardInput: what the process reads (a terminal, for console tests); nothing by default.
    public init(arguments: [String], executable: URL = Repository.ferry, standardInput: FileHandle = .nullDevice) throws {
        process = Process()
        process.executableURL = executable
        process.arguments = arguments
        process.standardInput = standardInput
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

    public var consoleLines: [String] { console.lines }
    public var standardError: String { errors.text }
    public var pid: Int32 { process.processIdentifier }

    /// The names of the process's threads now, from `/proc/PID/task/*/comm` (where libvirt and
    /// `top -H` read them).
    public var threadNames: [String] {
        let tasks = "/proc/\(pid)/task"
        return ((try? FileManager.default.contentsOfDirectory(atPath: tasks)) ?? []).compactMap { task in
            (try? String(contentsOfFile: "\(tasks)/\(task)/comm", encoding: .utf8))?.trimmingCharacters(in: .newlines)
        }
    }

    /// Waits until the console has a line for which `predicate` holds; returns it, or nil when the
    /// deadline passes or the process has exited without printing one.
    public func waitForConsoleLine(timeout: Duration, where predicate: (String) -> Bool) -> String? {
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
    public func waitForExit(timeout: Duration) -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while process.isRunning {
            if ContinuousClock.now >= deadline { return nil }
            usleep(20_000)
        }
        process.waitUntilExit()
        // The last output may still be in the pipe: what the process printed is there on return.
        let drained = Date().addingTimeInterval(5)
        console.waitForEnd(until: drained)
        errors.waitForEnd(until: drained)
        return process.terminationStatus
    }

    /// Sends `number` to the process while it runs. Never after it ended: its pid may by then
    /// be another process's (pids wrap around at 32768 here, and the suites start thousands).
    public func signal(_ number: Int32) {
        guard process.isRunning else { return }
        kill(process.processIdentifier, number)
    }
}
