import HostOS
import KVM
import Synchronization

/// The machine's table of message-signalled interrupts. KVM keeps one GSI routing table per VM
/// and `KVM_SET_GSI_ROUTING` replaces it whole, so every device's MSI-X vectors go through this
/// one owner, which rewrites the table (KVM's default PIC/IOAPIC routes first) on each change.
/// Each vector has a GSI of its own from 24 up, past the IOAPIC's pins, for its whole life; a
/// vector without a route (masked, or not yet programmed) injects nothing.
public final class InterruptRouter: Sendable {
    private let vm: KVMVirtualMachine
    private struct Table {
        var nextGSI: UInt32 = 24
        var messages: [UInt32: (address: UInt64, data: UInt32)] = [:]
    }
    private let table = Mutex(Table())

    init(vm: KVMVirtualMachine) {
        self.vm = vm
    }

    /// `count` GSIs for one device's vectors.
    func allocate(_ count: Int) -> [UInt32] {
        table.withLock { table in
            let first = table.nextGSI
            table.nextGSI += UInt32(count)
            return (0..<UInt32(count)).map { first + $0 }
        }
    }

    /// Routes `gsi` to an MSI message, or removes its route (nil).
    func route(_ gsi: UInt32, to message: (address: UInt64, data: UInt32)?) throws {
        try table.withLock { table in
            let old = table.messages[gsi]
            if old?.address == message?.address, old?.data == message?.data { return }
            table.messages[gsi] = message
            let routes = InterruptRoute.defaultRoutes
                + table.messages.sorted { $0.key < $1.key }.map { (gsi: $0.key, route: InterruptRoute.msi(address: $0.value.address, data: $0.value.data)) }
            try vm.setInterruptRoutes(routes)
        }
    }

    /// Sets an IOAPIC pin's level (`KVM_IRQ_LINE`).
    func setLine(_ pin: UInt32, high: Bool) { try? vm.setInterruptLine(pin, high: high) }

    func bind(_ event: EventFD, gsi: UInt32) throws { try vm.bindInterrupt(event, gsi: gsi) }
    func unbind(_ event: EventFD, gsi: UInt32) { try? vm.unbindInterrupt(event, gsi: gsi) }
    func bindDoorbell(_ event: EventFD, address: UInt64) throws { try vm.bindDoorbell(event, address: address, length: 2) }
    func unbindDoorbell(_ event: EventFD, address: UInt64) { try? vm.unbindDoorbell(event, address: address, length: 2) }
}

/// PCI INTx lines, which devices share (slots 1 and 9 both use pin 16): a pin is high while any
/// of its devices asserts it, so one device lowering its INTx never hides another's.
final class INTxLines: Sendable {
    private let router: InterruptRouter
    private let asserting = Mutex<[UInt32: Set<Int>]>([:])

    init(router: InterruptRouter) {
        self.router = router
    }

    func set(_ pin: UInt32, source: Int, high: Bool) {
        asserting.withLock { asserting in
            let wasHigh = !(asserting[pin] ?? []).isEmpty
            if high { asserting[pin, default: []].insert(source) } else { asserting[pin]?.remove(source) }
            let isHigh = !(asserting[pin] ?? []).isEmpty
            if isHigh != wasHigh { router.setLine(pin, high: isHigh) }
        }
    }
}
