// swift-tools-version:6.0
import PackageDescription

/// Ferry's modules are layers (docs/architecture.md); each depends only on layers below it.
///
///     CKVM, HostOS          C shim for <linux/kvm.h>; descriptors, system calls, sockets, clocks
///     CTLS, CSandbox        C shims for the system's OpenSSL (migration TLS), libseccomp and Landlock
///     KVM                   /dev/kvm, VM and vCPU descriptors
///     Machine               guest memory, boot, devices, vCPU threads, saved state, dirty log
///     Events                the event catalogue, monitor and reader
///     MigrationWire         the migration protocol: framing, typed payloads, transport
///     LiveMigration         sender, receiver, pre-copy policy, progress
///     VMM                   the VMM core: one VM's lifecycle
///     APIModels             the REST API's endpoints and JSON bodies (no server, no KVM)
///     API, FerryClient      the HTTP server over the VMM; the HTTP client over APIModels
///     ferry, ferry-remote   the executables
let package = Package(
    name: "Ferry",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ferry", targets: ["ferry"]),
        .executable(name: "ferry-remote", targets: ["ferry-remote"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.0.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.20.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.0.0"),
    ],
    targets: [
        .target(name: "CKVM"),
        .target(name: "CSandbox", linkerSettings: [.linkedLibrary("seccomp")]),
        .target(name: "HostOS", dependencies: ["CSandbox"]),
        .target(name: "KVM", dependencies: ["CKVM", "HostOS"]),
        .target(name: "Machine", dependencies: ["KVM", "CKVM", "HostOS"]),
        .target(name: "Events", dependencies: ["HostOS"]),
        .target(name: "CTLS", linkerSettings: [.linkedLibrary("ssl"), .linkedLibrary("crypto")]),
        .target(name: "MigrationWire", dependencies: ["Machine", "HostOS", "CTLS", "CKVM"]),
        .target(name: "LiveMigration", dependencies: ["MigrationWire", "Machine", "Events", "HostOS"]),
        .target(
            name: "VMM",
            dependencies: ["LiveMigration", "MigrationWire", "Machine", "Events", "HostOS", "CKVM",
                           .product(name: "Logging", package: "swift-log")]
        ),
        .target(name: "APIModels"),
        .target(
            name: "API",
            dependencies: [
                "APIModels", "VMM", "LiveMigration", "MigrationWire", "Machine", "Events", "HostOS", "CKVM",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "FerryClient",
            dependencies: ["APIModels", .product(name: "AsyncHTTPClient", package: "async-http-client")]
        ),
        .executableTarget(
            name: "ferry",
            dependencies: [
                "VMM", "API", "Events", "Machine", "HostOS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "ferry-remote",
            dependencies: [
                "APIModels", "FerryClient", "Events", "HostOS",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .target(
            name: "FerryTestSupport",
            dependencies: ["Events", "APIModels", "FerryClient", "HostOS", "CTestSupport"],
            path: "Tests/FerryTestSupport"
        ),
        .target(name: "CTestSupport", path: "Tests/CTestSupport"),
        .testTarget(name: "HostOSTests", dependencies: ["HostOS", "CSandbox", "FerryTestSupport"]),
        .testTarget(name: "KVMTests", dependencies: ["KVM", "HostOS"]),
        .testTarget(name: "EventsTests", dependencies: ["Events", "HostOS", "FerryTestSupport"]),
        .testTarget(name: "MachineTests", dependencies: ["Machine", "KVM", "HostOS", "FerryTestSupport"]),
        .testTarget(name: "MigrationWireTests", dependencies: ["MigrationWire", "Machine", "HostOS", "FerryTestSupport"]),
        .testTarget(
            name: "LiveMigrationTests",
            dependencies: ["LiveMigration", "MigrationWire", "Machine", "Events", "HostOS", "FerryTestSupport"]
        ),
        .testTarget(name: "VMMTests", dependencies: ["VMM", "Machine", "Events"]),
        .testTarget(
            name: "APITests",
            dependencies: ["API", "APIModels", "VMM", "Events", "FerryTestSupport",
                           .product(name: "HummingbirdTesting", package: "hummingbird")]
        ),
        .testTarget(
            name: "FerryIntegrationTests",
            dependencies: ["ferry", "ferry-remote", "Events", "APIModels", "FerryClient", "FerryTestSupport",
                           "MigrationWire", "HostOS", "LiveMigration"]
        ),
    ]
)
