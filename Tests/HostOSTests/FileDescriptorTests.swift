import FerryTestSupport
import Foundation
import HostOS
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The owned descriptor: closed once, and a shutdown from another thread never reaches a
/// descriptor number that a concurrent close freed and the process reused.
@Suite struct FileDescriptorTests {
    static func socketPair() throws -> (FileDescriptor, FileDescriptor) { try ShutdownRace.socketPair() }
    static func carries(_ pair: (FileDescriptor, FileDescriptor)) -> Bool { ShutdownRace.carries(pair) }

    @Test func closeIsOnceAndShutdownAfterCloseTouchesNothing() throws {
        // The number is free after the close: the next socket takes it (lowest free descriptor),
        // unless a test running in parallel opened a descriptor in between; then try again.
        for _ in 0..<50 {
            let (first, second) = try Self.socketPair()
            let number = first.rawValue
            first.close()
            first.close()
            #expect(!first.isOpen)
            let reused = try Self.socketPair()
            guard reused.0.rawValue == number else { continue }
            // A late shutdown of the closed descriptor must not reach the new socket.
            first.shutdown()
            #expect(Self.carries(reused), "the new socket was not shut down")
            withExtendedLifetime(second) {}
            return
        }
        Issue.record("the freed descriptor number was never reused by the next socket")
    }

    @Test func aDescriptorBorrowedIsNeverClosed() throws {
        let (first, second) = try Self.socketPair()
        let borrowed = FileDescriptor(borrowing: first.rawValue)
        borrowed.close()
        #expect(fcntl(first.rawValue, F_GETFD) >= 0, "closing a borrowed descriptor leaves it open")
        withExtendedLifetime(second) {}
    }

    /// A thread keeps shutting a descriptor down while its owner closes it and opens a new socket,
    /// which takes the freed number (`ShutdownRace`). With close and shutdown ordered by one lock,
    /// the new socket is never shut down.
    @Test func shutdownRacingCloseNeverReachesTheNextSocketOnTheSameNumber() throws {
        let outcome = try ShutdownRace.run(rounds: 2000, own: { $0 }, close: { $0.close() }, shutdown: { $0.shutdown() })
        print("shutdown race (FileDescriptor): \(outcome)")
        #expect(outcome.reusedNumbers > outcome.rounds / 2, "the freed number was taken by the next socket")
        #expect(outcome.hits == 0, "a shutdown of a closed descriptor reached a socket opened after it, \(outcome.hits) times")
    }
}

/// The pagemap tells touched pages from untouched ones without touching them.
@Suite struct PageMapTests {
    @Test func onlyTouchedPagesAreBacked() throws {
        let pages = 1024
        let mapping = try #require(mmap(nil, pages * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0))
        defer { munmap(mapping, pages * 4096) }
        madvise(mapping, pages * 4096, MADV_NOHUGEPAGE)   // one touch must not back a whole huge page
        for page in [3, 700] { mapping.storeBytes(of: 1, toByteOffset: page * 4096, as: UInt8.self) }
        let entries = try #require(PageMap.entries(at: mapping, count: pages))
        #expect(entries.indices.filter { PageMap.isBacked(entries[$0]) } == [3, 700])
    }
}
