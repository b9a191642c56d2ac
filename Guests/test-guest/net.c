/*
 * net.c - a minimal IPv4 stack on virtio-net (spec 5.1) for CPU 0 at CPL 3,
 * so that the host's own network stack can talk to the guest:
 *   - ARP: answers requests for net_ip; learns the peer's address from
 *     replies and from its IPv4 frames, and asks for it once a second until
 *     it knows it;
 *   - ICMP echo: answered (ping);
 *   - UDP port 7 (echo): each datagram is sent back to where it came from;
 *   - UDP port 9 (discard): counted; a datagram starting "STAT" is answered
 *     with the count and bytes received on port 9 so far (two u64, LE);
 *   - a stream of its own: net_stream_rate datagrams per second (or as many
 *     as the queue takes) of net_stream_bytes to net_peer:net_stream_port,
 *     each starting with its sequence number (u64, LE) from 0.
 * Polled every loop while frames flow, and on each timer tick once none has
 * for BUSY_TICKS (the first frame after a quiet spell waits up to a tick);
 * never waits itself. Checksums are complete both ways (no
 * offloads were negotiated). Frames it does not understand are ignored.
 */
#include "user.h"
#include "virtio.h"

#define ETH_HEADER      14
#define ETH_ARP         0x0806
#define ETH_IPV4        0x0800
#define IP_HEADER       20
#define IP_ICMP         1
#define IP_UDP          17
#define UDP_HEADER      8
#define PORT_ECHO       7
#define PORT_DISCARD    9
#define ARP_RETRY_TICKS TICK_HZ
#define BUSY_TICKS      (TICK_HZ / 5)   /* keep polling this long after the last frame */
#define FRAME_MAX       (NET_BUFFER_BYTES - NET_HEADER_BYTES)

static struct {
    int active;
    u32 ip, peer;
    u8 peer_mac[6];
    int peer_known;
    u64 next_arp;
    u32 free_tx[NET_QUEUE_SIZE];    /* descriptor numbers of idle transmit buffers */
    u32 free_count;
    u16 skip;                       /* used receive entries still to drop (a frame in several buffers) */
    u64 stream_seq, stream_start;
    u64 discard_frames, discard_bytes;
    u64 last_activity;              /* tick of the last frame received or sent */
} n;

static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)); put16(p + 2, (u16)v); }

/* The Internet checksum (RFC 1071) of len bytes. */
static u16 checksum(const u8 *p, u32 len)
{
    u64 sum = 0;
    for (u32 i = 0; i + 1 < len; i += 2)
        sum += get16(p + i);
    if (len & 1)
        sum += (u32)p[len - 1] << 8;
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (u16)~sum;
}

static void post_rx(u16 k)
{
    struct virtq *q = &virtio_net.vq[NET_RECEIVEQ];
    q->desc[k].addr = (u64)(net_area.rx + (u64)k * NET_BUFFER_BYTES);
    q->desc[k].len = NET_BUFFER_BYTES;
    q->desc[k].flags = VIRTQ_DESC_F_WRITE;
    q->desc[k].next = 0;
    virtq_add(q, k);
}

/* A transmit buffer's frame area (after the virtio-net header), or NULL if all are busy. */
static u8 *tx_begin(u32 *k)
{
    struct virtq *q = &virtio_net.vq[NET_TRANSMITQ];
    u32 id, len;
    while (virtq_take(q, &id, &len))
        if (id < NET_QUEUE_SIZE)
            n.free_tx[n.free_count++] = id;
    if (n.free_count == 0)
        return NULL;
    *k = n.free_tx[--n.free_count];
    u8 *buf = net_area.tx + (u64)*k * NET_BUFFER_BYTES;
    memset(buf, 0, NET_HEADER_BYTES);
    return buf + NET_HEADER_BYTES;
}

static void tx_send(u32 k, u32 frame_len)
{
    struct virtq *q = &virtio_net.vq[NET_TRANSMITQ];
    q->desc[k].addr = (u64)(net_area.tx + (u64)k * NET_BUFFER_BYTES);
    q->desc[k].len = NET_HEADER_BYTES + frame_len;
    q->desc[k].flags = 0;
    q->desc[k].next = 0;
    virtq_post(q, (u16)k);
}

static void eth_header(u8 *f, const u8 *dst, u16 type)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, net_area.mac, 6);
    put16(f + 12, type);
}

static void send_arp(u16 op, const u8 *dst_mac, const u8 *target_mac, u32 target_ip)
{
    u32 k;
    u8 *f = tx_begin(&k);
    if (!f)
        return;
    eth_header(f, dst_mac, ETH_ARP);
    u8 *a = f + ETH_HEADER;
    put16(a, 1);                    /* Ethernet */
    put16(a + 2, ETH_IPV4);
    a[4] = 6;
    a[5] = 4;
    put16(a + 6, op);
    memcpy(a + 8, net_area.mac, 6);
    put32(a + 14, n.ip);
    memcpy(a + 18, target_mac, 6);
    put32(a + 24, target_ip);
    tx_send(k, 60);                 /* the minimum Ethernet frame, padded with zeros */
}

