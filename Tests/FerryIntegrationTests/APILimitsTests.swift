import FerryTestSupport
import Foundation
import HostOS
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The API socket's limits (docs/security.md): a request head over 16 KiB is refused with a 400,
/// a body over 1 MiB with a 400, and connections past 128 open at once are closed before anything
/// of them is read; the VMM answers everyone else throughout.
@Suite struct APILimitsTests {
    /// Sends `request` on a new connection and returns what came back until the VMM closed it or
    /// 5 s passed. The VMM may answer a request it refuses before reading all of it, and stop
    /// reading: sending gives up after 2 s without progress.
    static func exchange(_ socketPath: String, _ request: [UInt8]) throws -> String {
        let connection = try Socket.connect(to: .unix(path: socketPath), timeout: .seconds(5))
        try? request.withUnsafeBytes { try StreamIO.send(connection.rawValue, $0, progressTimeout: .seconds(2)) }
        return answer(connection)
    }

    static func answer(_ connection: FileDescriptor) -> String {
        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        let deadline = ContinuousClock.now + .seconds(5)
        while ContinuousClock.now < deadline {
            guard (try? Poll.wait(connection.rawValue, for: Int16(POLLIN), until: deadline)) == true else { break }
            let count = buffer.withUnsafeMutableBytes { recv(connection.rawValue, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            guard count > 0 else { break }
            received += buffer.prefix(count)
            if String(decoding: received, as: UTF8.self).contains("\r\n\r\n") { break }
        }
        return String(decoding: received, as: UTF8.self)
    }

    static func ping(_ socketPath: String) throws -> String {
        try exchange(socketPath, Array("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n".utf8))
    }

    @Test func oversizedHeadsAndBodiesAre400AndTheVMMAnswersOn() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        let path = vmm.socketPath
        let bigHeader = "X-Filler: " + String(repeating: "a", count: 20 << 10)
        let head = try Self.exchange(path, Array("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\(bigHeader)\r\n\r\n".utf8))
        #expect(head.hasPrefix("HTTP/1.1 400"), "a 20 KiB header: \(head.prefix(80))")
        let manyFields = (0..<150).map { "X-Field-\($0): 1\r\n" }.joined()
        let fields = try Self.exchange(path, Array("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\(manyFields)\r\n".utf8))
        #expect(fields.hasPrefix("HTTP/1.1 400"), "150 header fields: \(fields.prefix(80))")
        let body = "{\"cpus\": \"" + String(repeating: "a", count: (1 << 20) + 10) + "\"}"
        let large = try Self.exchange(path, Array("PUT /api/v1/vm.create HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: \(body.utf8.count)\r\n\r\n\(body)".utf8))
        #expect(large.hasPrefix("HTTP/1.1 400") && large.contains("larger than"), "a body over 1 MiB: \(large.prefix(200))")
        #expect(try Self.ping(path).hasPrefix("HTTP/1.1 200"))
        #expect(await vmm.shutDown())
    }

    @Test func connectionsPastTheLimitAreClosedAndTheRestAreServed() async throws {
        let directory = try TemporaryDirectory()
        let vmm = try await TestVMM("vmm", in: directory)
        let path = vmm.socketPath
        // Idle connections, each accepted once it answered a ping, until one is closed unanswered:
        // the limit counts the test's own API client's connections too, so that is at or just
        // before the 128th.
        var held: [FileDescriptor] = []
        var refused = false
        while held.count < 140 {
            let connection = try Socket.connect(to: .unix(path: path), timeout: .seconds(5))
            try connection.writeAll(Array("GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n".utf8))
            let answer = Self.answer(connection)
            if answer.isEmpty {
                refused = true
                connection.close()
                break
            }
            #expect(answer.hasPrefix("HTTP/1.1 200"), "\(answer.prefix(80))")
            held.append(connection)
        }
        #expect(refused && (120...128).contains(held.count), "closed unanswered after \(held.count) open connections")
        #expect(try Self.ping(path).isEmpty, "the next one too")
        held.suffix(8).forEach { $0.close() }
        // Closing is noticed by the server asynchronously: a ping gets through once it has been.
        #expect(await waitUntil(.seconds(10)) { (try? Self.ping(path))?.hasPrefix("HTTP/1.1 200") == true })
        held.forEach { $0.close() }
        #expect(await vmm.shutDown())
    }
}
