import CKVM

/// One CPUID leaf as KVM describes it (`struct kvm_cpuid_entry2`).
public struct CPUIDEntry: Codable, Equatable, Sendable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0,
                eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx
    }

    init(_ raw: kvm_cpuid_entry2) {
        self.init(function: raw.function, index: raw.index, flags: raw.flags,
                  eax: raw.eax, ebx: raw.ebx, ecx: raw.ecx, edx: raw.edx)
    }

    var raw: kvm_cpuid_entry2 {
        var entry = kvm_cpuid_entry2()
        entry.function = function
        entry.index = index
        entry.flags = flags
        entry.eax = eax
        entry.ebx = ebx
        entry.ecx = ecx
        entry.edx = edx
        return entry
    }
}

/// One model-specific register and its value (`struct kvm_msr_entry`).
public struct MSREntry: Codable, Equatable, Sendable {
    public var index: UInt32
    public var data: UInt64

    public init(index: UInt32, data: UInt64) {
        self.index = index
        self.data = data
    }
}

/// A header struct followed by a flexible array of entries, as `kvm_cpuid2`, `kvm_msrs` and
/// `kvm_msr_list` are laid out; Swift does not import flexible array members, so this type owns the
/// allocation and bounds-checks every access to the entries.
struct FlexibleArray<Header, Entry>: ~Copyable {
    let capacity: Int
    private let storage: UnsafeMutableRawPointer
    private let entriesOffset: Int

    init(capacity: Int) {
        self.capacity = capacity
        entriesOffset = MemoryLayout<Header>.size
        let size = entriesOffset + capacity * MemoryLayout<Entry>.stride
        storage = UnsafeMutableRawPointer.allocate(
            byteCount: size, alignment: max(MemoryLayout<Header>.alignment, MemoryLayout<Entry>.alignment))
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: size)
    }

    deinit {
        storage.deallocate()
    }

    var header: UnsafeMutablePointer<Header> {
        storage.assumingMemoryBound(to: Header.self)
    }

    var pointer: UnsafeMutableRawPointer { storage }

    subscript(index: Int) -> Entry {
        get {
            precondition(index >= 0 && index < capacity, "flexible array index out of range")
            return storage.load(fromByteOffset: entriesOffset + index * MemoryLayout<Entry>.stride, as: Entry.self)
        }
        set {
            precondition(index >= 0 && index < capacity, "flexible array index out of range")
            storage.storeBytes(of: newValue, toByteOffset: entriesOffset + index * MemoryLayout<Entry>.stride,
                               as: Entry.self)
        }
    }
}
