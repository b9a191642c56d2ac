/*
 * vcon.c - output through virtio-console port 0 (spec 5.3; no
 * VIRTIO_CONSOLE_F_MULTIPORT, so queue 1 is its transmitq) on CPU 0 (CPL 3).
 * Up to VCON_TX_BUFFERS lines in flight, each in its own buffer of the
 * device's page and its own descriptor (descriptor k = buffer k); a buffer
 * is reused once the used ring returns it. Never waits: with every buffer
 * busy the line is dropped (the sequence numbers show the gap).
 */
#include "user.h"
#include "virtio.h"

#define TRANSMITQ 1

static u32 busy;                    /* bit k: buffer k is with the device */

void vcon_send(const char *text)
{
    if (!virtio_console.ready)
        return;
    struct virtq *q = &virtio_console.vq[TRANSMITQ];
    u32 id, len;
    while (virtq_take(q, &id, &len)) {
        if (id < VCON_TX_BUFFERS)
            busy &= ~(1U << id);
    }
    u32 slots = q->size < VCON_TX_BUFFERS ? q->size : VCON_TX_BUFFERS;
    u16 k = 0;
    while (k < slots && (busy & (1U << k)))
        k++;
    if (k == slots)
        return;
    char *buf = (char *)virtio_console.page + k * VCON_TX_BUFFER_SIZE;
    u32 n = 0;
    while (n < VCON_TX_BUFFER_SIZE && text[n]) {
        buf[n] = text[n];
        n++;
    }
    q->desc[k].addr = (u64)buf;
    q->desc[k].len = n;
    q->desc[k].flags = 0;           /* device-readable, one descriptor */
    q->desc[k].next = 0;
    busy |= 1U << k;
    virtq_post(q, k);
}
