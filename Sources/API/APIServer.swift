import APIModels
import Events
import Foundation
import Hummingbird
import HummingbirdCore
import Logging
import NIOCore
import ServiceLifecycle
import VMM

/// The REST API: HTTP/1.1 on a Unix socket, Cloud Hypervisor's endpoints, bodies and status codes.
/// Routes are thin: they decode, call the VMM core and encode.
public struct APIServer: Sendable {
    /// Largest request body accepted (a `VmConfig` is a few hundred bytes).
    static let maximumBodySize = 1 << 20
    /// Largest request head: the request line and all header fields (Cloud Hypervisor's clients
    /// send a few hundred bytes); one field at most `maximumHeaderFieldSize`, at most
    /// `maximumHeaderFields` of them. A request over a limit is answered 400 and its connection closed.
    static let maximumHeaderSize = 16 << 10
    static let maximumHeaderFieldSize = 8 << 10
    static let maximumHeaderFields = 100
    /// Connections open at once (each `vmm.events` subscriber holds one); one more is closed at once.
    static let maximumConnections = 128
    /// How long shutdown waits for relayed answers on an inherited socket to reach their clients.
    static let relayDrainTimeout: Duration = .seconds(2)
    /// Events a `vmm.events` subscriber may fall behind by before it is disconnected.
    static let subscriberBufferLimit = 1024

    /// Where clients reach the API: Cloud Hypervisor's `--api-socket path=PATH` or `fd=N`.
    public enum Socket: Equatable, Sendable {
        case path(String)
        /// An inherited listening Unix socket.
        case fileDescriptor(Int32)
    }

    let vmm: VirtualMachineMonitor
    let socket: Socket
    let logger: Logger

    public init(vmm: VirtualMachineMonitor, socket: Socket, logger: Logger) {
        self.vmm = vmm
        self.socket = socket
        self.logger = logger
    }

    /// Serves until the task is cancelled, then shuts down gracefully: requests in flight (such as
    /// the `vmm.shutdown` that ended the VMM) get their answers before the socket closes.
    /// `onReady` runs once the socket accepts connections.
    ///
    /// The socket is private to its owner (mode 0600) from the moment anyone can reach it: it is
    /// bound inside a fresh directory only its owner can enter, made 0600, and only then moved to
    /// `socketPath` (replacing a stale socket file there).
    public func run(onReady: @escaping @Sendable () -> Void = {}) async throws {
        let path: String
        let forwarder: InheritedSocketForwarder?
        switch socket {
        case let .path(socketPath):
            path = socketPath
            forwarder = nil
        case let .fileDescriptor(descriptor):
            // The server listens privately; the inherited socket's connections are relayed to it.
            try InheritedSocketForwarder.validate(descriptor)
            path = NSTemporaryDirectory() + "ferry-api-\(getpid()).sock"
            forwarder = InheritedSocketForwarder(listeningDescriptor: descriptor, serverPath: path)
        }
        let staging = (path as NSString).deletingLastPathComponent.appending("/.ferry-api-\(getpid())")
        let stagingSocket = staging + "/api.sock"
        rmdir(staging)
        guard mkdir(staging, 0o700) == 0 || errno == EEXIST else {
            throw VMMError(.internalFailure, "cannot create \(staging): \(String(cString: strerror(errno)))")
        }
        unlink(stagingSocket)
        var serverLogger = logger
        serverLogger.logLevel = .critical  // its errors reach the caller as thrown errors
        let connections = ConnectionLimit.Count(limit: Self.maximumConnections)
        let http = HTTP1Channel.Configuration(
            additionalChannelHandlers: [ConnectionLimit(connections)], idleTimeout: nil,
            httpDecoderConfiguration: .init(maxHeaderFieldSize: Self.maximumHeaderFieldSize, maxHeaderListSize: Self.maximumHeaderSize,
                                            maxHeaderFieldCount: Self.maximumHeaderFields))
        let application = Application(
            router: Self.router(vmm: vmm),
            server: .http1(configuration: http),
            configuration: .init(address: .unixDomainSocket(path: stagingSocket), serverName: "ferry"),
            onServerRunning: { _ in
                chmod(stagingSocket, 0o600)
                rename(stagingSocket, path)
                rmdir(staging)
                forwarder?.start()
                onReady()
            },
            logger: serverLogger
        )
        defer {
            unlink(path)
            unlink(stagingSocket)
            rmdir(staging)
        }
        let group = ServiceGroup(configuration: .init(services: [application], gracefulShutdownSignals: [],
                                                      logger: serverLogger))
        // The group runs in a task of its own: cancelling this task must shut the server down
        // gracefully, so that requests in flight (the vmm.shutdown that ended the VMM) get their
        // answers, whereas a ServiceGroup whose own task is cancelled drops them at once.
        let running = Task { try await group.run() }
        try await withTaskCancellationHandler {
            try await running.value
        } onCancel: {
            Task { await group.triggerGracefulShutdown() }
        }
        forwarder?.drain(timeout: Self.relayDrainTimeout)
    }

