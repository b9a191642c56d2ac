/*
 * virtio.h - virtio 1.x (virtio spec 1.2) definitions and the state shared
 * between the CPL-0 set-up (virtio_pci.c, virtio_setup.c) and the CPL-3
 * data path (virtq.c, blk.c, bench.c, rng.c, vcon.c, devices.c). CPL 0
 * fills these in at boot, before wl_boot_complete; afterwards only CPU 0's CPL-3 code
 * touches them. Rings, request headers and buffers live in RAM carved out
 * before the working set (kernel.c), so they migrate with guest memory.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "types.h"
#include "layout.h"

/* Device status bits (spec 2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE   0x01
#define VIRTIO_STATUS_DRIVER        0x02
#define VIRTIO_STATUS_DRIVER_OK     0x04
#define VIRTIO_STATUS_FEATURES_OK   0x08
#define VIRTIO_STATUS_NEEDS_RESET   0x40
#define VIRTIO_STATUS_FAILED        0x80

/* Feature bits (spec 6, 5.2.3). */
#define VIRTIO_F_INDIRECT_DESC      (1UL << 28)
#define VIRTIO_F_EVENT_IDX          (1UL << 29)
#define VIRTIO_F_VERSION_1          (1UL << 32)
#define VIRTIO_BLK_F_SIZE_MAX       (1UL << 1)
#define VIRTIO_BLK_F_SEG_MAX        (1UL << 2)
#define VIRTIO_BLK_F_RO             (1UL << 5)
#define VIRTIO_BLK_F_FLUSH          (1UL << 9)
#define VIRTIO_NET_F_MAC            (1UL << 5)
#define VIRTIO_NET_F_MRG_RXBUF      (1UL << 15)
#define VIRTIO_NET_F_STATUS         (1UL << 16)

/* Common configuration structure (spec 4.1.4.3): offsets of the fields used. */
#define VIRTIO_COMMON_DFSELECT      0x00
#define VIRTIO_COMMON_DF            0x04
#define VIRTIO_COMMON_GFSELECT      0x08
#define VIRTIO_COMMON_GF            0x0C
#define VIRTIO_COMMON_MSIX          0x10
#define VIRTIO_COMMON_NUMQ          0x12
#define VIRTIO_COMMON_STATUS        0x14
#define VIRTIO_COMMON_CFGGENERATION 0x15
#define VIRTIO_COMMON_Q_SELECT      0x16
#define VIRTIO_COMMON_Q_SIZE        0x18
#define VIRTIO_COMMON_Q_MSIX        0x1A
#define VIRTIO_COMMON_Q_ENABLE      0x1C
#define VIRTIO_COMMON_Q_NOFF        0x1E
#define VIRTIO_COMMON_Q_DESCLO      0x20
#define VIRTIO_COMMON_Q_DESCHI      0x24
#define VIRTIO_COMMON_Q_AVAILLO     0x28
#define VIRTIO_COMMON_Q_AVAILHI     0x2C
#define VIRTIO_COMMON_Q_USEDLO      0x30
#define VIRTIO_COMMON_Q_USEDHI      0x34
#define VIRTIO_MSI_NO_VECTOR        0xFFFF

/* Split virtqueue (spec 2.7). */
#define VIRTQ_DESC_F_NEXT           1
#define VIRTQ_DESC_F_WRITE          2       /* device writes the buffer */
#define VIRTQ_DESC_F_INDIRECT       4
#define VIRTQ_AVAIL_F_NO_INTERRUPT  1
#define VIRTQ_USED_F_NO_NOTIFY      1
#define VIRTQ_MAX_SIZE              64      /* entries used at most (desc 1 KiB + avail + used fit one page) */
#define VIRTQ_BENCH_MAX_SIZE        256     /* blk with block_bench=1: deep queues without INDIRECT_DESC too */
#define VIRTQ_AVAIL_OFFSET          1024    /* avail ring within the queue's pages (after desc if that is larger) */
#define VIRTQ_USED_OFFSET           2048    /* used ring: 1 KiB after the avail ring (4-byte aligned) */
#define VIRTQ_EVENT_DISTANCE        0x8000  /* used_event this far ahead: the device never signals */
#define VIRTQ_MAX_QUEUES            2

/* virtio-blk requests (spec 5.2.6). */
#define VIRTIO_BLK_T_IN             0
#define VIRTIO_BLK_T_OUT            1
#define VIRTIO_BLK_T_FLUSH          4
#define VIRTIO_BLK_T_GET_ID         8
#define VIRTIO_BLK_S_OK             0
#define VIRTIO_BLK_ID_BYTES         20
#define SECTOR_SIZE                 512
#define BLOCK_SIZE                  PAGE_SIZE   /* the block workload's unit: 4 KiB = 8 sectors */
#define SECTORS_PER_BLOCK           (BLOCK_SIZE / SECTOR_SIZE)

/* block_rate value meaning "as fast as possible". */
#define BLOCK_RATE_MAX              (~0UL)
/* virtio-console transmit buffers in flight at most, and the size of each. */
#define VCON_TX_BUFFERS             4
#define VCON_TX_BUFFER_SIZE         128
/* Bytes asked of virtio-rng per request. */
#define RNG_REQUEST_BYTES           64

struct virtq_desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

/* Fills one descriptor (used by the block workload and the block benchmark). */
static inline void set_desc(struct virtq_desc *d, u64 addr, u32 len, u16 flags, u16 next)
{
    d->addr = addr;
    d->len = len;
    d->flags = flags;
    d->next = next;
}

struct virtq_avail {
    u16 flags;
    u16 idx;
    u16 ring[];                     /* size entries, then used_event */
};

