import CTestSupport
import Foundation
import HostOS
import Synchronization
import Testing

/// iproute2, and the privileges to make network namespaces with it.
public enum NetworkTools {
    public static let ip: String? = tool("ip")
    public static let tc: String? = tool("tc")
    public static let ping: String? = tool("ping")

    private static func tool(_ name: String) -> String? {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map { "\($0)/\(name)" }.first { access($0, X_OK) == 0 }
    }

    /// Root, `ip` and `tc`, and a namespace can really be made (a container may forbid it).
    public static let available: Bool = {
        guard geteuid() == 0, let ip, tc != nil else { return false }
        let probe = "ferry-probe-\(getpid())"
        guard (try? runTool(ip, ["netns", "add", probe])) != nil else { return false }
        _ = try? runTool(ip, ["netns", "del", probe])
        return true
    }()

    public static let unavailable = Comment(rawValue: "needs root and iproute2 (ip, tc) to make network namespaces")

    /// Namespaces, and a tap device can be made (/dev/net/tun), and `ping` is installed.
    public static let tapsAvailable: Bool = available && ping != nil && access("/dev/net/tun", R_OK | W_OK) == 0
    public static let tapsUnavailable = Comment(rawValue: "needs root, iproute2, ping (iputils-ping) and /dev/net/tun")
}

/// A network namespace the test made, deleted with everything in it (taps, bridges, veth ends,
/// addresses) when the value goes away, also when a test fails. Nothing in it reaches the host's
/// own network.
public final class NetworkNamespace: Sendable {
    public let name: String
    private let ip: String
    private static let made = Atomic<Int>(0)

    /// A fresh namespace with its loopback up; `prefix` makes its name readable (ferry-PREFIX-PID-N).
    public init(_ prefix: String) throws {
        guard let ip = NetworkTools.ip else { throw TestFailure("iproute2 is not installed") }
        self.ip = ip
        name = "ferry-\(prefix)-\(getpid())-\(Self.made.add(1, ordering: .relaxed).newValue)"
        try runTool(ip, ["netns", "add", name])
        try run(["link", "set", "lo", "up"])
        // No IPv6: its autoconfiguration would send frames of its own through every interface.
        try inside {
            for scope in ["all", "default"] {
                try? "1".write(toFile: "/proc/sys/net/ipv6/conf/\(scope)/disable_ipv6", atomically: false, encoding: .utf8)
            }
        }
    }

    /// `init` off the concurrency pool (it runs `ip` several times).
    public static func make(_ prefix: String) async throws -> NetworkNamespace {
        try await offThePool { try NetworkNamespace(prefix) }
    }

    deinit {
        _ = try? runTool(ip, ["netns", "del", name])
    }

    /// `ip -n NAME ARGUMENTS…`.
    @discardableResult
    public func run(_ arguments: [String]) throws -> String {
        try runTool(ip, ["-n", name] + arguments)
    }

    /// `run` off the concurrency pool.
    @discardableResult
    public func run(_ arguments: [String]) async throws -> String {
        try await offThePool { try self.run(arguments) }
    }

    /// A command line prefix that runs a program inside the namespace.
    public var launcher: [String] { [ip, "netns", "exec", name] }

    /// Runs `body` on a thread inside the namespace and returns its result: descriptors it opens
    /// (sockets, taps) belong to the namespace and may be used from any thread afterwards.
    public func inside<T: Sendable>(_ body: @escaping @Sendable () throws -> T) throws -> T {
        let result = Mutex<Result<T, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        let path = "/run/netns/\(name)"
        let thread = Thread {
            let entered = ferry_test_enter_netns(path)
            result.withLock {
                $0 = entered == 0 ? Result { try body() }
                    : .failure(TestFailure("cannot enter \(path): \(String(cString: strerror(-entered)))"))
            }
            done.signal()
        }
        thread.start()
        done.wait()
        return try result.withLock { $0! }.get()
    }

    /// A UDP socket bound to `address`:`port` in this namespace (port 0: any free one).
    public func udpSocket(address: String, port: Int = 0) throws -> UDPSocket {
        try inside {
            let fd = ferry_test_udp_socket(address, Int32(port))
            guard fd >= 0 else { throw TestFailure("UDP socket on \(address):\(port): \(String(cString: strerror(-fd)))") }
            return UDPSocket(FileDescriptor(fd))
        }
    }

    /// A raw socket seeing and sending every frame on `interface` in this namespace.
    public func packetSocket(interface: String) throws -> UDPSocket {
        try inside {
            let fd = ferry_test_packet_socket(interface)
            guard fd >= 0 else { throw TestFailure("packet socket on \(interface): \(String(cString: strerror(-fd)))") }
            return UDPSocket(FileDescriptor(fd))
        }
    }
}

/// A datagram (or raw packet) socket: send to an address, receive with a timeout.
public final class UDPSocket: Sendable {
    public let descriptor: FileDescriptor

    init(_ descriptor: FileDescriptor) { self.descriptor = descriptor }

    /// Sends `bytes` to `address`:`port`; false if the kernel refused.
    @discardableResult
    public func send(_ bytes: [UInt8], to address: String, port: Int) -> Bool {
        bytes.withUnsafeBytes { ferry_test_udp_send(descriptor.rawValue, address, Int32(port), $0.baseAddress, UInt($0.count)) } >= 0
    }

    /// Sends a raw frame (on a packet socket).
    @discardableResult
    public func send(frame: [UInt8]) -> Bool {
        frame.withUnsafeBytes { write(descriptor.rawValue, $0.baseAddress, $0.count) } == frame.count
    }

    /// The next datagram or frame, or nil if none came within `timeout`.
    public func receive(timeout: Duration, capacity: Int = 65_536) -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: capacity)
        let milliseconds = Int32(min(timeout.wholeMilliseconds, Int64(Int32.max)))
        let count = buffer.withUnsafeMutableBytes { ferry_test_receive(descriptor.rawValue, $0.baseAddress, UInt($0.count), milliseconds) }
        return count >= 0 ? Array(buffer.prefix(count)) : nil
    }
}

/// Runs a tool to completion; throws with its output if it fails.
@discardableResult
public func runTool(_ executable: String, _ arguments: [String]) throws -> String {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    process.standardInput = FileHandle.nullDevice
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    guard process.terminationStatus == 0 else {
        throw TestFailure("\(([executable] + arguments).joined(separator: " ")) exited with status \(process.terminationStatus): \(text)")
    }
    return text
}
