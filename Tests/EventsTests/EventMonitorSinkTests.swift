@testable import Events
import FerryTestSupport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Event monitor sinks", .timeLimit(.minutes(2)))
struct EventMonitorSinkTests {
    @Test func pathCreatesATruncatedRegularFileWithEveryEventInOrder() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/vm.events"
            try Data(repeating: UInt8(ascii: "x"), count: 100_000).write(to: URL(fileURLWithPath: path))

            let monitor = EventMonitor(sink: .path(path))
            for index in 0..<100 {
                monitor.emit(.vm, "step", ["index": String(index)])
            }
            monitor.close()

            let events = try parseEventStream(Array(try Data(contentsOf: URL(fileURLWithPath: path))))
            #expect(events.map(\.name) == Array(repeating: "step", count: 100))
            #expect(events.map { $0.properties?["index"] } == (0..<100).map { String($0) })
            #expect(isNonDecreasing(events.map(\.timestamp)))
            var status = stat()
            #expect(stat(path, &status) == 0)
            #expect(status.st_mode & S_IFMT == S_IFREG)
            #expect(status.st_mode & 0o777 & ~0o644 == 0)
            #expect(monitor.statistics.written == 100)
        }
    }

    @Test func concurrentEmittersProduceNonDecreasingTimestamps() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/vm.events"
            // A queue that holds every event: this test is about order, not overflow.
            let monitor = EventMonitor(sink: .path(path), queueCapacity: 10_000)
            let threads = 4
            let perThread = 500
            await withTaskGroup(of: Void.self) { group in
                for thread in 0..<threads {
                    group.addTask {
                        await onThread {
                            for index in 0..<perThread {
                                monitor.emit(.vm, "thread-\(thread)", ["index": String(index)])
                            }
                        }
                    }
                }
            }
            monitor.close()

            let events = try parseEventStream(Array(try Data(contentsOf: URL(fileURLWithPath: path))))
            #expect(events.count == threads * perThread)
            #expect(isNonDecreasing(events.map(\.timestamp)))
            for thread in 0..<threads {
                let indices = events.filter { $0.name == "thread-\(thread)" }.map { $0.properties?["index"] }
                #expect(indices == (0..<perThread).map { String($0) })
            }
        }
    }

    @Test func inheritedDescriptorGetsTheEventsAndIsClosedAtTheEnd() async throws {
        var ends: [Int32] = [0, 0]
        try #require(pipe(&ends) == 0)
        let (readEnd, writeEnd) = (ends[0], ends[1])
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }   // not inherited by processes other tests start
        defer { close(readEnd) }

        let monitor = EventMonitor(sink: .fileDescriptor(writeEnd))
        monitor.emit(.vm, "booting")
        monitor.emit(.vm, "booted")
        monitor.close()

        // End of file proves the monitor closed its (only) write end.
        let events = try parseEventStream(await BackgroundReader { readToEnd(readEnd) }.bytes())
        #expect(events.map(\.name) == ["booting", "booted"])
        #expect(events.allSatisfy { $0.source == .vm && $0.properties == nil })
    }

    @Test func aFIFOReaderThatOpensAfterTheEventsStillGetsThem() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/vm.fifo"
            try #require(mkfifo(path, 0o600) == 0)
            let monitor = EventMonitor(sink: .path(path))
            monitor.emitStarting(version: "test")
            monitor.emit(.vm, "booting")
            monitor.emit(.vm, "booted")
            #expect(monitor.statistics.written == 0)

            // Opening a FIFO for reading waits until a writer opens it too.
            let reader = BackgroundReader {
                let descriptor = open(path, O_RDONLY)
                guard descriptor >= 0 else { return [] }
                defer { close(descriptor) }
                return readToEnd(descriptor)
            }
            var deliveryError: (any Error)?
            do {
                try await waitUntil { monitor.statistics.written == 3 }
            } catch {
                deliveryError = error
            }
            monitor.close()
            // Releases the reader's open if the monitor never opened the FIFO (a failure).
            let writer = open(path, O_WRONLY | O_NONBLOCK)
            if writer >= 0 { close(writer) }

            let events = try parseEventStream(await reader.bytes())
            if let deliveryError { throw deliveryError }
            #expect(events.map(\.name) == ["starting", "booting", "booted"])
        }
    }

    @Test func aStalledFIFOReaderNeverSlowsEmitAndLearnsHowManyEventsWereDropped() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/vm.fifo"
            try #require(mkfifo(path, 0o600) == 0)
            // The reader opens the FIFO but reads nothing until every event was emitted.
            let reader = open(path, O_RDONLY | O_NONBLOCK)
            try #require(reader >= 0)
            defer { close(reader) }

            let monitor = EventMonitor(sink: .path(path))
            let total = 20_000
            let payload = String(repeating: "p", count: 1_000)
            for index in 0..<total {
                monitor.emit(.vm, "tick", ["index": String(index), "payload": payload])
            }
            // Every emit returned while the pipe (64 KiB) was full and nobody read it.
            let whileStalled = monitor.statistics
            #expect(whileStalled.emitted == total)
            #expect(whileStalled.dropped > 0)
            // Once the writer has written it holds the FIFO open until close, so the end of
            // file the reader sees below means that close closed it.
            try await waitUntil { unreadBytes(reader) > 0 }
            let flags = fcntl(reader, F_GETFL)
            try #require(fcntl(reader, F_SETFL, flags & ~O_NONBLOCK) == 0)
            let background = BackgroundReader { readToEnd(reader) }
            monitor.close(timeout: .seconds(30))
            let events = try parseEventStream(await background.bytes())

            let notices = events.filter { $0.name == "events-dropped" }
            let delivered = events.filter { $0.name == "tick" }
            #expect(!notices.isEmpty)
            #expect(notices.allSatisfy { $0.source == .vmm && $0.properties?.keys.sorted() == ["count"] })
            let droppedCount = notices.compactMap { $0.properties?["count"].flatMap { Int($0) } }.reduce(0, +)
            #expect(droppedCount + delivered.count == total)
            #expect(isNonDecreasing(events.map(\.timestamp)))
            let indices = delivered.compactMap { $0.properties?["index"].flatMap { Int($0) } }
            #expect(indices == indices.sorted() && Set(indices).count == indices.count)
            #expect(delivered.allSatisfy { $0.properties?["payload"] == payload })
            let statistics = monitor.statistics
            #expect(statistics.dropped == droppedCount)
            #expect(statistics.written == events.count)
            #expect(statistics.discarded == 0)
        }
    }

    @Test func aFIFOReaderThatGoesAwayCausesWriteErrorsNotACrash() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/vm.fifo"
            try #require(mkfifo(path, 0o600) == 0)
            let reader = open(path, O_RDONLY | O_NONBLOCK)
            try #require(reader >= 0)

            let monitor = EventMonitor(sink: .path(path))
            monitor.emit(.vm, "booted")
            try await waitUntil { monitor.statistics.written == 1 }
            close(reader)
            for _ in 0..<10 { monitor.emit(.vm, "paused") }
            monitor.close()

            let statistics = monitor.statistics
            #expect(statistics.failedWrites == 10)
            #expect(statistics.lastSinkError?.errno == EPIPE)
        }
    }

    @Test func closeGivesUpOnAFIFOThatNobodyOpens() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/vm.fifo"
            try #require(mkfifo(path, 0o600) == 0)
            let monitor = EventMonitor(sink: .path(path))
            for _ in 0..<5 { monitor.emit(.vm, "booting") }
            monitor.close(timeout: .milliseconds(100))

            let statistics = monitor.statistics
            #expect(statistics.written == 0)
            #expect(statistics.discarded == 5)
            #expect(statistics.lastSinkError?.kind == .sinkFailed)
        }
    }

    @Test func aSinkThatCannotBeOpenedIsReportedAndSubscribersStillWork() async throws {
        try await withTemporaryDirectory { directory in
            let monitor = EventMonitor(sink: .path(directory + "/missing/vm.events"))
            let subscriber = monitor.subscribe(sinceStart: false)
            monitor.emit(.vm, "booting")
            try await waitUntil { monitor.statistics.lastSinkError != nil }
            monitor.emit(.vm, "booted")
            monitor.close()

            #expect(monitor.statistics.lastSinkError?.errno == ENOENT)
            #expect(await collect(subscriber).map(\.name) == ["booting", "booted"])
        }
    }

    @Test func closeIsIdempotentAndLaterEventsAreIgnored() async throws {
        try await withTemporaryDirectory { directory in
            let path = directory + "/vm.events"
            let monitor = EventMonitor(sink: .path(path))
            monitor.emit(.vmm, "shutdown")
            monitor.close()
            monitor.close()
            monitor.emit(.vm, "too-late")

            let events = try parseEventStream(Array(try Data(contentsOf: URL(fileURLWithPath: path))))
            #expect(events.map(\.name) == ["shutdown"])
            #expect(monitor.statistics.emitted == 1)
        }
    }
}

/// How many bytes wait in a pipe to be read (`FIONREAD`).
private func unreadBytes(_ descriptor: Int32) -> Int32 {
    var count: Int32 = 0
    return ioctl(descriptor, UInt(FIONREAD), &count) == 0 ? count : -1
}