/* An IPv4 header at p for a payload of len bytes. */
static void ip_header(u8 *p, u8 protocol, u32 dst, u32 len)
{
    p[0] = 0x45;
    p[1] = 0;
    put16(p + 2, (u16)(IP_HEADER + len));
    put16(p + 4, 0);
    put16(p + 6, 0x4000);           /* don't fragment */
    p[8] = 64;
    p[9] = protocol;
    put16(p + 10, 0);
    put32(p + 12, n.ip);
    put32(p + 16, dst);
    put16(p + 10, checksum(p, IP_HEADER));
}

/* A UDP datagram (checksum 0: none, as IPv4 allows) with len payload bytes already at its place. */
static void udp_finish(u32 k, u8 *f, const u8 *dst_mac, u32 dst, u16 src_port, u16 dst_port, u32 len)
{
    eth_header(f, dst_mac, ETH_IPV4);
    u8 *u = f + ETH_HEADER + IP_HEADER;
    put16(u, src_port);
    put16(u + 2, dst_port);
    put16(u + 4, (u16)(UDP_HEADER + len));
    put16(u + 6, 0);
    ip_header(f + ETH_HEADER, IP_UDP, dst, UDP_HEADER + len);
    u32 frame = ETH_HEADER + IP_HEADER + UDP_HEADER + len;
    tx_send(k, frame < 60 ? 60 : frame);
}

static void handle_arp(const u8 *f, u32 len)
{
    if (len < ETH_HEADER + 28)
        return;
    const u8 *a = f + ETH_HEADER;
    if (get16(a) != 1 || get16(a + 2) != ETH_IPV4 || a[4] != 6 || a[5] != 4)
        return;
    u32 sender = get32(a + 14), target = get32(a + 24);
    if (sender == n.peer) {
        if (!n.peer_known) {
            struct line l;
            line_start(&l, "NET peer found by ARP");
            device_print(&l);
        }
        memcpy(n.peer_mac, a + 8, 6);
        n.peer_known = 1;
    }
    if (get16(a + 6) == 1 && target == n.ip)
        send_arp(2, a + 8, a + 8, sender);
}

static void handle_ipv4(const u8 *f, u32 len)
{
    if (len < ETH_HEADER + IP_HEADER)
        return;
    const u8 *ip = f + ETH_HEADER;
    u32 ihl = (u32)(ip[0] & 0xF) * 4;
    u32 total = get16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < IP_HEADER || total < ihl || ETH_HEADER + total > len)
        return;
    if ((get16(ip + 6) & 0x3FFF) != 0 || checksum(ip, ihl) != 0)
        return;                     /* fragments and damaged headers are not for this stack */
    u32 src = get32(ip + 12);
    if (get32(ip + 16) != n.ip)
        return;
    if (src == n.peer && !n.peer_known) {
        memcpy(n.peer_mac, f + 6, 6);
        n.peer_known = 1;
    }
    const u8 *body = ip + ihl;
    u32 body_len = total - ihl;
    u32 k;
    if (ip[9] == IP_ICMP && body_len >= 8 && body[0] == 8 && checksum(body, body_len) == 0) {
        u8 *out = tx_begin(&k);
        if (!out || ETH_HEADER + IP_HEADER + body_len > FRAME_MAX)
            return;
        eth_header(out, f + 6, ETH_IPV4);
        u8 *icmp = out + ETH_HEADER + IP_HEADER;
        memcpy(icmp, body, body_len);
        icmp[0] = 0;                /* echo reply */
        put16(icmp + 2, 0);
        put16(icmp + 2, checksum(icmp, body_len));
        ip_header(out + ETH_HEADER, IP_ICMP, src, body_len);
        u32 frame = ETH_HEADER + IP_HEADER + body_len;
        tx_send(k, frame < 60 ? 60 : frame);
        return;
    }
    if (ip[9] != IP_UDP || body_len < UDP_HEADER)
        return;
    u16 sport = get16(body), dport = get16(body + 2);
    u32 ulen = get16(body + 4);
    if (ulen < UDP_HEADER || ulen > body_len)
        return;
    const u8 *payload = body + UDP_HEADER;
    u32 plen = ulen - UDP_HEADER;
    if (dport == PORT_ECHO) {
        u8 *out = tx_begin(&k);
        if (!out || ETH_HEADER + IP_HEADER + UDP_HEADER + plen > FRAME_MAX)
            return;
        memcpy(out + ETH_HEADER + IP_HEADER + UDP_HEADER, payload, plen);
        udp_finish(k, out, f + 6, src, PORT_ECHO, sport, plen);
    } else if (dport == PORT_DISCARD) {
        if (plen >= 4 && payload[0] == 'S' && payload[1] == 'T' && payload[2] == 'A' && payload[3] == 'T') {
            u8 *out = tx_begin(&k);
            if (!out)
                return;
            u8 *p = out + ETH_HEADER + IP_HEADER + UDP_HEADER;
            for (u32 i = 0; i < 8; i++) {
                p[i] = (u8)(n.discard_frames >> (8 * i));
                p[8 + i] = (u8)(n.discard_bytes >> (8 * i));
            }
            udp_finish(k, out, f + 6, src, PORT_DISCARD, sport, 16);
        } else {
            n.discard_frames++;
            n.discard_bytes += plen;
        }
    }
}

