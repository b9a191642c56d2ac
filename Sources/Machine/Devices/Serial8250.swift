import Synchronization

/// A 16550-compatible UART at COM1, the guest's console: register set, divisor latch, FIFO control,
/// loopback, transmit and receive interrupts (National Semiconductor PC16550D data sheet).
public final class Serial8250: PortIODevice, StatefulDevice {
    /// COM1's eight registers at 0x3F8, raising ISA IRQ 4.
    public static let ports: ClosedRange<UInt16> = 0x3F8...0x3FF
    public static let interruptLine: UInt32 = 4
    /// Bytes buffered from the host side before further input is dropped.
    static let receiveCapacity = 4096

    enum Register: UInt16 {
        case data = 0, interruptEnable, interruptIdentification, lineControl, modemControl, lineStatus, modemStatus, scratch
    }

    static let ierReceivedData: UInt8 = 1 << 0
    static let ierTransmitterEmpty: UInt8 = 1 << 1
    static let iirNoInterrupt: UInt8 = 0x01
    static let iirTransmitterEmpty: UInt8 = 0x02
    static let iirReceivedData: UInt8 = 0x04
    static let iirFIFOsEnabled: UInt8 = 0xC0
    static let fcrEnableFIFO: UInt8 = 1 << 0
    static let lcrDivisorLatch: UInt8 = 1 << 7
    static let lsrDataReady: UInt8 = 1 << 0
    static let lsrTransmitterIdle: UInt8 = 0x60   // THR empty and transmitter empty
    static let mcrLoopback: UInt8 = 1 << 4
    static let ierImplementedBits: UInt8 = 0x0F     // IER bits 4-7 are always zero on a 16550
    static let mcrImplementedBits: UInt8 = 0x1F     // MCR bits 5-7 are always zero on a 16550
    static let msrDefault: UInt8 = 0xB0           // DCD, DSR, CTS asserted: a terminal is attached

    /// The UART's registers and receive FIFO: all of its state, as saved for snapshots and migration.
    public struct SavedState: Codable, Equatable, Sendable {
        /// IER: the four interrupt enable bits.
        public var interruptEnable: UInt8 = 0
        /// A transmitter-empty interrupt is raised and not yet acknowledged by reading IIR.
        public var transmitterEmptyPending = false
        /// FCR as last written.
        public var fifoControl: UInt8 = 0
        public var lineControl: UInt8 = 0x03            // 8N1
        /// MCR: the five writable bits.
        public var modemControl: UInt8 = 0x08           // OUT2
        public var scratch: UInt8 = 0
        public var divisorLow: UInt8 = 0x0C             // 9600 baud
        public var divisorHigh: UInt8 = 0
        /// Bytes received and not yet read by the guest, oldest first.
        public var receive: [UInt8] = []

        public init() {}
    }

    private let state = Mutex(SavedState())
    private let output: @Sendable ([UInt8]) -> Void
    private let setInterrupt: @Sendable (Bool) -> Void

    /// - Parameters:
    ///   - output: receives every byte the guest transmits.
    ///   - setInterrupt: raises or lowers the UART's interrupt line.
    public init(output: @escaping @Sendable ([UInt8]) -> Void, setInterrupt: @escaping @Sendable (Bool) -> Void) {
        self.output = output
        self.setInterrupt = setInterrupt
    }

    /// Queues bytes for the guest to receive (host keyboard input).
    public func enqueueInput(_ bytes: [UInt8]) {
        let raise = state.withLock { state -> Bool in
            let room = Self.receiveCapacity - state.receive.count
            state.receive.append(contentsOf: bytes.prefix(max(room, 0)))
            return Self.interruptPending(state)
        }
        if raise { pulseInterrupt() }
    }

    private static func interruptPending(_ state: SavedState) -> Bool {
        (state.interruptEnable & ierReceivedData != 0 && !state.receive.isEmpty)
            || (state.interruptEnable & ierTransmitterEmpty != 0 && state.transmitterEmptyPending)
    }

    /// The line is pulsed (raised, then lowered) for each new interrupt condition, as an edge-
    /// triggered ISA interrupt.
    private func pulseInterrupt() {
        setInterrupt(true)
        setInterrupt(false)
    }

