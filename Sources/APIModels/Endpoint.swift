/// Every endpoint the API serves: Cloud Hypervisor's names under `/api/v1`. The OpenAPI document
/// (`docs/openapi.yaml`) lists exactly these; a test keeps the two equal.
public enum Endpoint: String, CaseIterable, Sendable {
    case vmmPing = "vmm.ping"
    case vmmShutdown = "vmm.shutdown"
    case vmmEvents = "vmm.events"
    case vmCreate = "vm.create"
    case vmBoot = "vm.boot"
    case vmPause = "vm.pause"
    case vmResume = "vm.resume"
    case vmInfo = "vm.info"
    case vmCounters = "vm.counters"
    case vmShutdown = "vm.shutdown"
    case vmReboot = "vm.reboot"
    case vmPowerButton = "vm.power-button"
    case vmNmi = "vm.nmi"
    case vmAddNet = "vm.add-net"
    case vmDelete = "vm.delete"
    case vmSnapshot = "vm.snapshot"
    case vmRestore = "vm.restore"
    case vmSendMigration = "vm.send-migration"
    case vmReceiveMigration = "vm.receive-migration"
    case vmCancelMigration = "vm.cancel-migration"
    case vmMigrationProgress = "vm.migration-progress"

    public static let basePath = "/api/v1"

    public var path: String { "\(Self.basePath)/\(rawValue)" }

    /// Queries are GET, operations PUT, as in Cloud Hypervisor.
    public var method: HTTPMethod {
        switch self {
        case .vmmPing, .vmmEvents, .vmInfo, .vmCounters, .vmMigrationProgress: .get
        default: .put
        }
    }
}

/// The HTTP methods the API uses.
public enum HTTPMethod: String, Sendable {
    case get = "GET"
    case put = "PUT"
}
