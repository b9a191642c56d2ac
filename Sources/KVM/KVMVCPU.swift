import CKVM
import HostOS
#if canImport(Glibc)
import Glibc
#endif

/// Why `KVM_RUN` returned.
public enum VCPUExit: Equatable, Sendable {
    /// An `in`/`out` instruction. For a read, answer with `KVMVCPU.completeRead(_:)` before running again.
    case portIO(port: UInt16, size: Int, count: Int, isWrite: Bool, data: [UInt8])
    /// An access to guest-physical memory that no slot backs. Answer reads like port reads.
    case mmio(address: UInt64, size: Int, isWrite: Bool, data: [UInt8])
    /// The guest executed `hlt` and no interrupt controller in the kernel would wake it.
    case halt
    /// Triple fault or similar: the guest can no longer run.
    case shutdown
    /// A reset or shutdown request the kernel turned into an exit (`KVM_EXIT_SYSTEM_EVENT`).
    case systemEvent(type: UInt32)
    /// A signal or `immediate_exit` interrupted `KVM_RUN` (`EINTR` or `KVM_EXIT_INTR`).
    case interrupted
    /// KVM could not emulate or handle something (`KVM_EXIT_INTERNAL_ERROR`).
    case internalError(suberror: UInt32)
    /// Entering the guest failed (`KVM_EXIT_FAIL_ENTRY`) with a hardware reason code.
    case failedEntry(reason: UInt64)
    /// Any exit reason Ferry does not handle, by number.
    case other(reason: UInt32)
}

/// A vCPU file descriptor and its mapped `kvm_run` page.
///
/// A vCPU is used by one thread at a time — its own vCPU thread while it runs, the VMM while it is
/// stopped — which the machine's vCPU state machine guarantees; only `kick` may be called from other
/// threads at any time.
public final class KVMVCPU: @unchecked Sendable {
    public let id: UInt32
    let descriptor: FileDescriptor
    private let run: UnsafeMutablePointer<kvm_run>
    private let mmapSize: Int

    /// MSRs read or written per `KVM_GET_MSRS`/`KVM_SET_MSRS` call: KVM refuses 256 or more at once
    /// (`MAX_IO_MSRS` in arch/x86/kvm/x86.c).
    static let msrsPerCall = 255

    init(id: UInt32, descriptor: FileDescriptor, mmapSize: Int) throws {
        self.id = id
        self.descriptor = descriptor
        self.mmapSize = mmapSize
        guard let mapping = mmap(nil, mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, descriptor.rawValue, 0),
              mapping != MAP_FAILED
        else {
            throw SystemError("mmap(kvm_run of vCPU \(id))", errno: errno)
        }
        run = mapping.assumingMemoryBound(to: kvm_run.self)
    }

    deinit {
        munmap(run, mmapSize)
    }

    private var fd: Int32 { descriptor.rawValue }

    // MARK: Running

    /// Runs the vCPU until the next exit that userspace must handle.
    public func runOnce() throws -> VCPUExit {
        if ckvm_ioctl_value(fd, CKVM_RUN, 0) < 0 {
            let code = errno
            // KVM finishes the previous exit's work before it looks at signals or immediate_exit.
            if code == EINTR || code == EAGAIN { exitPendingInKernel = false; return .interrupted }
            throw SystemError("KVM_RUN(vCPU \(id))", errno: code)
        }
        exitPendingInKernel = run.pointee.exit_reason != UInt32(KVM_EXIT_INTR)
        let raw = UnsafeMutableRawPointer(run)
        switch Int32(run.pointee.exit_reason) {
        case KVM_EXIT_IO:
            let io = run.pointee.io
            let length = Int(io.size) * Int(io.count)
            let dataOffset = Int(io.data_offset)
            guard dataOffset + length <= mmapSize else { return .other(reason: run.pointee.exit_reason) }
            let isWrite = io.direction == UInt8(KVM_EXIT_IO_OUT)
            let data = isWrite ? Array(UnsafeRawBufferPointer(start: raw + dataOffset, count: length)) : []
            pendingRead = isWrite ? nil : .port(offset: dataOffset, length: length)
            return .portIO(port: io.port, size: Int(io.size), count: Int(io.count), isWrite: isWrite, data: data)
        case KVM_EXIT_MMIO:
            let mmio = run.pointee.mmio
            let length = min(Int(mmio.len), 8)
            let isWrite = mmio.is_write != 0
            let data = isWrite ? withUnsafeBytes(of: mmio.data) { Array($0.prefix(length)) } : []
            pendingRead = isWrite ? nil : .mmio(length: length)
            return .mmio(address: mmio.phys_addr, size: length, isWrite: isWrite, data: data)
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(type: run.pointee.system_event.type)
        case KVM_EXIT_INTR:
            return .interrupted
        case KVM_EXIT_INTERNAL_ERROR:
            return .internalError(suberror: run.pointee.internal.suberror)
        case KVM_EXIT_FAIL_ENTRY:
            return .failedEntry(reason: run.pointee.fail_entry.hardware_entry_failure_reason)
        default:
            return .other(reason: run.pointee.exit_reason)
        }
    }