    static func router(vmm: VirtualMachineMonitor) -> Router<BasicRequestContext> {
        let router = Router()
        router.add(middleware: EndpointCheck())
        router.get(.init(Endpoint.vmmPing.path)) { _, _ in
            try json(VmmPingResponse(build_version: VirtualMachineMonitor.buildVersion,
                                     version: VirtualMachineMonitor.cloudHypervisorVersion, pid: getpid(),
                                     features: VirtualMachineMonitor.features))
        }
        router.put(.init(Endpoint.vmmShutdown.path)) { _, _ in
            await vmm.requestExit(.requested)
            return Response(status: .noContent)
        }
        router.get(.init(Endpoint.vmmEvents.path)) { request, _ in
            let sinceStart = request.uri.queryParameters["since"] == "0"
            let events = vmm.events.subscribe(sinceStart: sinceStart, bufferLimit: subscriberBufferLimit)
            return Response(status: .ok, headers: [.contentType: "application/x-ndjson"],
                            body: ResponseBody { writer in
                                for await event in events {
                                    try await writer.write(ByteBuffer(bytes: EventEncoding.ndjson(event)))
                                }
                                try await writer.finish(nil)
                            })
        }
        router.put(.init(Endpoint.vmCreate.path)) { request, context in
            let config = try await decode(VmConfig.self, from: request, shape: .vmConfig) { body throws(VMMError) in
                if let (member, why) = UnsupportedRequest.firstInVmConfig(body) {
                    throw VMMError(.invalidRequest, "\(member): not supported: \(why)")
                }
            }
            let configuration = try config.vmConfiguration()
            try await vmm.create(configuration)
            return Response(status: .noContent)
        }
        router.put(.init(Endpoint.vmSnapshot.path)) { request, _ in
            let config = try await decode(VmSnapshotConfig.self, from: request)
            let directory = try Snapshot.directory(fromURL: config.destination_url, field: "destination_url")
            try await vmm.snapshot(to: directory)
            return Response(status: .noContent)
        }
        router.put(.init(Endpoint.vmRestore.path)) { request, _ in
            try await withPassedDescriptors(of: request) { passed in
                let config = try await decode(RestoreConfig.self, from: request, shape: .restoreConfig) { body throws(VMMError) in
                    if let mode = body["memory_restore_mode"], mode != .string("Copy") {
                        throw VMMError(.invalidRequest, "memory_restore_mode: only Copy; Ferry copies the snapshot's memory in before the guest runs")
                    }
                    if !(body["zone_updates"]?.elements.isEmpty ?? true) {
                        throw VMMError(.invalidRequest, "zone_updates: Ferry has one memory region and no NUMA")
                    }
                }
                let directory = try Snapshot.directory(fromURL: config.source_url, field: "source_url")
                try await vmm.restore(from: directory, resume: config.resume ?? false,
                                      tapDescriptors: try config.tapDescriptors(passed))
            }
            return Response(status: .noContent)
        }
        router.put(.init(Endpoint.vmAddNet.path)) { request, _ in
            try await withPassedDescriptors(of: request) { passed in
                guard passed.count <= 1 else {
                    throw VMMError(.invalidRequest, "\(passed.count) tap descriptors came with vm.add-net; Ferry's virtio-net has one queue pair, so one descriptor")
                }
                let card = try await decode(VmConfig.Net.self, from: request, shape: .net) { body throws(VMMError) in
                    for (member, value, asks, why) in RequestShape.netUnsupported(body, field: "vm.add-net") {
                        if let value, asks(value) { throw VMMError(.invalidRequest, "\(member): not supported: \(why)") }
                    }
                }
                let index = (try? vmm.info().configuration.machine.networks.count) ?? 0
                try await vmm.addNetwork(try card.networkConfiguration(index: index, field: "vm.add-net",
                                                                       passedDescriptor: passed.first))
            }
            return Response(status: .noContent)
        }
        router.put(.init(Endpoint.vmSendMigration.path)) { request, _ in
            let options = try await decode(SendMigrationData.self, from: request).options()
            try await vmm.sendMigration(options)
            return Response(status: .noContent)
        }
        router.put(.init(Endpoint.vmReceiveMigration.path)) { request, _ in
            var options: ReceiveMigrationOptions?
            try await withPassedDescriptors(of: request) { passed in
                options = try await decode(ReceiveMigrationData.self, from: request).options(passed: passed)
            }
            // From here the VMM owns the descriptors: the arriving guest's, or closed if none arrives.
            if let options { try await vmm.receiveMigration(options) }
            return Response(status: .noContent)
        }
        router.put(.init(Endpoint.vmCancelMigration.path)) { _, _ in
            try await vmm.cancelMigration()
            return Response(status: .noContent)
        }
        router.get(.init(Endpoint.vmMigrationProgress.path)) { _, _ in
            try json(MigrationProgressReport(vmm.migrationProgress()))
        }
        router.get(.init(Endpoint.vmCounters.path)) { _, _ in
            try json(await vmm.counters())
        }
        router.get(.init(Endpoint.vmInfo.path)) { _, _ in
            let info = try vmm.info()
            return try json(VmInfo(config: VmConfig(info.configuration, serialTerminal: info.serialTerminal,
                                                    consoleTerminal: info.consoleTerminal),
                                   state: info.state.rawValue,
                                   memory_actual_size: info.memoryActualSize))
        }
        let operations: [(Endpoint, @Sendable (VirtualMachineMonitor) async throws -> Void)] = [
            (.vmBoot, { try await $0.boot() }),
            (.vmPause, { try await $0.pause() }),
            (.vmResume, { try await $0.resume() }),
            (.vmShutdown, { try await $0.shutdown() }),
            (.vmReboot, { try await $0.reboot() }),
            (.vmPowerButton, { try await $0.pressPowerButton() }),
            (.vmNmi, { try await $0.nmi() }),
            (.vmDelete, { try await $0.delete() }),
        ]
        for (endpoint, operation) in operations {
            router.put(.init(endpoint.path)) { _, _ in
                try await operation(vmm)
                return Response(status: .noContent)
            }
        }
        return router
    }

