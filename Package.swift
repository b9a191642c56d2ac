// swift-tools-version:6.0
import PackageDescription

/// Ferry's modules follow the layers of docs/architecture (C shim → KVM → Machine → Events → VMM →
/// executables); each depends only on the layers below it.
let package = Package(
    name: "Ferry",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "ferry", targets: ["ferry"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
    ],
    targets: [
        .target(name: "CKVM"),
        .target(name: "KVM", dependencies: ["CKVM"]),
        .target(name: "Events"),
        .target(name: "Machine", dependencies: ["KVM", .product(name: "Logging", package: "swift-log")]),
        .target(name: "VMM", dependencies: ["Machine", "Events", .product(name: "Logging", package: "swift-log")]),
        .executableTarget(
            name: "ferry",
            dependencies: [
                "VMM",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(name: "KVMTests", dependencies: ["KVM"]),
        .testTarget(name: "EventsTests", dependencies: ["Events"]),
        .testTarget(name: "MachineTests", dependencies: ["Machine", "KVM"]),
        .testTarget(name: "VMMTests", dependencies: ["VMM"]),
        .testTarget(name: "FerryIntegrationTests", dependencies: ["ferry", "Events"]),
    ]
)
