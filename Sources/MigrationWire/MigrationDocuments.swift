import Foundation
import Machine

/// The `config` payload: the VM as its guest sees it, so that the destination can build the same
/// machine. Nothing in it says where the destination puts anything — its console, its files are
/// the destination's own choice (docs/migration-protocol.md, "What a sender can make the
/// destination do").
public struct MigrationConfig: Codable, Equatable, Sendable {
    public var machine: MachineConfiguration

    public init(machine: MachineConfiguration) {
        self.machine = machine
    }
}

/// The `state` payload: the machine state, and whether the guest ran on the source (a guest
/// paused there stays paused on the destination).
public struct MigrationState: Codable, Equatable, Sendable {
    public var machine: MachineState
    public var guestRunning: Bool

    public init(machine: MachineState, guestRunning: Bool) {
        self.machine = machine
        self.guestRunning = guestRunning
    }
}

extension MigrationState {
    /// Encodes and decodes `MachineState.rehearsal(of:)` as a state payload, discarding the result:
    /// before the switch-over, so that the one coded while the guest is stopped is not the
    /// process's first.
    public static func rehearseCoding(of configuration: MachineConfiguration) {
        let rehearsal = MigrationState(machine: .rehearsal(of: configuration), guestRunning: true)
        guard let bytes = try? MigrationDocument.encodeBinary(rehearsal) else { return }
        _ = try? MigrationDocument.decodeBinary(MigrationState.self, from: bytes, command: .state)
    }
}

/// The forms of the config payload (JSON: sent before the guest stops, and read by people) and of
/// the state payload (CBOR: encoded and decoded while the guest is stopped, where JSON's arrays
/// of numbers cost milliseconds).
enum MigrationDocument {
    static func encode(_ value: some Encodable) throws(MigrationError) -> [UInt8] {
        do {
            return Array(try JSONEncoder().encode(value))
        } catch {
            throw MigrationError(.malformedPayload, "cannot encode \(type(of: value)): \(error)")
        }
    }

    static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8], command: MigrationCommand) throws(MigrationError) -> T {
        do {
            return try JSONDecoder().decode(type, from: Data(bytes))
        } catch {
            throw MigrationError(.malformedPayload, "the \(command) payload does not decode: \(error)")
        }
    }

    static func encodeBinary(_ value: some Encodable) throws(MigrationError) -> [UInt8] {
        do {
            return try CBOR.encode(value)
        } catch {
            throw MigrationError(.malformedPayload, "cannot encode \(type(of: value)): \(error)")
        }
    }

    static func decodeBinary<T: Decodable>(_ type: T.Type, from bytes: [UInt8], command: MigrationCommand) throws(MigrationError) -> T {
        do {
            return try CBOR.decode(type, from: bytes)
        } catch {
            throw MigrationError(.malformedPayload, "the \(command) payload does not decode: \(error)")
        }
    }
}