    public func read(offset: UInt16, size: Int) -> [UInt8] {
        let (value, raise) = state.withLock { state -> (UInt8, Bool) in
            let divisorLatch = state.lineControl & Self.lcrDivisorLatch != 0
            switch Register(rawValue: offset) {
            case .data where divisorLatch:
                return (state.divisorLow, false)
            case .data:
                let byte = state.receive.isEmpty ? 0 : state.receive.removeFirst()
                return (byte, Self.interruptPending(state))
            case .interruptEnable where divisorLatch:
                return (state.divisorHigh, false)
            case .interruptEnable:
                return (state.interruptEnable, false)
            case .interruptIdentification:
                let fifo = state.fifoControl & Self.fcrEnableFIFO != 0 ? Self.iirFIFOsEnabled : 0
                if state.interruptEnable & Self.ierReceivedData != 0 && !state.receive.isEmpty {
                    return (fifo | Self.iirReceivedData, false)
                }
                if state.interruptEnable & Self.ierTransmitterEmpty != 0 && state.transmitterEmptyPending {
                    state.transmitterEmptyPending = false  // reading IIR clears THRE
                    return (fifo | Self.iirTransmitterEmpty, false)
                }
                return (fifo | Self.iirNoInterrupt, false)
            case .lineControl:
                return (state.lineControl, false)
            case .modemControl:
                return (state.modemControl, false)
            case .lineStatus:
                return (Self.lsrTransmitterIdle | (state.receive.isEmpty ? 0 : Self.lsrDataReady), false)
            case .modemStatus:
                if state.modemControl & Self.mcrLoopback != 0 {
                    // Loopback wires DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
                    let mcr = state.modemControl
                    let msr = ((mcr & 0x01) << 5) | ((mcr & 0x02) << 3) | ((mcr & 0x04) << 4) | ((mcr & 0x08) << 4)
                    return (msr, false)
                }
                return (Self.msrDefault, false)
            case .scratch:
                return (state.scratch, false)
            case nil:
                return (0xFF, false)
            }
        }
        if raise { pulseInterrupt() }
        return [UInt8](repeating: value, count: max(size, 1))
    }

    public func write(offset: UInt16, data: [UInt8]) {
        guard let value = data.first else { return }
        var transmitted: UInt8?
        let raise = state.withLock { state -> Bool in
            let divisorLatch = state.lineControl & Self.lcrDivisorLatch != 0
            switch Register(rawValue: offset) {
            case .data where divisorLatch:
                state.divisorLow = value
            case .data:
                if state.modemControl & Self.mcrLoopback != 0 {
                    if state.receive.count < Self.receiveCapacity { state.receive.append(value) }
                } else {
                    transmitted = value
                }
                state.transmitterEmptyPending = true  // the byte left at once: THR is empty again
            case .interruptEnable where divisorLatch:
                state.divisorHigh = value
            case .interruptEnable:
                let newlyEnabled = value & ~state.interruptEnable
                state.interruptEnable = value & Self.ierImplementedBits
                if newlyEnabled & Self.ierTransmitterEmpty != 0 { state.transmitterEmptyPending = true }
            case .interruptIdentification:
                state.fifoControl = value
                if value & 0x02 != 0 { state.receive.removeAll() }  // FCR bit 1: clear receive FIFO
            case .lineControl:
                state.lineControl = value
            case .modemControl:
                state.modemControl = value & Self.mcrImplementedBits
            case .scratch:
                state.scratch = value
            case .lineStatus, .modemStatus, nil:
                return false
            }
            return Self.interruptPending(state)
        }
        if let transmitted { output([transmitted]) }
        if raise { pulseInterrupt() }
    }

    // MARK: Saved state

    public func saveState() -> SavedState {
        state.withLock { $0 }
    }

    /// Takes over a saved register set and receive FIFO. Raises no interrupt: one that was pending
    /// when the state was saved is in the interrupt controllers' saved state.
    public func restoreState(_ saved: SavedState) throws(MachineError) {
        guard saved.interruptEnable & ~Self.ierImplementedBits == 0 else {
            throw MachineError(.invalidState, "serial port state: IER 0x\(String(saved.interruptEnable, radix: 16)) sets bits a 16550 does not have")
        }
        guard saved.modemControl & ~Self.mcrImplementedBits == 0 else {
            throw MachineError(.invalidState, "serial port state: MCR 0x\(String(saved.modemControl, radix: 16)) sets bits a 16550 does not have")
        }
        guard saved.receive.count <= Self.receiveCapacity else {
            throw MachineError(.invalidState, "serial port state: \(saved.receive.count) received bytes exceed the \(Self.receiveCapacity)-byte buffer")
        }
        state.withLock { $0 = saved }
    }
}