struct virtq_used_elem {
    u32 id;
    u32 len;
};

struct virtq_used {
    u16 flags;
    u16 idx;
    struct virtq_used_elem ring[];  /* size entries, then avail_event */
};

struct virtq {
    u16 index;                      /* queue number within the device */
    u16 size;                       /* entries, a power of two <= VIRTQ_MAX_SIZE (VIRTQ_BENCH_MAX_SIZE) */
    u16 avail_idx;                  /* CPL 3: the driver's free-running avail index */
    u16 last_used;                  /* CPL 3: next used index to consume (free-running) */
    u32 event_idx;                  /* VIRTIO_F_EVENT_IDX negotiated */
    u32 reserved;
    struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    volatile u16 *notify;           /* doorbell: write the queue index (16 bits) */
};

struct virtio_dev {
    const char *name;               /* "blk", "console", "rng" */
    u32 probed;                     /* a PCI function with usable capabilities was found */
    u32 ready;                      /* reached DRIVER_OK: CPL 3 may use it */
    u32 bdf;                        /* PCI bus/device/function (bus << 8 | device << 3 | function) */
    u32 notify_multiplier;          /* notify_off_multiplier of the notify capability */
    u32 notify_length;              /* bytes of the notify capability's region */
    u32 nqueues;
    u64 bar;                        /* base of the BAR holding the common configuration (for the log) */
    volatile u8 *common;            /* common configuration structure */
    volatile u8 *notify_base;       /* notification region */
    volatile u8 *device_cfg;        /* device-specific configuration (0 if the device has none) */
    u64 features;                   /* negotiated */
    u8 *page;                       /* one page for the device's requests and small buffers */
    struct virtq vq[VIRTQ_MAX_QUEUES];
};

/* Layout of virtio_blk.page: one request at a time. */
struct blk_request {
    u32 type;                       /* device-readable header (spec 5.2.6) */
    u32 reserved;
    u64 sector;
    volatile u8 status;             /* device-writable */
    u8 pad[15];
    struct virtq_desc indirect[3];  /* header, data, status (16-byte aligned) */
    char id[VIRTIO_BLK_ID_BYTES];   /* VIRTIO_BLK_T_GET_ID answer */
};

/* Memory of the block workload (carved at boot when a disk is present). */
struct blk_area {
    u64 blocks;                     /* 4 KiB blocks in use (block_blocks); 0 = no block workload */
    u64 capacity;                   /* disk size in 512-byte sectors */
    u64 rate;                       /* blocks rewritten per second, or BLOCK_RATE_MAX */
    u64 verify_ticks;               /* full pass period; 0 = none */
    u64 *gen;                       /* generation per block (what the disk must hold) */
    u64 *mirror_gen;                /* generation held by mirror[b]; 0 = nothing verified there */
    u8 *mirror;                     /* blocks * 4 KiB: reads of block b land at b * 4 KiB */
    u64 *write_buffer;              /* 4 KiB: the data of the write in flight */
};

/*
 * The block benchmark (block_bench=1; bench.c). Each request slot holds a
 * header, a status byte and an indirect table (used only with
 * INDIRECT_DESC); without it a request's chain sits at descriptors
 * slot * chain length .. of the queue.
 */
#define BENCH_REQUEST_BYTES         MIB     /* a sequential request */
#define BENCH_RAND_BYTES            PAGE_SIZE   /* a random read */

struct bench_slot {
    u32 type;                       /* device-readable header (spec 5.2.6) */
    u32 reserved;
    u64 sector;
    volatile u8 status;             /* device-writable */
    u8 pad[15];
    struct virtq_desc table[];      /* header, data segments, status (16-byte aligned) */
};

struct bench_area {
    u32 enabled;                    /* block_bench=1, a writable disk and its memory */
    u32 indirect;                   /* VIRTIO_F_INDIRECT_DESC negotiated */
    u64 mib;                        /* region: the first `mib` MiB of the disk */
    u64 qd;                         /* sequential requests in flight at most */
    u64 rand_qd;                    /* random reads in flight at most */
    u64 ticks;                      /* minimum length of a phase */
    u64 segment_bytes;              /* a data descriptor covers this much at most (size_max) */
    u64 slot_bytes;                 /* stride of the slots */
    u8 *slots;                      /* max(qd, rand_qd) slots */
    u8 *buffers;                    /* qd * 1 MiB, each physically contiguous */
    u8 *rand_buffers;               /* rand_qd * 4 KiB */
};

/*
 * The network stack (net.c): one receive and one transmit buffer of
 * NET_BUFFER_BYTES per descriptor, descriptor k = buffer k, in RAM carved at
 * boot. Frames carry the 12-byte virtio-net header (spec 5.1.6).
 */
#define NET_QUEUE_SIZE              64
#define NET_BUFFER_BYTES            2048
#define NET_HEADER_BYTES            12
#define NET_RECEIVEQ                0
#define NET_TRANSMITQ               1
#define NET_RATE_MAX                (~0UL)

struct net_area {
    u8 mac[6];
    u8 link_up;                     /* VIRTIO_NET_S_LINK_UP when the device reports status */
    u8 reserved;
    u8 *rx;                         /* NET_QUEUE_SIZE receive buffers */
    u8 *tx;                         /* NET_QUEUE_SIZE transmit buffers */
    u64 ip;                         /* boot parameters net_ip, net_peer, net_stream_* (kernel.c) */
    u64 peer;
    u64 stream_port;
    u64 stream_rate;
    u64 stream_bytes;
};

extern struct virtio_dev virtio_blk, virtio_console, virtio_rng, virtio_net;
extern struct net_area net_area;
extern struct blk_area blk_area;
extern struct bench_area bench_area;

#endif
