// The few C functions whose declarations need _GNU_SOURCE, which the Swift importer's view of
// the C library does not define: Linux's O_DIRECT, fallocate(2) modes, memfd_create(2), the
// pseudo-terminal calls and descriptors passed over Unix sockets.
#define _GNU_SOURCE
#include <fcntl.h>
#include <errno.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/socket.h>
#include <unistd.h>
#include "CKVM.h"

int ckvm_open_pty(char *path, size_t size) {
    int main = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (main < 0) return -1;
    int error = 0;
    if (grantpt(main) != 0 || unlockpt(main) != 0) error = errno;
    else error = ptsname_r(main, path, size);
    if (error != 0) {
        close(main);
        errno = error;
        return -1;
    }
    return main;
}

long ckvm_receive_with_descriptors(int socket, void *buffer, size_t size, int *descriptors, int capacity, int *count, int dontwait) {
    enum { most = 64 };
    union {
        char bytes[CMSG_SPACE(most * sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec vector = { .iov_base = buffer, .iov_len = size };
    struct msghdr message = {
        .msg_iov = &vector, .msg_iovlen = 1,
        .msg_control = control.bytes, .msg_controllen = sizeof control.bytes,
    };
    *count = 0;
    ssize_t received = recvmsg(socket, &message, MSG_CMSG_CLOEXEC | (dontwait ? MSG_DONTWAIT : 0));
    if (received < 0) return -1;
    for (struct cmsghdr *header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
        if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        int *passed = (int *)CMSG_DATA(header);
        for (size_t i = 0; i < n; i++) {
            if (*count >= 0 && *count < capacity) descriptors[(*count)++] = passed[i];
            else close(passed[i]);
        }
    }
    if (message.msg_flags & MSG_CTRUNC) {
        for (int i = 0; i < *count; i++) close(descriptors[i]);
        *count = -1;
    }
    return (long)received;
}

long ckvm_send_with_descriptor(int socket, const void *buffer, size_t size, int descriptor) {
    union {
        char bytes[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec vector = { .iov_base = (void *)buffer, .iov_len = size };
    struct msghdr message = {
        .msg_iov = &vector, .msg_iovlen = 1,
        .msg_control = control.bytes, .msg_controllen = sizeof control.bytes,
    };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &descriptor, sizeof(int));
    return (long)sendmsg(socket, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
}

int ckvm_memfd(const char *name) {
    return memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
}

int ckvm_seal_size(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
}

int ckvm_is_sealed_shared_memory(int fd) {
    struct statfs filesystem;
    if (fstatfs(fd, &filesystem) != 0 || filesystem.f_type != TMPFS_MAGIC) return 0;
    int seals = fcntl(fd, F_GET_SEALS);
    return seals >= 0 && (seals & F_SEAL_SHRINK) != 0;
}

int ckvm_open_direct_flag(void) {
    return O_DIRECT;
}

int ckvm_fallocate(int fd, int punch_hole, long long offset, long long length) {
    int mode = FALLOC_FL_KEEP_SIZE | (punch_hole ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE);
    return fallocate(fd, mode, offset, length);
}

static void interface_request(struct ifreq *request, const char *name) {
    memset(request, 0, sizeof *request);
    strncpy(request->ifr_name, name, IFNAMSIZ - 1);
}

int ckvm_tap_open(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return -errno;
    struct ifreq request;
    interface_request(&request, name);
    request.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if (ioctl(fd, TUNSETIFF, &request) < 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    return fd;
}

int ckvm_tap_query(int fd, char *name, int *flags) {
    struct ifreq request;
    memset(&request, 0, sizeof request);
    if (ioctl(fd, TUNGETIFF, &request) < 0) return -errno;
    memcpy(name, request.ifr_name, IFNAMSIZ);
    name[IFNAMSIZ - 1] = '\0';
    *flags = request.ifr_flags;
    return 0;
}

int ckvm_tap_set_vnet_header_size(int fd, int size) {
    return ioctl(fd, TUNSETVNETHDRSZ, &size) < 0 ? -errno : 0;
}

int ckvm_tap_set_offload(int fd, unsigned flags) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags) < 0 ? -errno : 0;
}

// SIOCSIFADDR or SIOCSIFNETMASK: an IPv4 value for `name` (network byte order).
static int set_ipv4(int sock, const char *name, unsigned long request, unsigned value) {
    struct ifreq ifr;
    interface_request(&ifr, name);
    struct sockaddr_in *in = (struct sockaddr_in *)&ifr.ifr_addr;   // ifr_netmask shares the union
    in->sin_family = AF_INET;
    in->sin_addr.s_addr = value;
    return ioctl(sock, request, &ifr) < 0 ? -errno : 0;
}

int ckvm_interface_configure(const char *name, unsigned address, unsigned netmask) {
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -errno;
    int result = address != 0 ? set_ipv4(sock, name, SIOCSIFADDR, address) : 0;
    if (result == 0 && netmask != 0) result = set_ipv4(sock, name, SIOCSIFNETMASK, netmask);
    if (result == 0) {
        struct ifreq request;
        interface_request(&request, name);
        if (ioctl(sock, SIOCGIFFLAGS, &request) < 0) {
            result = -errno;
        } else {
            request.ifr_flags |= IFF_UP;
            if (ioctl(sock, SIOCSIFFLAGS, &request) < 0) result = -errno;
        }
    }
    close(sock);
    return result;
}

_Static_assert(CKVM_TUNSETOFFLOAD == TUNSETOFFLOAD, "CKVM_TUNSETOFFLOAD is linux/if_tun.h's TUNSETOFFLOAD");
_Static_assert(CKVM_TUNSETVNETHDRSZ == TUNSETVNETHDRSZ, "CKVM_TUNSETVNETHDRSZ is linux/if_tun.h's TUNSETVNETHDRSZ");
