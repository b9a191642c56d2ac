import Foundation
import Machine

/// A snapshot on disk: a directory holding `snapshot.json` (this value) and `memory.bin` (guest
/// RAM in `GuestMemory`'s sparse file format).
public struct Snapshot: Codable {
    /// Bumped whenever the layout of this value changes; other versions are refused.
    static let currentFormatVersion = 3
    static let stateFile = "snapshot.json"
    static let memoryFile = "memory.bin"

    var formatVersion: Int
    var configuration: VMConfiguration
    var machine: MachineState

    /// The directory a `file://` URL names (Cloud Hypervisor's `destination_url`/`source_url`).
    public static func directory(fromURL url: String, field: String) throws(VMMError) -> String {
        let prefix = "file://"
        guard url.hasPrefix(prefix), url.count > prefix.count, url.dropFirst(prefix.count).hasPrefix("/") else {
            throw VMMError(.invalidRequest, "\(field): '\(url)' is not a file:///absolute/directory URL")
        }
        return String(url.dropFirst(prefix.count))
    }

    /// Reads and checks a snapshot directory; every failure says which file and why.
    static func read(from directory: String) throws(VMMError) -> Snapshot {
        let path = (directory as NSString).appendingPathComponent(stateFile)
        guard let data = FileManager.default.contents(atPath: path) else {
            throw VMMError(.invalidRequest, "source_url: \(path) does not exist or is not readable")
        }
        struct Version: Decodable { var formatVersion: Int }
        guard let version = try? JSONDecoder().decode(Version.self, from: data) else {
            throw VMMError(.invalidRequest, "\(path) is not a Ferry snapshot (truncated or corrupted)")
        }
        guard version.formatVersion == currentFormatVersion else {
            throw VMMError(.invalidRequest, "\(path) has snapshot format version \(version.formatVersion); this Ferry reads version \(currentFormatVersion)")
        }
        do {
            return try JSONDecoder().decode(Snapshot.self, from: data)
        } catch {
            throw VMMError(.invalidRequest, "\(path) does not decode (truncated or corrupted): \(error)")
        }
    }

    func write(to directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try encoder.encode(self).write(to: URL(fileURLWithPath: (directory as NSString).appendingPathComponent(Self.stateFile)),
                                      options: .atomic)
    }
}
