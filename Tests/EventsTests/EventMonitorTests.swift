@testable import Events
import FerryTestSupport
import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Event monitor", .timeLimit(.minutes(1)))
struct EventMonitorTests {
    @Test func emitStartingCarriesVersionPidAndTheWallClockAtTimestampZero() async throws {
        let before = Date()
        let monitor = EventMonitor(sink: nil)
        monitor.emitStarting(version: "1.2.3")
        let after = Date()
        monitor.close()

        let events = await collect(monitor.subscribe(sinceStart: true))
        let starting = try #require(events.first)
        #expect(events.count == 1)
        #expect(starting.source == .vmm && starting.name == "starting")
        let properties = try #require(starting.properties)
        #expect(properties.keys.sorted() == ["pid", "version", "wall_clock"])
        #expect(properties["version"] == "1.2.3")
        #expect(properties["pid"] == String(getpid()))

        let wallClock = try #require(properties["wall_clock"])
        #expect(wallClock.wholeMatch(of: /\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z/) != nil)
        let withoutFraction = wallClock.replacing(/\.\d+Z$/, with: "Z")
        let fractionDigits = String(wallClock.split(separator: ".").last?.dropLast() ?? "")
        let fraction = try #require(Double("0." + fractionDigits))
        let parsed = try #require(ISO8601DateFormatter().date(from: withoutFraction)).addingTimeInterval(fraction)
        #expect(parsed >= before.addingTimeInterval(-0.001) && parsed <= after.addingTimeInterval(0.001))
    }

    @Test func twoSubscribersGetTheSameEventsInOrder() async throws {
        let monitor = EventMonitor(sink: nil)
        let first = monitor.subscribe(sinceStart: false)
        let second = monitor.subscribe(sinceStart: false)
        for index in 0..<50 {
            monitor.emit(.vm, "step", ["index": String(index)])
        }
        monitor.close()

        let firstEvents = await collect(first)
        let secondEvents = await collect(second)
        #expect(firstEvents.map { $0.properties?["index"] } == (0..<50).map { String($0) })
        #expect(firstEvents == secondEvents)
        #expect(isNonDecreasing(firstEvents.map(\.timestamp)))
    }

    @Test func sinceStartReplaysTheHistoryBeforeNewEvents() async throws {
        let monitor = EventMonitor(sink: nil)
        monitor.emit(.vm, "booting")
        monitor.emit(.vm, "booted")
        let replaying = monitor.subscribe(sinceStart: true)
        let live = monitor.subscribe(sinceStart: false)
        monitor.emit(.vm, "pausing")
        monitor.close()

        #expect(await collect(replaying).map(\.name) == ["booting", "booted", "pausing"])
        #expect(await collect(live).map(\.name) == ["pausing"])
    }

    @Test func theHistoryKeepsOnlyTheMostRecentEvents() async throws {
        let monitor = EventMonitor(sink: nil, historyCapacity: 10)
        for index in 0..<15 { monitor.emit(.vm, "step", ["index": String(index)]) }
        monitor.close()

        let replayed = await collect(monitor.subscribe(sinceStart: true))
        #expect(replayed.map { $0.properties?["index"] } == (5..<15).map { String($0) })
    }

    @Test func aReplayLongerThanTheBufferLimitIsDeliveredWhole() async throws {
        let monitor = EventMonitor(sink: nil)
        for _ in 0..<100 { monitor.emit(.vm, "step") }
        let subscriber = monitor.subscribe(sinceStart: true, bufferLimit: 10)
        for _ in 0..<5 { monitor.emit(.vm, "later") }
        monitor.close()

        let events = await collect(subscriber)
        #expect(events.count == 105)
    }

    @Test func aSubscriberThatNeverReadsIsFinishedOnceOverItsLimitWhileTheMonitorKeepsWorking() async throws {
        let monitor = EventMonitor(sink: nil)
        let stalled = monitor.subscribe(sinceStart: false, bufferLimit: 8)
        let reading = monitor.subscribe(sinceStart: false, bufferLimit: 1_000)
        for index in 0..<20 {
            monitor.emit(.vm, "step", ["index": String(index)])
        }

        // Before close: the stalled stream already ended, after the events its buffer held.
        let stalledEvents = await collect(stalled)
        #expect(stalledEvents.map { $0.properties?["index"] } == (0..<8).map { String($0) })

        monitor.emit(.vm, "still-working")
        monitor.close()
        let readingEvents = await collect(reading)
        #expect(readingEvents.count == 21)
        #expect(readingEvents.last?.name == "still-working")
    }

    @Test func closeFinishesSubscribersAndLaterSubscriptionsEndAtOnce() async throws {
        let monitor = EventMonitor(sink: nil)
        let subscriber = monitor.subscribe(sinceStart: false)
        monitor.emit(.vm, "shutdown", ["reason": "api"])
        monitor.close()

        let events = await collect(subscriber)
        #expect(events.map(\.name) == ["shutdown"])
        #expect(events.first?.properties == ["reason": "api"])
        #expect(await collect(monitor.subscribe(sinceStart: false)).isEmpty)
    }

    @Test func aCancelledSubscriberDoesNotDisturbTheOthers() async throws {
        let monitor = EventMonitor(sink: nil)
        let reading = monitor.subscribe(sinceStart: false)
        let cancelled = Task {
            for await _ in monitor.subscribe(sinceStart: false) {}
        }
        cancelled.cancel()
        await cancelled.value
        for _ in 0..<3 { monitor.emit(.vm, "step") }
        monitor.close()
        #expect(await collect(reading).count == 3)
    }

    @Test func timestampsStartAtZeroAndFollowTheMonotonicClock() async throws {
        let monitor = EventMonitor(sink: nil)
        monitor.emit(.vm, "first")
        try await Task.sleep(for: .milliseconds(20))
        monitor.emit(.vm, "second")
        monitor.close()

        let events = await collect(monitor.subscribe(sinceStart: true))
        #expect(events.count == 2)
        #expect(events[0].timestamp >= .zero && events[0].timestamp < .seconds(5))
        #expect(events[1].timestamp - events[0].timestamp >= .milliseconds(20))
    }
}
