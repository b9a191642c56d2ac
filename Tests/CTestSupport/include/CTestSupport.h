// Calls tests need that glibc declares only with _GNU_SOURCE, which Swift's Glibc module does
// not define (scheduling, setns), or whose structures Swift cannot build portably (sockets).
#ifndef FERRY_CTESTSUPPORT_H
#define FERRY_CTESTSUPPORT_H

/// Lets the calling thread run only on CPU `cpu`; 0 on success, -1 with errno set.
int ferry_test_pin_thread(int cpu);

/// Lets the calling thread run on every CPU of the machine again.
int ferry_test_unpin_thread(void);

/// The lowest-numbered CPU the calling thread may run on, or -1.
int ferry_test_first_cpu(void);

/// Moves the calling thread into the network namespace at `path` (/run/netns/NAME); 0 or -errno.
/// Sockets it opens afterwards belong to that namespace, whichever thread uses them.
int ferry_test_enter_netns(const char *path);

/// An AF_PACKET socket on `interface` that sees every frame on it and sends raw frames; fd or -errno.
int ferry_test_packet_socket(const char *interface);

/// A UDP socket bound to `ip`:`port` (port 0: any), with a 4 MiB receive buffer; fd or -errno.
int ferry_test_udp_socket(const char *ip, int port);

/// sendto(2) to `ip`:`port`; bytes sent or -errno.
long ferry_test_udp_send(int fd, const char *ip, int port, const void *bytes, unsigned long length);

/// Waits at most `timeout_ms` for one datagram or frame; its length, -EAGAIN on timeout, or -errno.
long ferry_test_receive(int fd, void *bytes, unsigned long capacity, int timeout_ms);

#endif
