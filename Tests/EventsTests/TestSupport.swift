import Events
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A directory under the system's temporary directory, removed with everything in it when `body`
/// returns or throws.
func withTemporaryDirectory<Result>(_ body: (String) async throws -> Result) async throws -> Result {
    var template = Array((NSTemporaryDirectory() + "/ferry-events-tests.XXXXXX").utf8CString)
    let created = template.withUnsafeMutableBufferPointer { buffer in
        buffer.baseAddress.flatMap { mkdtemp($0) }.map { String(cString: $0) }
    }
    guard let path = created else { throw TestFailure("mkdtemp failed: errno \(errno)") }
    defer { try? FileManager.default.removeItem(atPath: path) }
    return try await body(path)
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// Runs blocking `body` on its own OS thread, keeping the Swift concurrency pool free.
func onThread<Result: Sendable>(_ body: @escaping @Sendable () -> Result) async -> Result {
    await withCheckedContinuation { continuation in
        Thread { continuation.resume(returning: body()) }.start()
    }
}

/// Collects bytes on its own OS thread, started at once (not on the Swift concurrency pool, which a
/// test may keep busy with a blocking call such as `EventMonitor.close`).
final class BackgroundReader: Sendable {
    private let finished = DispatchSemaphore(value: 0)
    private let data = Mutex<[UInt8]>([])

    init(_ read: @escaping @Sendable () -> [UInt8]) {
        Thread { [self] in
            let bytes = read()
            data.withLock { $0 = bytes }
            finished.signal()
        }.start()
    }

    /// The bytes, once the reading is done.
    func bytes() async -> [UInt8] {
        await onThread {
            self.finished.wait()
            return self.data.withLock { $0 }
        }
    }
}

/// Reads `descriptor` (blocking) until end of file.
func readToEnd(_ descriptor: Int32) -> [UInt8] {
    var data: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = buffer.withUnsafeMutableBytes { read(descriptor, $0.baseAddress, $0.count) }
        if count > 0 {
            data.append(contentsOf: buffer[..<count])
        } else if count == 0 || errno != EINTR {
            return data
        }
    }
}

/// Polls `condition` until it holds or `timeout` passes.
func waitUntil(timeout: Duration = .seconds(10), _ condition: () -> Bool) async throws {
    let deadline = ContinuousClock.now + timeout
    while !condition() {
        guard ContinuousClock.now < deadline else { throw TestFailure("condition not met within \(timeout)") }
        try await Task.sleep(for: .milliseconds(5))
    }
}

/// One event as a reader parses it back.
struct ParsedEvent: Equatable {
    var seconds: Int
    var nanoseconds: Int
    var source: String
    var name: String
    var properties: [String: String]?

    var timestamp: Duration { .seconds(seconds) + .nanoseconds(nanoseconds) }

    init(json: [UInt8]) throws {
        guard let object = try JSONSerialization.jsonObject(with: Data(json)) as? [String: Any],
              let timestamp = object["timestamp"] as? [String: Any],
              let seconds = timestamp["secs"] as? Int,
              let nanoseconds = timestamp["nanos"] as? Int,
              let source = object["source"] as? String,
              let name = object["event"] as? String,
              let properties = object["properties"]
        else { throw TestFailure("not an event: \(String(decoding: json, as: UTF8.self))") }
        self.seconds = seconds
        self.nanoseconds = nanoseconds
        self.source = source
        self.name = name
        if properties is NSNull {
            self.properties = nil
        } else if let properties = properties as? [String: String] {
            self.properties = properties
        } else {
            throw TestFailure("properties are neither null nor strings: \(properties)")
        }
    }
}

/// Splits a Cloud Hypervisor event stream at its blank lines and parses every event; throws unless
/// the stream consists of whole events only.
func parseEventStream(_ bytes: [UInt8]) throws -> [ParsedEvent] {
    guard !bytes.isEmpty else { return [] }
    guard bytes.suffix(2) == [0x0A, 0x0A] else { throw TestFailure("stream does not end with a blank line") }
    var events: [ParsedEvent] = []
    var start = 0
    var index = 0
    while index + 1 < bytes.count {
        if bytes[index] == 0x0A && bytes[index + 1] == 0x0A {
            events.append(try ParsedEvent(json: Array(bytes[start..<index])))
            index += 2
            start = index
        } else {
            index += 1
        }
    }
    return events
}

func isNonDecreasing(_ timestamps: [Duration]) -> Bool {
    zip(timestamps, timestamps.dropFirst()).allSatisfy { $0 <= $1 }
}

func collect(_ stream: AsyncStream<Event>) async -> [Event] {
    var events: [Event] = []
    for await event in stream { events.append(event) }
    return events
}
