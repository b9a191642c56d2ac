#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include "CTestSupport.h"

int ferry_test_enter_netns(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    int result = setns(fd, CLONE_NEWNET) < 0 ? -errno : 0;
    close(fd);
    return result;
}

int ferry_test_packet_socket(const char *interface) {
    int fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, htons(ETH_P_ALL));
    if (fd < 0) return -errno;
    struct sockaddr_ll address;
    memset(&address, 0, sizeof address);
    address.sll_family = AF_PACKET;
    address.sll_protocol = htons(ETH_P_ALL);
    address.sll_ifindex = (int)if_nametoindex(interface);
    if (address.sll_ifindex == 0 || bind(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    return fd;
}

static int fill_address(struct sockaddr_in *address, const char *ip, int port) {
    memset(address, 0, sizeof *address);
    address->sin_family = AF_INET;
    address->sin_port = htons((unsigned short)port);
    return inet_pton(AF_INET, ip, &address->sin_addr) == 1 ? 0 : -EINVAL;
}

int ferry_test_udp_socket(const char *ip, int port) {
    struct sockaddr_in address;
    if (fill_address(&address, ip, port) < 0) return -EINVAL;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int size = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    return fd;
}

long ferry_test_udp_send(int fd, const char *ip, int port, const void *bytes, unsigned long length) {
    struct sockaddr_in address;
    if (fill_address(&address, ip, port) < 0) return -EINVAL;
    long sent = sendto(fd, bytes, length, 0, (struct sockaddr *)&address, sizeof address);
    return sent < 0 ? -errno : sent;
}

long ferry_test_receive(int fd, void *bytes, unsigned long capacity, int timeout_ms) {
    struct pollfd entry = { .fd = fd, .events = POLLIN };
    int ready = poll(&entry, 1, timeout_ms);
    if (ready < 0) return -errno;
    if (ready == 0) return -EAGAIN;
    long received = recv(fd, bytes, capacity, 0);
    return received < 0 ? -errno : received;
}
