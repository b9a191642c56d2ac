@testable import Events
import FerryTestSupport
import HostOS
import Foundation
import Synchronization
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Runs blocking `body` on its own OS thread, keeping the Swift concurrency pool free.
func onThread<Result: Sendable>(_ body: @escaping @Sendable () -> Result) async -> Result {
    await onOwnThread(named: "test", body)
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
    guard await FerryTestSupport.waitUntil(timeout, interval: .milliseconds(5), condition) else {
        throw TestFailure("condition not met within \(timeout)")
    }
}

/// Every event of a Cloud Hypervisor event stream, read with the event reader; throws unless the
/// stream consists of whole events only.
func parseEventStream(_ bytes: [UInt8]) throws -> [Event] {
    let (events, rest) = try EventReader.events(cloudHypervisorStream: bytes)
    guard rest.isEmpty else { throw TestFailure("the stream ends inside an event: \(String(decoding: rest, as: UTF8.self))") }
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
