/// A device on the x86 I/O port bus. Offsets are relative to the device's first port.
/// Devices are called from vCPU threads, so they guard their own state.
public protocol PortIODevice: AnyObject, Sendable {
    func read(offset: UInt16, size: Int) -> [UInt8]
    func write(offset: UInt16, data: [UInt8])
}

/// Routes `in`/`out` instructions to devices by port range. Ports no device claims read as all
/// ones and ignore writes, as an empty ISA bus does.
public final class PortIOBus: Sendable {
    struct Mapping: Sendable {
        let ports: ClosedRange<UInt16>
        let device: any PortIODevice
    }

    let mappings: [Mapping]

    public init(_ devices: [(ports: ClosedRange<UInt16>, device: any PortIODevice)]) {
        mappings = devices.map { Mapping(ports: $0.ports, device: $0.device) }
    }

    public func read(port: UInt16, size: Int) -> [UInt8] {
        guard let mapping = mappings.first(where: { $0.ports.contains(port) }) else {
            return [UInt8](repeating: 0xFF, count: size)
        }
        return mapping.device.read(offset: port - mapping.ports.lowerBound, size: size)
    }

    public func write(port: UInt16, data: [UInt8]) {
        guard let mapping = mappings.first(where: { $0.ports.contains(port) }) else { return }
        mapping.device.write(offset: port - mapping.ports.lowerBound, data: data)
    }
}
