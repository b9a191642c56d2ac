import Synchronization
import Testing
@testable import Machine

/// Collects what a device emits, from any thread.
final class Recorder<T: Sendable>: Sendable {
    private let items = Mutex<[T]>([])
    func record(_ item: T) { items.withLock { $0.append(item) } }
    var all: [T] { items.withLock { $0 } }
}

@Suite struct Serial8250Tests {
    let output = Recorder<UInt8>()
    let interrupts = Recorder<Bool>()

    func makeUART() -> Serial8250 {
        Serial8250(output: { [output] bytes in bytes.forEach(output.record) },
                   setInterrupt: { [interrupts] in interrupts.record($0) })
    }

    @Test func transmittedBytesReachTheHostAndLineStatusStaysReady() {
        let uart = makeUART()
        for byte in Array("hi\n".utf8) { uart.write(offset: 0, data: [byte]) }
        #expect(output.all == Array("hi\n".utf8))
        #expect(uart.read(offset: 5, size: 1) == [0x60])
    }

    @Test func divisorLatchSwapsDataAndInterruptEnableRegisters() {
        let uart = makeUART()
        uart.write(offset: 3, data: [0x83])     // DLAB on, 8N1
        uart.write(offset: 0, data: [0x01])     // 115200 baud
        uart.write(offset: 1, data: [0x00])
        #expect(uart.read(offset: 0, size: 1) == [0x01])
        uart.write(offset: 3, data: [0x03])
        #expect(output.all.isEmpty, "divisor writes are not output")
        #expect(uart.read(offset: 1, size: 1) == [0x00])
    }

    @Test func enablingTransmitInterruptRaisesItAndReadingIIRClearsIt() {
        let uart = makeUART()
        #expect(uart.read(offset: 2, size: 1) == [0x01], "no interrupt pending")
        uart.write(offset: 1, data: [0x02])
        #expect(interrupts.all == [true, false])
        #expect(uart.read(offset: 2, size: 1) == [0x02])
        #expect(uart.read(offset: 2, size: 1) == [0x01])
        uart.write(offset: 0, data: [0x41])
        #expect(interrupts.all.count == 4, "each transmitted byte pulses the line again")
    }

    @Test func hostInputIsReceivedInOrderWithDataReadyAndInterrupt() {
        let uart = makeUART()
        uart.write(offset: 1, data: [0x01])
        uart.enqueueInput(Array("ls\n".utf8))
        #expect(interrupts.all == [true, false])
        #expect(uart.read(offset: 2, size: 1) == [0x04])
        #expect(uart.read(offset: 5, size: 1)[0] & 1 == 1)
        let received = (0..<3).map { _ in uart.read(offset: 0, size: 1)[0] }
        #expect(received == Array("ls\n".utf8))
        #expect(uart.read(offset: 5, size: 1)[0] & 1 == 0)
    }

    @Test func loopbackReflectsModemControlAndEchoesData() {
        let uart = makeUART()
        uart.write(offset: 4, data: [0x1A])     // LOOP | OUT2 | RTS, as Linux's probe writes
        #expect(uart.read(offset: 6, size: 1)[0] & 0xF0 == 0x90)
        uart.write(offset: 0, data: [0x55])
        #expect(output.all.isEmpty)
        #expect(uart.read(offset: 0, size: 1) == [0x55])
    }

    @Test func scratchRegisterHoldsItsValue() {
        let uart = makeUART()
        uart.write(offset: 7, data: [0xA5])
        #expect(uart.read(offset: 7, size: 1) == [0xA5])
    }
}

@Suite struct I8042Tests {
    @Test func resetCommandEndsTheMachineAndNothingElseDoes() {
        let resets = Recorder<Int>()
        let controller = I8042(onReset: { resets.record(1) })
        controller.write(offset: 0, data: [0xFE])
        controller.write(offset: 4, data: [0xAD])
        #expect(resets.all.isEmpty)
        #expect(controller.read(offset: 4, size: 1) == [0], "input buffer empty: reboot=k can proceed")
        controller.write(offset: 4, data: [0xFE])
        #expect(resets.all.count == 1)
    }

    @Test func busReadsAllOnesFromPortsWithoutADevice() {
        let bus = PortIOBus([(I8042.ports, I8042(onReset: {}))])
        #expect(bus.read(port: 0x70, size: 2) == [0xFF, 0xFF])
        #expect(bus.read(port: 0x64, size: 1) == [0])
    }
}
