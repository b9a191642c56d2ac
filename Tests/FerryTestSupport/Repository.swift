import Foundation

/// Paths of the repository and of the built products, for tests of every target.
public enum Repository {
    /// The directory holding the test bundle also holds the executables.
    public static let productsDirectory: URL = {
        URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    }()

    public static let root: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    public static var ferry: URL { productsDirectory.appendingPathComponent("ferry") }
    public static var ferryRemote: URL { productsDirectory.appendingPathComponent("ferry-remote") }

    public static var kvmAvailable: Bool { access("/dev/kvm", R_OK | W_OK) == 0 }

    /// Runs one of the repository's scripts and returns its standard output lines.
    public static func runScript(_ name: String) throws -> [String] {
        let process = Process()
        process.executableURL = root.appendingPathComponent("scripts/\(name)")
        let output = Pipe()
        process.standardOutput = output
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw TestFailure("scripts/\(name) exited with status \(process.terminationStatus)")
        }
        return String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init)
    }
}

public struct TestFailure: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The test guest, built once per test run by the repository's script.
public enum TestGuest {
    public static let path: Result<String, any Error> = Result {
        guard let path = try Repository.runScript("build-test-guest").last else {
            throw TestFailure("build-test-guest printed no path")
        }
        return path
    }
}

/// Debian's kernel (`vmlinux`, `bzimage`) and a busybox initramfs, fetched and cached by
/// `scripts/fetch-linux-guest`.
public enum LinuxGuest {
    public static let paths: Result<[String: String], any Error> = Result {
        var paths: [String: String] = [:]
        for line in try Repository.runScript("fetch-linux-guest") {
            let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 { paths[parts[0]] = parts[1] }
        }
        guard paths["vmlinux"] != nil, paths["initramfs"] != nil else {
            throw TestFailure("fetch-linux-guest did not print vmlinux= and initramfs= paths")
        }
        return paths
    }
}

/// A temporary directory removed when the value goes away.
public final class TemporaryDirectory: Sendable {
    public let url: URL

    public init() throws {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("ferry-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }

    public func path(_ name: String) -> String { url.appendingPathComponent(name).path }

    deinit {
        try? FileManager.default.removeItem(at: url)
    }
}

/// Runs `body` with the path of a temporary directory that is removed afterwards.
public func withTemporaryDirectory<Result>(_ body: (String) async throws -> Result) async throws -> Result {
    let directory = try TemporaryDirectory()
    return try await body(directory.url.path)
}
