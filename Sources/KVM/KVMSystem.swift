import CKVM
import HostOS
#if canImport(Glibc)
import Glibc
#endif

/// The KVM subsystem: an open `/dev/kvm`.
public final class KVMSystem: Sendable {
    /// The only KVM API version there has ever been (`KVM_GET_API_VERSION`).
    public static let expectedAPIVersion: Int32 = 12
    /// Upper bound on CPUID leaves asked of `KVM_GET_SUPPORTED_CPUID`; KVM answers E2BIG if too small.
    static let maxCPUIDEntries = 256
    /// Upper bound on MSR indices asked of `KVM_GET_MSR_INDEX_LIST`.
    static let maxMSRIndices = 1024

    public static let devicePath = "/dev/kvm"

    let descriptor: FileDescriptor

    /// Whether this machine has a usable `/dev/kvm` (tests use this to skip with a reason).
    public static var isAvailable: Bool {
        access(devicePath, R_OK | W_OK) == 0
    }

    public init(path: String = KVMSystem.devicePath) throws {
        let fd = try systemCall("open(\(path))") { open(path, O_RDWR | O_CLOEXEC) }
        descriptor = FileDescriptor(fd)
        let version = try systemCall("KVM_GET_API_VERSION") { ckvm_ioctl_value(fd, CKVM_GET_API_VERSION, 0) }
        guard version == Self.expectedAPIVersion else {
            throw SystemError("KVM_GET_API_VERSION", errno: 0,
                           detail: "API version \(version), Ferry needs \(Self.expectedAPIVersion)")
        }
    }

    /// `KVM_CHECK_EXTENSION`: 0 when the capability is absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        max(0, ckvm_ioctl_value(descriptor.rawValue, CKVM_CHECK_EXTENSION, UInt(capability)))
    }

    /// Fails with an error naming the capability unless KVM offers it.
    public func require(_ capability: Int32, named name: String) throws {
        if checkExtension(capability) == 0 {
            throw SystemError("KVM_CHECK_EXTENSION", errno: 0, detail: "KVM lacks \(name)")
        }
    }

    var vcpuMmapSize: Int {
        get throws {
            Int(try systemCall("KVM_GET_VCPU_MMAP_SIZE") {
                ckvm_ioctl_value(descriptor.rawValue, CKVM_GET_VCPU_MMAP_SIZE, 0)
            })
        }
    }

    /// The CPUID leaves KVM can present to a guest on this host (`KVM_GET_SUPPORTED_CPUID`).
    public func supportedCPUID() throws -> [CPUIDEntry] {
        let list = FlexibleArray<kvm_cpuid2, kvm_cpuid_entry2>(capacity: Self.maxCPUIDEntries)
        list.header.pointee.nent = UInt32(Self.maxCPUIDEntries)
        try systemCall("KVM_GET_SUPPORTED_CPUID") {
            ckvm_ioctl_ptr(descriptor.rawValue, CKVM_GET_SUPPORTED_CPUID, list.pointer)
        }
        let count = Int(list.header.pointee.nent)
        return (0..<count).map { CPUIDEntry(list[$0]) }
    }

    /// The MSR indices KVM saves and restores for a vCPU (`KVM_GET_MSR_INDEX_LIST`).
    public func msrIndexList() throws -> [UInt32] {
        let list = FlexibleArray<kvm_msr_list, UInt32>(capacity: Self.maxMSRIndices)
        list.header.pointee.nmsrs = UInt32(Self.maxMSRIndices)
        try systemCall("KVM_GET_MSR_INDEX_LIST") {
            ckvm_ioctl_ptr(descriptor.rawValue, CKVM_GET_MSR_INDEX_LIST, list.pointer)
        }
        let count = Int(list.header.pointee.nmsrs)
        return (0..<count).map { list[$0] }
    }

    /// Creates a VM (`KVM_CREATE_VM`, default machine type).
    public func createVM() throws -> KVMVirtualMachine {
        let fd = try systemCall("KVM_CREATE_VM") { ckvm_ioctl_value(descriptor.rawValue, CKVM_CREATE_VM, 0) }
        return KVMVirtualMachine(descriptor: FileDescriptor(fd), vcpuMmapSize: try vcpuMmapSize)
    }
}

/// The KVM capabilities Ferry checks for (`KVM_CAP_*`).
public enum KVMCapability {
    public static let irqchip = CKVM_CAP_IRQCHIP
    public static let immediateExit = CKVM_CAP_IMMEDIATE_EXIT
    public static let maxVCPUs = CKVM_CAP_MAX_VCPUS
    public static let pit2 = CKVM_CAP_PIT2
    public static let ioeventfd = CKVM_CAP_IOEVENTFD
    public static let irqfd = CKVM_CAP_IRQFD
    public static let irqRouting = CKVM_CAP_IRQ_ROUTING
}
