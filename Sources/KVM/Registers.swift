import CKVM

/// General-purpose registers, instruction pointer and flags (`struct kvm_regs`).
public struct Registers: Codable, Equatable, Sendable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0
    /// Bit 1 of RFLAGS is reserved and always set.
    public var rflags: UInt64 = 0x2

    public init() {}

    init(_ raw: kvm_regs) {
        rax = raw.rax; rbx = raw.rbx; rcx = raw.rcx; rdx = raw.rdx
        rsi = raw.rsi; rdi = raw.rdi; rsp = raw.rsp; rbp = raw.rbp
        r8 = raw.r8; r9 = raw.r9; r10 = raw.r10; r11 = raw.r11
        r12 = raw.r12; r13 = raw.r13; r14 = raw.r14; r15 = raw.r15
        rip = raw.rip; rflags = raw.rflags
    }

    var raw: kvm_regs {
        var regs = kvm_regs()
        regs.rax = rax; regs.rbx = rbx; regs.rcx = rcx; regs.rdx = rdx
        regs.rsi = rsi; regs.rdi = rdi; regs.rsp = rsp; regs.rbp = rbp
        regs.r8 = r8; regs.r9 = r9; regs.r10 = r10; regs.r11 = r11
        regs.r12 = r12; regs.r13 = r13; regs.r14 = r14; regs.r15 = r15
        regs.rip = rip; regs.rflags = rflags
        return regs
    }
}

/// A segment register's hidden part (`struct kvm_segment`).
public struct Segment: Codable, Equatable, Sendable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0
    public var selector: UInt16 = 0
    public var type: UInt8 = 0
    public var present: Bool = false
    public var dpl: UInt8 = 0
    /// D/B: default operand size 32 bits.
    public var defaultSize32: Bool = false
    /// S: code or data (as opposed to system) segment.
    public var codeOrData: Bool = false
    /// L: 64-bit code segment.
    public var long: Bool = false
    /// G: limit counted in 4 KiB units.
    public var granularity: Bool = false
    public var available: Bool = false
    public var unusable: Bool = false

    public init() {}

    /// Decodes a GDT descriptor as the processor would load it for `selector`.
    public init(descriptor: UInt64, selector: UInt16) {
        base = ((descriptor >> 16) & 0xFF_FFFF) | (((descriptor >> 56) & 0xFF) << 24)
        let rawLimit = UInt32((descriptor & 0xFFFF) | (((descriptor >> 48) & 0xF) << 16))
        granularity = (descriptor >> 55) & 1 == 1
        limit = granularity ? (rawLimit << 12) | 0xFFF : rawLimit
        self.selector = selector
        type = UInt8((descriptor >> 40) & 0xF)
        codeOrData = (descriptor >> 44) & 1 == 1
        dpl = UInt8((descriptor >> 45) & 0x3)
        present = (descriptor >> 47) & 1 == 1
        available = (descriptor >> 52) & 1 == 1
        long = (descriptor >> 53) & 1 == 1
        defaultSize32 = (descriptor >> 54) & 1 == 1
        unusable = !present
    }

    init(_ raw: kvm_segment) {
        base = raw.base; limit = raw.limit; selector = raw.selector; type = raw.type
        present = raw.present != 0; dpl = raw.dpl; defaultSize32 = raw.db != 0; codeOrData = raw.s != 0
        long = raw.l != 0; granularity = raw.g != 0; available = raw.avl != 0; unusable = raw.unusable != 0
    }

    var raw: kvm_segment {
        var segment = kvm_segment()
        segment.base = base; segment.limit = limit; segment.selector = selector; segment.type = type
        segment.present = present ? 1 : 0; segment.dpl = dpl; segment.db = defaultSize32 ? 1 : 0
        segment.s = codeOrData ? 1 : 0; segment.l = long ? 1 : 0; segment.g = granularity ? 1 : 0
        segment.avl = available ? 1 : 0; segment.unusable = unusable ? 1 : 0
        return segment
    }
}

/// A descriptor table register (`struct kvm_dtable`): GDTR or IDTR.
public struct DescriptorTable: Codable, Equatable, Sendable {
    public var base: UInt64 = 0
    public var limit: UInt16 = 0

    public init(base: UInt64 = 0, limit: UInt16 = 0) {
        self.base = base
        self.limit = limit
    }
}

/// Segment, control and system registers (`struct kvm_sregs`).
public struct SpecialRegisters: Codable, Equatable, Sendable {
    public var cs = Segment(), ds = Segment(), es = Segment(), fs = Segment(), gs = Segment(), ss = Segment()
    public var tr = Segment(), ldt = Segment()
    public var gdt = DescriptorTable(), idt = DescriptorTable()
    public var cr0: UInt64 = 0, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
    public var efer: UInt64 = 0
    public var apicBase: UInt64 = 0
    /// Pending external interrupts, one bit per vector (`interrupt_bitmap`).
    public var interruptBitmap: [UInt64] = [0, 0, 0, 0]

    public init() {}

    init(_ raw: kvm_sregs) {
        cs = Segment(raw.cs); ds = Segment(raw.ds); es = Segment(raw.es)
        fs = Segment(raw.fs); gs = Segment(raw.gs); ss = Segment(raw.ss)
        tr = Segment(raw.tr); ldt = Segment(raw.ldt)
        gdt = DescriptorTable(base: raw.gdt.base, limit: raw.gdt.limit)
        idt = DescriptorTable(base: raw.idt.base, limit: raw.idt.limit)
        cr0 = raw.cr0; cr2 = raw.cr2; cr3 = raw.cr3; cr4 = raw.cr4; cr8 = raw.cr8
        efer = raw.efer; apicBase = raw.apic_base
        interruptBitmap = withUnsafeBytes(of: raw.interrupt_bitmap) { Array($0.bindMemory(to: UInt64.self)) }
    }

    var raw: kvm_sregs {
        var sregs = kvm_sregs()
        sregs.cs = cs.raw; sregs.ds = ds.raw; sregs.es = es.raw
        sregs.fs = fs.raw; sregs.gs = gs.raw; sregs.ss = ss.raw
        sregs.tr = tr.raw; sregs.ldt = ldt.raw
        sregs.gdt.base = gdt.base; sregs.gdt.limit = gdt.limit
        sregs.idt.base = idt.base; sregs.idt.limit = idt.limit
        sregs.cr0 = cr0; sregs.cr2 = cr2; sregs.cr3 = cr3; sregs.cr4 = cr4; sregs.cr8 = cr8
        sregs.efer = efer; sregs.apic_base = apicBase
        withUnsafeMutableBytes(of: &sregs.interrupt_bitmap) { buffer in
            for (index, word) in interruptBitmap.prefix(4).enumerated() {
                buffer.storeBytes(of: word, toByteOffset: index * 8, as: UInt64.self)
            }
        }
        return sregs
    }
}