    private enum PendingRead { case port(offset: Int, length: Int), mmio(length: Int) }
    private var pendingRead: PendingRead?
    /// Whether the last exit left KVM with work to finish on the next `KVM_RUN` (an `in` whose value
    /// goes to RAX, the RIP advance past an `out` or MMIO access).
    private var exitPendingInKernel = false

    /// Lets KVM finish the last exit without running any further guest instruction: `KVM_RUN` with
    /// `immediate_exit` set completes a pending port or MMIO access and returns `EINTR`. KVM keeps
    /// that pending work where `KVM_GET_*` cannot see it, so a vCPU's state is consistent, and fit
    /// to save, only after this (KVM API documentation, `KVM_RUN`, `immediate_exit`).
    ///
    /// Returns nil when nothing is left pending. A string instruction can make KVM exit once more
    /// instead: the new exit is returned, and the caller handles it and calls again. Call this on
    /// the thread that runs the vCPU, with every earlier read answered (`completeRead(_:)`);
    /// `immediate_exit` stays set afterwards.
    public func completePendingExit() throws -> VCPUExit? {
        guard exitPendingInKernel else { return nil }
        setImmediateExit(true)
        let exit = try runOnce()
        return exit == .interrupted ? nil : exit
    }

    /// Supplies the bytes a guest read (port or MMIO) returns; shorter data is padded with 0xFF,
    /// which is what reading an absent device yields.
    public func completeRead(_ bytes: [UInt8]) {
        guard let pending = pendingRead else { return }
        pendingRead = nil
        switch pending {
        case let .port(offset, length):
            let destination = UnsafeMutableRawPointer(run) + offset
            for index in 0..<length {
                destination.storeBytes(of: index < bytes.count ? bytes[index] : 0xFF, toByteOffset: index, as: UInt8.self)
            }
        case let .mmio(length):
            withUnsafeMutableBytes(of: &run.pointee.mmio.data) { buffer in
                for index in 0..<length {
                    buffer[index] = index < bytes.count ? bytes[index] : 0xFF
                }
            }
        }
    }

    /// Makes the next or current `KVM_RUN` return at once (`kvm_run.immediate_exit`). Safe from any thread;
    /// pair it with a signal to the vCPU thread to interrupt a run already in progress.
    public func setImmediateExit(_ on: Bool) {
        withUnsafeMutablePointer(to: &run.pointee.immediate_exit) { pointer in
            UnsafeMutableRawPointer(pointer).storeBytes(of: on ? 1 : 0, as: UInt8.self)
        }
    }

    // MARK: Registers