    /// Runs `body` with the descriptors that came with `request` (on an inherited API socket); if
    /// it fails, they are closed, and if it succeeds they are the VMM's.
    static func withPassedDescriptors(of request: Request, _ body: ([Int32]) async throws -> Void) async throws {
        let name = PassedDescriptors.header.lowercased()
        let token = request.headers.first { $0.name.canonicalName == name }.flatMap { UInt64($0.value) }
        let passed = token.map { PassedDescriptors.shared.take($0) } ?? []
        do {
            try await body(passed)
        } catch {
            for descriptor in passed { close(descriptor) }
            throw error
        }
    }

    /// Decodes a JSON body after checking it against `shape` (Cloud Hypervisor's schema of the
    /// body) and `check` (what Ferry refuses of it); the error says which field is wrong and why.
    static func decode<T: Decodable>(_ type: T.Type, from request: Request, shape: RequestShape,
                                     check: (JSONValue) throws(VMMError) -> Void = { _ in }) async throws -> T {
        let data = try await body(of: request)
        let document: JSONValue
        do {
            document = try JSONDecoder().decode(JSONValue.self, from: data)
        } catch {
            throw VMMError(.invalidRequest, "request body is not valid JSON")
        }
        try shape.check(document, at: "")
        try check(document)
        return try decode(type, from: data)
    }

