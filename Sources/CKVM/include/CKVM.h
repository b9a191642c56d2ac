// C shim: exposes <linux/kvm.h>'s ioctl numbers and constants to Swift.
//
// Swift cannot import function-like macros such as _IOW, so every request number Ferry uses is
// re-exported here as a constant. ioctl(2) is variadic, which Swift cannot call either; the two
// inline wrappers give it a fixed signature. Besides: the system calls around KVM that Swift's
// view of the C library lacks (eventfd, O_DIRECT, fallocate, thread names).
#ifndef FERRY_CKVM_H
#define FERRY_CKVM_H

#include <linux/kvm.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>

static inline int ckvm_ioctl_ptr(int fd, unsigned long request, void *argument) {
    return ioctl(fd, request, argument);
}

static inline int ckvm_ioctl_value(int fd, unsigned long request, unsigned long argument) {
    return ioctl(fd, request, argument);
}

// KVM_SET_GSI_ROUTING takes a header followed by a flexible array, which Swift cannot build.
static inline int ckvm_set_gsi_routing(int fd, const struct kvm_irq_routing_entry *entries, unsigned count) {
    struct kvm_irq_routing *table = calloc(1, sizeof(*table) + count * sizeof(*entries));
    if (!table) return -1;
    table->nr = count;
    for (unsigned i = 0; i < count; i++) table->entries[i] = entries[i];
    int result = ioctl(fd, KVM_SET_GSI_ROUTING, table);
    free(table);
    return result;
}

// eventfd(2): <sys/eventfd.h> does not reach Swift through Glibc. Close-on-exec, non-blocking.
static inline int ckvm_eventfd(void) {
    return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
}

// File I/O for disk images (shim.c): O_DIRECT, and fallocate(2) punching a hole (discard) or
// zeroing a range (write-zeroes) without changing the file's size.
int ckvm_open_direct_flag(void);
int ckvm_fallocate(int fd, int punch_hole, long long offset, long long length);

/// Opens a new pseudo-terminal's main side (read-write, close-on-exec, not the controlling
/// terminal), unlocked, and writes its subsidiary's path into `path`. Returns the descriptor, or -1
/// with errno set.
int ckvm_open_pty(char *path, size_t size);

/// recvmsg(2) of up to `size` bytes from stream socket `socket`, with the descriptors that came
/// with them (SCM_RIGHTS, received close-on-exec) written to `descriptors` (at most `capacity`;
/// more are closed) and their number to `count`. Returns the bytes read, 0 at the end of the
/// stream, or -1 with errno set (EAGAIN with `dontwait` and nothing to read). A truncated control
/// message sets `count` to -1 after closing what it held.
long ckvm_receive_with_descriptors(int socket, void *buffer, size_t size, int *descriptors, int capacity, int *count, int dontwait);

/// sendmsg(2) of `size` bytes (at least 1) on stream socket `socket` with `descriptor` attached
/// (SCM_RIGHTS): the receiver gets it with the first of those bytes. Returns the bytes sent (the
/// rest, if any, goes without it) or -1 with errno set (EAGAIN when the socket has no room: it
/// never blocks).
long ckvm_send_with_descriptor(int socket, const void *buffer, size_t size, int descriptor);

/// memfd_create(2), close-on-exec and sealable: an anonymous file for guest RAM that another
/// process can map.
int ckvm_memfd(const char *name);
/// Seals a memfd's size (F_SEAL_SHRINK, F_SEAL_GROW): whoever maps it can rely on every page
/// staying there (a file that shrank under a mapping would fault its reader with SIGBUS).
int ckvm_seal_size(int fd);
/// 1 if `fd` is shared memory (tmpfs, not hugetlbfs) whose size can no longer shrink, else 0.
int ckvm_is_sealed_shared_memory(int fd);

