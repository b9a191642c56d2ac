import CKVM
import HostOS

/// Where KVM sends a global system interrupt (GSI): a pin of the in-kernel PIC or IOAPIC, or a
/// message-signalled interrupt written to the local APICs.
public enum InterruptRoute: Equatable, Sendable {
    case irqchip(chip: KVMVirtualMachine.InterruptChip, pin: UInt32)
    case msi(address: UInt64, data: UInt32)

    /// KVM's routing after `KVM_CREATE_IRQCHIP` (`kvm_setup_default_irq_routing`): GSIs 0–15 reach
    /// both the 8259 pair and the IOAPIC pin of the same number, GSIs 16–23 the IOAPIC alone.
    /// `KVM_SET_GSI_ROUTING` replaces the whole table, so every table Ferry sets starts with these.
    public static let defaultRoutes: [(gsi: UInt32, route: InterruptRoute)] = {
        var routes: [(gsi: UInt32, route: InterruptRoute)] = []
        for gsi in UInt32(0)..<24 {
            if gsi < 16 {
                routes.append((gsi, .irqchip(chip: gsi < 8 ? .picMaster : .picSlave, pin: gsi % 8)))
            }
            routes.append((gsi, .irqchip(chip: .ioapic, pin: gsi)))
        }
        return routes
    }()
}

extension KVMVirtualMachine {
    /// Replaces KVM's GSI routing table (`KVM_SET_GSI_ROUTING`).
    public func setInterruptRoutes(_ routes: [(gsi: UInt32, route: InterruptRoute)]) throws {
        var entries: [kvm_irq_routing_entry] = routes.map { gsi, route in
            var entry = kvm_irq_routing_entry()
            entry.gsi = gsi
            switch route {
            case let .irqchip(chip, pin):
                entry.type = CKVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = chip.rawValue
                entry.u.irqchip.pin = pin
            case let .msi(address, data):
                entry.type = CKVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = UInt32(truncatingIfNeeded: address)
                entry.u.msi.address_hi = UInt32(truncatingIfNeeded: address >> 32)
                entry.u.msi.data = data
            }
            return entry
        }
        try systemCall("KVM_SET_GSI_ROUTING(\(entries.count) routes)") {
            ckvm_set_gsi_routing(descriptor.rawValue, &entries, UInt32(entries.count))
        }
    }

    /// Delivers one message-signalled interrupt now (`KVM_SIGNAL_MSI`), as a device's write of
    /// `data` to `address` in the local APICs' window would. Safe from any thread: it takes no
    /// vCPU's lock. Returns false when the guest's APIC did not accept it (e.g. it is disabled).
    @discardableResult
    public func signalMessage(address: UInt64, data: UInt32) throws -> Bool {
        var message = kvm_msi()
        message.address_lo = UInt32(truncatingIfNeeded: address)
        message.address_hi = UInt32(truncatingIfNeeded: address >> 32)
        message.data = data
        let delivered = try systemCall("KVM_SIGNAL_MSI(\(String(address, radix: 16)), \(String(data, radix: 16)))") {
            ckvm_ioctl_ptr(descriptor.rawValue, CKVM_SIGNAL_MSI, &message)
        }
        return delivered > 0
    }

    /// Binds `event` to `gsi` (`KVM_IRQFD`): each signal injects the GSI's interrupt in the kernel.
    public func bindInterrupt(_ event: EventFD, gsi: UInt32) throws {
        try irqfd(event, gsi: gsi, flags: 0)
    }

    public func unbindInterrupt(_ event: EventFD, gsi: UInt32) throws {
        try irqfd(event, gsi: gsi, flags: CKVM_IRQFD_FLAG_DEASSIGN)
    }

    private func irqfd(_ event: EventFD, gsi: UInt32, flags: UInt32) throws {
        var request = kvm_irqfd()
        request.fd = UInt32(bitPattern: event.rawValue)
        request.gsi = gsi
        request.flags = flags
        try systemCall("KVM_IRQFD(gsi \(gsi)\(flags == 0 ? "" : ", deassign"))") {
            ckvm_ioctl_ptr(descriptor.rawValue, CKVM_IRQFD, &request)
        }
    }

    /// Makes KVM signal `event` for every guest write of `length` bytes (1, 2, 4 or 8) to the
    /// guest-physical `address`, instead of an MMIO exit (`KVM_IOEVENTFD`).
    public func bindDoorbell(_ event: EventFD, address: UInt64, length: UInt32) throws {
        try ioeventfd(event, address: address, length: length, flags: 0)
    }

    public func unbindDoorbell(_ event: EventFD, address: UInt64, length: UInt32) throws {
        try ioeventfd(event, address: address, length: length, flags: CKVM_IOEVENTFD_FLAG_DEASSIGN)
    }

    private func ioeventfd(_ event: EventFD, address: UInt64, length: UInt32, flags: UInt32) throws {
        var request = kvm_ioeventfd()
        request.addr = address
        request.len = length
        request.fd = event.rawValue
        request.flags = flags
        try systemCall("KVM_IOEVENTFD(0x\(String(address, radix: 16))\(flags == 0 ? "" : ", deassign"))") {
            ckvm_ioctl_ptr(descriptor.rawValue, CKVM_IOEVENTFD, &request)
        }
    }
}
