import APIModels
import AsyncHTTPClient
import Foundation
import NIOCore

/// An error answer from the API: the status and Cloud Hypervisor's array of messages.
public struct APIError: Error, CustomStringConvertible, Sendable {
    public var status: Int
    public var messages: [String]

    public var description: String {
        messages.isEmpty ? "HTTP \(status)" : messages.joined(separator: "; ")
    }
}

/// A client for Ferry's API socket, as `ferry-remote` uses it.
public struct APIClient: Sendable {
    public let socketPath: String
    /// Longest an answer may take by default; operations such as vm.boot answer within a second or
    /// two. `vm.receive-migration` answers only when a migration has arrived, so callers pass their
    /// own deadline for it.
    public static let requestTimeout: TimeAmount = .seconds(60)
    /// As good as no deadline: for the event stream and for waiting on an incoming migration.
    public static let unlimited: TimeAmount = .hours(24 * 365)

    /// The HTTP client every `APIClient` shares. Unlike `HTTPClient.shared` it has no read timeout
    /// (that one gives up after 90 s without a byte), so a quiet event stream or a receive that
    /// waits long for its sender stays open; each request has its own deadline instead.
    private static let http = HTTPClient(
        eventLoopGroup: HTTPClient.defaultEventLoopGroup,
        configuration: HTTPClient.Configuration(timeout: .init(connect: .seconds(10), read: nil)))

    public init(socketPath: String) {
        self.socketPath = socketPath
    }

    private func url(_ endpoint: Endpoint, query: String? = nil) throws -> String {
        guard let host = socketPath.addingPercentEncoding(withAllowedCharacters: .alphanumerics) else {
            throw APIError(status: 0, messages: ["socket path \(socketPath) cannot be encoded in a URL"])
        }
        return "http+unix://\(host)\(endpoint.path)\(query.map { "?\($0)" } ?? "")"
    }

    /// Sends one request and returns the body of a successful answer; throws `APIError` otherwise.
    @discardableResult
    public func send(_ endpoint: Endpoint, body: Data? = nil, timeout: TimeAmount = requestTimeout) async throws -> Data {
        var request = HTTPClientRequest(url: try url(endpoint))
        request.method = .init(rawValue: endpoint.method.rawValue)
        if let body {
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(bytes: body))
        }
        let response = try await Self.http.execute(request, timeout: timeout)
        let bytes = try await response.body.collect(upTo: 16 << 20)
        let data = Data(bytes.readableBytesView)
        guard (200..<300).contains(Int(response.status.code)) else {
            let messages = (try? JSONDecoder().decode([String].self, from: data))
                ?? [String(decoding: data, as: UTF8.self)].filter { !$0.isEmpty }
            throw APIError(status: Int(response.status.code), messages: messages)
        }
        return data
    }

    /// Follows `vmm.events`: one compact JSON object per element, until the VMM closes the stream.
    public func events(sinceStart: Bool) async throws -> AsyncThrowingStream<Data, any Error> {
        let request = HTTPClientRequest(url: try url(.vmmEvents, query: sinceStart ? "since=0" : nil))
        let response = try await Self.http.execute(request, timeout: Self.unlimited)
        guard response.status == .ok else {
            throw APIError(status: Int(response.status.code), messages: [])
        }
        return AsyncThrowingStream { continuation in
            let task = Task {
                var pending = Data()
                do {
                    for try await chunk in response.body {
                        pending.append(contentsOf: chunk.readableBytesView)
                        while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                            continuation.yield(pending[pending.startIndex..<newline])
                            pending.removeSubrange(pending.startIndex...newline)
                        }
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            continuation.onTermination = { _ in task.cancel() }
        }
    }
}