    public func registers() throws -> Registers {
        var regs = kvm_regs()
        try systemCall("KVM_GET_REGS(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_GET_REGS, &regs) }
        return Registers(regs)
    }

    public func setRegisters(_ registers: Registers) throws {
        var regs = registers.raw
        try systemCall("KVM_SET_REGS(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_SET_REGS, &regs) }
    }

    public func specialRegisters() throws -> SpecialRegisters {
        var sregs = kvm_sregs()
        try systemCall("KVM_GET_SREGS(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_GET_SREGS, &sregs) }
        return SpecialRegisters(sregs)
    }

    public func setSpecialRegisters(_ registers: SpecialRegisters) throws {
        var sregs = registers.raw
        try systemCall("KVM_SET_SREGS(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_SET_SREGS, &sregs) }
    }

    /// Puts the x87 and SSE units in their power-on state: control word 0x37F, MXCSR 0x1F80
    /// (Intel SDM Vol. 3A, 9.1.1 "Processor State After Reset"), everything else zero.
    public func resetFPU() throws {
        var fpu = kvm_fpu()
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        try systemCall("KVM_SET_FPU(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_SET_FPU, &fpu) }
    }

    /// The x87/SSE state (`struct kvm_fpu`), for hosts without `KVM_CAP_XSAVE`.
    public func fpu() throws -> [UInt8] {
        try getBlob(kvm_fpu(), CKVM_GET_FPU, "KVM_GET_FPU")
    }

    public func setFPU(_ bytes: [UInt8]) throws {
        try setBlob(bytes, as: kvm_fpu(), CKVM_SET_FPU, "KVM_SET_FPU")
    }

    /// The CPUID table set on this vCPU (`KVM_GET_CPUID2`); empty before `setCPUID(_:)`.
    public func cpuid() throws -> [CPUIDEntry] {
        let list = FlexibleArray<kvm_cpuid2, kvm_cpuid_entry2>(capacity: KVMSystem.maxCPUIDEntries)
        list.header.pointee.nent = UInt32(KVMSystem.maxCPUIDEntries)
        try systemCall("KVM_GET_CPUID2(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_GET_CPUID2, list.pointer) }
        let count = min(Int(list.header.pointee.nent), KVMSystem.maxCPUIDEntries)
        return (0..<count).map { CPUIDEntry(list[$0]) }
    }

    /// The guest's TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    public func tscKHz() throws -> UInt32 {
        UInt32(try systemCall("KVM_GET_TSC_KHZ(vCPU \(id))") { ckvm_ioctl_value(fd, CKVM_GET_TSC_KHZ, 0) })
    }

    /// Scales the guest's TSC to `kHz` (`KVM_SET_TSC_KHZ`; needs `KVM_CAP_TSC_CONTROL` unless it is
    /// the host's own frequency).
    public func setTSCKHz(_ kHz: UInt32) throws {
        try systemCall("KVM_SET_TSC_KHZ(vCPU \(id))") { ckvm_ioctl_value(fd, CKVM_SET_TSC_KHZ, UInt(kHz)) }
    }

    public func setCPUID(_ entries: [CPUIDEntry]) throws {
        var list = FlexibleArray<kvm_cpuid2, kvm_cpuid_entry2>(capacity: entries.count)
        list.header.pointee.nent = UInt32(entries.count)
        for (index, entry) in entries.enumerated() {
            list[index] = entry.raw
        }
        try systemCall("KVM_SET_CPUID2(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_SET_CPUID2, list.pointer) }
    }

    /// Reads the given MSRs; MSRs KVM cannot read on this vCPU are left out of the result.
    /// (`KVM_GET_MSRS` stops at the first MSR it cannot read and returns how many it read, so the
    /// rest is asked again after skipping that one.)
    public func msrs(_ indices: [UInt32]) throws -> [MSREntry] {
        var result: [MSREntry] = []
        var remaining = indices[...]
        while !remaining.isEmpty {
            let chunk = Array(remaining.prefix(Self.msrsPerCall))
            let read = try readMSRs(chunk)
            result += read
            // A short read means chunk[read.count] was refused: skip it and go on after it.
            remaining = remaining.dropFirst(read.count < chunk.count ? read.count + 1 : chunk.count)
        }
        return result
    }

    private func readMSRs(_ indices: [UInt32]) throws -> [MSREntry] {
        var list = FlexibleArray<kvm_msrs, kvm_msr_entry>(capacity: indices.count)
        list.header.pointee.nmsrs = UInt32(indices.count)
        for (position, index) in indices.enumerated() {
            var entry = kvm_msr_entry()
            entry.index = index
            list[position] = entry
        }
        let read = try systemCall("KVM_GET_MSRS(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_GET_MSRS, list.pointer) }
        return (0..<min(Int(read), indices.count)).map { MSREntry(index: list[$0].index, data: list[$0].data) }
    }

    /// Writes MSRs in the order given; fails naming the first MSR KVM refused.
    public func setMSRs(_ entries: [MSREntry]) throws {
        var start = 0
        while start < entries.count {
            let chunk = entries[start..<min(start + Self.msrsPerCall, entries.count)]
            var list = FlexibleArray<kvm_msrs, kvm_msr_entry>(capacity: chunk.count)
            list.header.pointee.nmsrs = UInt32(chunk.count)
            for (position, msr) in chunk.enumerated() {
                var entry = kvm_msr_entry()
                entry.index = msr.index
                entry.data = msr.data
                list[position] = entry
            }
            let written = try systemCall("KVM_SET_MSRS(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_SET_MSRS, list.pointer) }
            if Int(written) < chunk.count {
                let refused = chunk[chunk.startIndex + Int(written)]
                throw SystemError("KVM_SET_MSRS(vCPU \(id))", errno: 0,
                               detail: "KVM refused MSR 0x\(String(refused.index, radix: 16)) = 0x\(String(refused.data, radix: 16))")
            }
            start += chunk.count
        }
    }

    // MARK: Opaque state blobs

    /// The local APIC's register page (`struct kvm_lapic_state`, 1 KiB).
    public func localAPIC() throws -> [UInt8] {
        try getBlob(kvm_lapic_state(), CKVM_GET_LAPIC, "KVM_GET_LAPIC")
    }

    public func setLocalAPIC(_ bytes: [UInt8]) throws {
        try setBlob(bytes, as: kvm_lapic_state(), CKVM_SET_LAPIC, "KVM_SET_LAPIC")
    }

    /// The multiprocessing state (`KVM_MP_STATE_*`).
    public func mpState() throws -> UInt32 {
        var state = kvm_mp_state()
        try systemCall("KVM_GET_MP_STATE(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_GET_MP_STATE, &state) }
        return state.mp_state
    }

    public func setMPState(_ value: UInt32) throws {
        var state = kvm_mp_state(mp_state: value)
        try systemCall("KVM_SET_MP_STATE(vCPU \(id))") { ckvm_ioctl_ptr(fd, CKVM_SET_MP_STATE, &state) }
    }

    /// Pending exceptions, interrupts and NMIs (`struct kvm_vcpu_events`).
    public func events() throws -> [UInt8] {
        try getBlob(kvm_vcpu_events(), CKVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS")
    }

    public func setEvents(_ bytes: [UInt8]) throws {
        try setBlob(bytes, as: kvm_vcpu_events(), CKVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS")
    }

    /// Extended processor state (`struct kvm_xsave`, legacy 4 KiB area).
    public func xsave() throws -> [UInt8] {
        try getBlob(kvm_xsave(), CKVM_GET_XSAVE, "KVM_GET_XSAVE")
    }

    public func setXSave(_ bytes: [UInt8]) throws {
        try setBlob(bytes, as: kvm_xsave(), CKVM_SET_XSAVE, "KVM_SET_XSAVE")
    }

    /// Extended control registers (`struct kvm_xcrs`).
    public func xcrs() throws -> [UInt8] {
        try getBlob(kvm_xcrs(), CKVM_GET_XCRS, "KVM_GET_XCRS")
    }

    public func setXCRs(_ bytes: [UInt8]) throws {
        try setBlob(bytes, as: kvm_xcrs(), CKVM_SET_XCRS, "KVM_SET_XCRS")
    }

    /// Debug registers (`struct kvm_debugregs`).
    public func debugRegisters() throws -> [UInt8] {
        try getBlob(kvm_debugregs(), CKVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS")
    }

    public func setDebugRegisters(_ bytes: [UInt8]) throws {
        try setBlob(bytes, as: kvm_debugregs(), CKVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS")
    }

    private func getBlob<T>(_ initial: T, _ request: UInt, _ name: String) throws -> [UInt8] {
        var state = initial
        _ = try withUnsafeMutableBytes(of: &state) { buffer in
            try systemCall("\(name)(vCPU \(id))") { ckvm_ioctl_ptr(fd, request, buffer.baseAddress) }
        }
        return rawBytes(of: state)
    }

    private func setBlob<T>(_ bytes: [UInt8], as empty: T, _ request: UInt, _ name: String) throws {
        var state = try value(empty, from: bytes, operation: "\(name)(vCPU \(id))")
        _ = try withUnsafeMutableBytes(of: &state) { buffer in
            try systemCall("\(name)(vCPU \(id))") { ckvm_ioctl_ptr(fd, request, buffer.baseAddress) }
        }
    }
}