static void handle_frame(const u8 *buf, u32 len)
{
    if (len < NET_HEADER_BYTES + ETH_HEADER)
        return;
    u16 buffers = (u16)(buf[10] | buf[11] << 8);
    if (virtio_net.features & VIRTIO_NET_F_MRG_RXBUF && buffers > 1) {
        n.skip = (u16)(buffers - 1);    /* the rest of the frame: dropped with it */
        return;
    }
    const u8 *f = buf + NET_HEADER_BYTES;
    len -= NET_HEADER_BYTES;
    int for_us = (f[0] & 1) || (f[0] == net_area.mac[0] && f[1] == net_area.mac[1] && f[2] == net_area.mac[2]
                                && f[3] == net_area.mac[3] && f[4] == net_area.mac[4] && f[5] == net_area.mac[5]);
    if (!for_us)
        return;
    u16 type = get16(f + 12);
    if (type == ETH_ARP)
        handle_arp(f, len);
    else if (type == ETH_IPV4)
        handle_ipv4(f, len);
}

static void stream_step(u64 now)
{
    if (net_area.stream_rate == 0 || !n.peer_known)
        return;
    u64 bytes = net_area.stream_bytes;
    if (bytes < 8)
        bytes = 8;
    if (bytes > FRAME_MAX - ETH_HEADER - IP_HEADER - UDP_HEADER)
        bytes = FRAME_MAX - ETH_HEADER - IP_HEADER - UDP_HEADER;
    if (n.stream_start == 0)
        n.stream_start = now;
    u64 due = net_area.stream_rate == NET_RATE_MAX ? n.stream_seq + NET_QUEUE_SIZE
                                                          : (now - n.stream_start) * net_area.stream_rate / TICK_HZ + 1;
    while (n.stream_seq < due) {
        u32 k;
        u8 *out = tx_begin(&k);
        if (!out)
            return;                 /* the queue is full: the rest when buffers come back */
        u8 *p = out + ETH_HEADER + IP_HEADER + UDP_HEADER;
        for (u32 i = 0; i < 8; i++)
            p[i] = (u8)(n.stream_seq >> (8 * i));
        n.stream_seq++;
        udp_finish(k, out, n.peer_mac, n.peer, (u16)net_area.stream_port, (u16)net_area.stream_port, (u32)bytes);
    }
}

void net_start(u64 now)
{
    if (!virtio_net.ready || net_area.ip == 0)
        return;
    n.ip = (u32)net_area.ip;
    n.peer = (u32)net_area.peer;
    struct virtq *rx = &virtio_net.vq[NET_RECEIVEQ];
    for (u16 k = 0; k < rx->size; k++)
        post_rx(k);
    virtq_kick(rx);
    for (u32 k = 0; k < virtio_net.vq[NET_TRANSMITQ].size; k++)
        n.free_tx[n.free_count++] = k;
    n.next_arp = now;
    n.active = 1;
    struct line l;
    line_start(&l, "NET ready mac=");
    for (u32 i = 0; i < 6; i++) {
        static const char hex[] = "0123456789abcdef";
        char part[4] = { hex[net_area.mac[i] >> 4], hex[net_area.mac[i] & 15], i < 5 ? ':' : 0, 0 };
        line_str(&l, part);
    }
    line_str(&l, " link=");
    line_dec(&l, net_area.link_up);
    device_print(&l);
}

int net_step(u64 now)
{
    if (!n.active)
        return 0;
    struct virtq *rx = &virtio_net.vq[NET_RECEIVEQ];
    u32 id, len;
    int received = 0;
    while (virtq_take(rx, &id, &len)) {
        if (id >= rx->size)
            continue;
        if (n.skip > 0)
            n.skip--;
        else
            handle_frame(net_area.rx + (u64)id * NET_BUFFER_BYTES, len < NET_BUFFER_BYTES ? len : NET_BUFFER_BYTES);
        post_rx((u16)id);
        received = 1;
    }
    if (received)
        virtq_kick(rx);
    if (n.peer != 0 && !n.peer_known && now >= n.next_arp) {
        static const u8 broadcast[6] = { 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF };
        static const u8 unknown[6] = { 0 };
        send_arp(1, broadcast, unknown, n.peer);
        n.next_arp = now + ARP_RETRY_TICKS;
    }
    u64 sent = n.stream_seq;
    stream_step(now);
    if (received || n.stream_seq != sent)
        n.last_activity = now;
    /* Poll without pause while frames flow (latency); idle between ticks once quiet (the host's CPU). */
    return now - n.last_activity < BUSY_TICKS;
}