// Tap devices (shim.c), whose ioctls take a struct ifreq that Swift cannot build portably. Each
// returns 0 or a descriptor on success and -errno on failure.
// Opens /dev/net/tun and attaches to the tap `name` (creating it if it does not exist) with
// IFF_VNET_HDR: close-on-exec and non-blocking.
int ckvm_tap_open(const char *name);
// The interface name and IFF_* flags of an open tun/tap descriptor (TUNGETIFF); `name` holds 16 bytes.
int ckvm_tap_query(int fd, char *name, int *flags);
int ckvm_tap_set_vnet_header_size(int fd, int size);
// TUNSETOFFLOAD with TUN_F_* bits: what the tap may hand over with partial checksums or unsegmented.
int ckvm_tap_set_offload(int fd, unsigned flags);
// Gives the interface `name` an IPv4 address and netmask (network byte order; 0 leaves them) and
// brings it up.
int ckvm_interface_configure(const char *name, unsigned address, unsigned netmask);
static const int CKVM_IFF_TAP = 0x0002;
static const int CKVM_IFF_VNET_HDR = 0x4000;
static const unsigned CKVM_TUN_F_CSUM = 0x01, CKVM_TUN_F_TSO4 = 0x02, CKVM_TUN_F_TSO6 = 0x04;
static const unsigned CKVM_TUN_F_TSO_ECN = 0x08, CKVM_TUN_F_UFO = 0x10;
static const unsigned long CKVM_SET_GSI_ROUTING = KVM_SET_GSI_ROUTING;
// The tap ioctls a guest's feature negotiation makes (on a vCPU thread), for the seccomp lists.
static const unsigned long CKVM_TUNSETOFFLOAD = 0x400454d0;     // _IOW('T', 208, unsigned int)
static const unsigned long CKVM_TUNSETVNETHDRSZ = 0x400454d8;   // _IOW('T', 216, int)

// System ioctls.
static const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;

// VM ioctls.
static const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long CKVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long CKVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long CKVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long CKVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long CKVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long CKVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long CKVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long CKVM_SET_CLOCK = KVM_SET_CLOCK;
static const unsigned long CKVM_IOEVENTFD = KVM_IOEVENTFD;
static const unsigned long CKVM_IRQFD = KVM_IRQFD;
static const unsigned long CKVM_SIGNAL_MSI = KVM_SIGNAL_MSI;

// vCPU ioctls.
static const unsigned long CKVM_RUN = KVM_RUN;
static const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CKVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CKVM_GET_CPUID2 = KVM_GET_CPUID2;
static const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long CKVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long CKVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long CKVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CKVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CKVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long CKVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long CKVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CKVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long CKVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long CKVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long CKVM_SET_TSC_KHZ = KVM_SET_TSC_KHZ;
static const unsigned long CKVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;

// Capabilities.
static const int CKVM_CAP_IRQCHIP = KVM_CAP_IRQCHIP;
static const int CKVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
static const int CKVM_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR;
static const int CKVM_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID;
static const int CKVM_CAP_PIT2 = KVM_CAP_PIT2;
static const int CKVM_CAP_NR_MEMSLOTS = KVM_CAP_NR_MEMSLOTS;
static const int CKVM_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS;
static const int CKVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
static const int CKVM_CAP_XSAVE = KVM_CAP_XSAVE;
static const int CKVM_CAP_XCRS = KVM_CAP_XCRS;
static const int CKVM_CAP_ADJUST_CLOCK = KVM_CAP_ADJUST_CLOCK;
static const int CKVM_CAP_TSC_CONTROL = KVM_CAP_TSC_CONTROL;
static const int CKVM_CAP_GET_TSC_KHZ = KVM_CAP_GET_TSC_KHZ;
static const int CKVM_CAP_IOEVENTFD = KVM_CAP_IOEVENTFD;
static const int CKVM_CAP_IRQFD = KVM_CAP_IRQFD;
static const int CKVM_CAP_IRQ_ROUTING = KVM_CAP_IRQ_ROUTING;

// Interrupt routing and eventfd bindings.
static const unsigned CKVM_IRQ_ROUTING_IRQCHIP = KVM_IRQ_ROUTING_IRQCHIP;
static const unsigned CKVM_IRQ_ROUTING_MSI = KVM_IRQ_ROUTING_MSI;
static const unsigned CKVM_IOEVENTFD_FLAG_DEASSIGN = KVM_IOEVENTFD_FLAG_DEASSIGN;
static const unsigned CKVM_IRQFD_FLAG_DEASSIGN = KVM_IRQFD_FLAG_DEASSIGN;

#endif
