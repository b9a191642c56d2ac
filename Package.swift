// swift-tools-version:6.0
import PackageDescription

/// Ferry's modules follow the layers of docs/architecture (C shim → KVM → Machine → Events → VMM →
/// executables); each depends only on the layers below it.
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
        .target(name: "KVM", dependencies: ["CKVM"]),
        .target(name: "Events"),
        .target(name: "Machine", dependencies: ["KVM", .product(name: "Logging", package: "swift-log")]),
        .target(name: "VMM", dependencies: ["Machine", "Events", "Migration", .product(name: "Logging", package: "swift-log")]),
        .target(name: "Migration", dependencies: ["Machine"]),
        .target(
            name: "API",
            dependencies: [
                "VMM", "Events", "Migration",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .target(
            name: "FerryClient",
            dependencies: ["API", .product(name: "AsyncHTTPClient", package: "async-http-client")]
        ),
        .executableTarget(
            name: "ferry",
            dependencies: [
                "VMM", "API",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "ferry-remote",
            dependencies: [
                "API", "FerryClient",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .target(name: "FerryTestSupport", path: "Tests/FerryTestSupport"),
        .testTarget(name: "KVMTests", dependencies: ["KVM"]),
        .testTarget(name: "EventsTests", dependencies: ["Events"]),
        .testTarget(name: "MachineTests", dependencies: ["Machine", "KVM", "FerryTestSupport"]),
        .testTarget(name: "VMMTests", dependencies: ["VMM"]),
        .testTarget(name: "MigrationTests", dependencies: ["Migration", "Machine"]),
        .testTarget(
            name: "APITests",
            dependencies: ["API", "VMM", "Events", "FerryTestSupport", .product(name: "HummingbirdTesting", package: "hummingbird")]
        ),
        .testTarget(name: "FerryIntegrationTests", dependencies: ["ferry", "ferry-remote", "Events", "API", "FerryClient", "FerryTestSupport", "Migration"]),
    ]
)