    /// Decodes a JSON body; the error says which field is wrong and why.
    static func decode<T: Decodable>(_ type: T.Type, from request: Request) async throws -> T {
        try decode(type, from: try await body(of: request))
    }

    private static func decode<T: Decodable>(_ type: T.Type, from data: Data) throws -> T {
        do {
            return try JSONDecoder().decode(T.self, from: data)
        } catch let error as DecodingError {
            throw VMMError(.invalidRequest, describe(error))
        }
    }

    /// The request's body: not empty, at most `maximumBodySize` bytes.
    private static func body(of request: Request) async throws -> Data {
        var request = request
        let body: ByteBuffer
        do {
            body = try await request.collectBody(upTo: maximumBodySize)
        } catch {
            throw VMMError(.invalidRequest, "request body is larger than \(maximumBodySize) bytes")
        }
        guard body.readableBytes > 0 else { throw VMMError(.invalidRequest, "request body is empty; send a JSON object") }
        return Data(buffer: body)
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ codingPath: [any CodingKey]) -> String {
            codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }.joined(separator: ".")
        }
        switch error {
        case let .keyNotFound(key, context):
            let parent = path(context.codingPath)
            return "\(parent.isEmpty ? "" : parent + ".")\(key.stringValue): required field is missing"
        case let .typeMismatch(type, context), let .valueNotFound(type, context):
            return "\(path(context.codingPath)): expected \(typeName(type))"
        case let .dataCorrupted(context):
            let location = path(context.codingPath)
            return location.isEmpty ? "request body is not valid JSON" : "\(location): \(context.debugDescription)"
        @unknown default:
            return "request body does not decode"
        }
    }

    static func typeName(_ type: Any.Type) -> String {
        switch type {
        case is String.Type: "a string"
        case is Int.Type, is UInt64.Type, is Int32.Type: "a number"
        case is Bool.Type: "true or false"
        default: "a \(type)"
        }
    }

    static func json(_ value: some Encodable) throws -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data = try encoder.encode(value)
        return Response(status: .ok, headers: [.contentType: "application/json"],
                        body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }
}

/// Answers unknown paths with 404 and known paths with the wrong method with 405, and turns every
/// error into Cloud Hypervisor's error body: a JSON array of strings.
struct EndpointCheck: RouterMiddleware {
    typealias Context = BasicRequestContext

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard let endpoint = Endpoint.allCases.first(where: { $0.path == request.uri.path }) else {
            return Self.error(.notFound, "unknown endpoint \(request.uri.path); the API lives under \(Endpoint.basePath)")
        }
        guard request.method.rawValue == endpoint.method.rawValue else {
            var response = Self.error(.methodNotAllowed, "\(endpoint.rawValue) takes \(endpoint.method.rawValue), not \(request.method.rawValue)")
            response.headers[.allow] = endpoint.method.rawValue
            return response
        }
        do {
            return try await next(request, context)
        } catch let error as VMMError {
            let status: HTTPResponse.Status = switch error.kind {
            case .invalidRequest: .badRequest
            case .noVM: .notFound
            case .wrongState: .conflict
            case .internalFailure: .internalServerError
            }
            return Self.error(status, error.message)
        } catch let error as HTTPError {
            return Self.error(error.status, error.body ?? "\(error.status.reasonPhrase)")
        } catch {
            return Self.error(.internalServerError, "\(error)")
        }
    }

    static func error(_ status: HTTPResponse.Status, _ message: String) -> Response {
        let body = (try? JSONEncoder().encode([message])) ?? Data("[]".utf8)
        return Response(status: status, headers: [.contentType: "application/json"],
                        body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }
}
