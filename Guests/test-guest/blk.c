/*
 * blk.c - the block workload on CPU 0 (CPL 3): one virtio-blk request in
 * flight at a time, advanced a step per call of blk_step so CPU 0's memory
 * workload keeps running between steps.
 *
 * The disk's first `blocks` 4 KiB blocks hold, at generation g, the words
 * word_value(block_key(b, g), i). After a fill with generation 1 the blocks
 * are rewritten round-robin at `rate` blocks per second; every write is read
 * back. Each read of block b is DMAed by the device into mirror[b] and
 * verified, and mirror_gen[b] records what it held. A full pass (right
 * after the fill, then every verify_ticks) re-checks each mirror[b] in RAM
 * against mirror_gen[b] without touching the disk - memory the device
 * wrote must survive a migration like any other - then reads every block
 * back from the disk, then flushes. All state lives in RAM (this .bss and
 * blk_area), so it migrates with the guest; the device keeps the request
 * in flight.
 */
#include "user.h"
#include "virtio.h"

#define WORDS_PER_BLOCK     (BLOCK_SIZE / sizeof(u64))
#define BLOCK_SHIFT_KEY     32          /* block index goes above the generation in the key */
#define BLOCK_KEY_SALT      0xb10c      /* keeps block keys apart from page keys */
#define FIRST_GENERATION    1
#define GEN_UNKNOWN         0           /* mirror_gen: nothing verified in this mirror block */
#define MIRROR_CHUNK        16          /* mirror blocks checked per step */
#define STALL_TICKS         (5 * TICK_HZ)   /* a request this old gets one BLOCK STALL line */
#define STATUS_UNSET        0xFF        /* status byte before the device writes it */
#define HEADER_BYTES        16          /* type, reserved, sector */
#define CHAIN_HEAD          0           /* the one request uses descriptor 0 (and 1, 2 without INDIRECT) */

/* Requests, and (OP_MIRROR) where a failure was found: the names appear in BLOCK BAD/STALL lines. */
enum op { OP_NONE, OP_GET_ID, OP_WRITE, OP_READBACK, OP_DISK_READ, OP_FLUSH, OP_MIRROR };
enum pass_phase { PASS_IDLE, PASS_MIRROR, PASS_DISK, PASS_FLUSH, PASS_REPORT };

static const char *const op_names[] = { "none", "id", "write", "readback", "disk", "flush", "mirror" };

static struct {
    int active;
    int indirect;                   /* VIRTIO_F_INDIRECT_DESC negotiated */
    int flush;                      /* VIRTIO_BLK_F_FLUSH negotiated */
    /* The request in flight. */
    enum op op;
    u64 op_block;
    u64 op_gen;                     /* write: generation being written */
    u64 op_start;                   /* tick it was posted */
    int stall_reported;
    /* Progress. */
    int id_done;
    int filled;
    u64 fill_next;                  /* next block of the fill */
    int readback_pending;           /* the block just written is read next */
    u64 readback_block;
    u64 run_start;                  /* tick the fill ended: rate budget counts from here */
    u64 rewrites;                   /* rewrites since the fill; block = rewrites % blocks */
    u64 writes, reads;              /* requests completed, fill included */
    /* Verification. */
    u64 pass;                       /* number of the pass being accumulated (from 1) */
    enum pass_phase phase;
    u64 cursor;
    u64 next_pass;
    int pass_turn;                  /* alternate pass reads with due rewrites */
    int failed;                     /* a BLOCK BAD line was printed for this pass */
} s;

static struct blk_request *request(void)
{
    return (struct blk_request *)virtio_blk.page;
}

static inline u64 block_key(u64 block, u64 gen)
{
    return mix64((block << BLOCK_SHIFT_KEY) ^ gen ^ BLOCK_KEY_SALT);
}

static u64 *mirror(u64 block)
{
    return (u64 *)(blk_area.mirror + block * BLOCK_SIZE);
}

/* ---- Reporting --------------------------------------------------------- */

static void bad_start(struct line *l, u64 block, enum op where)
{
    line_start(l, "BLOCK BAD pass=");
    line_dec(l, s.pass);
    line_str(l, " block=");
    line_dec(l, block);
    line_str(l, " where=");
    line_str(l, op_names[where]);
}

/* Only the first failure of a pass is printed. */
static void bad_word(u64 block, enum op where, u64 word, u64 expected, u64 found)
{
    if (s.failed)
        return;
    s.failed = 1;
    struct line l;
    bad_start(&l, block, where);
    line_str(&l, " word=");
    line_dec(&l, word);
    line_str(&l, " expected=");
    line_hex16(&l, expected);
    line_str(&l, " found=");
    line_hex16(&l, found);
    device_print(&l);
}

static void bad_status(u64 block, enum op where, u8 status)
{
    if (s.failed)
        return;
    s.failed = 1;
    struct line l;
    bad_start(&l, block, where);
    line_str(&l, " status=");
    line_dec(&l, status);
    device_print(&l);
}

/* Verifies a 4 KiB block against generation gen; 1 = good, else the first bad word is reported. */
static int check_block(const volatile u64 *words, u64 block, u64 gen, enum op where)
{
    u64 key = block_key(block, gen);
    for (u64 i = 0; i < WORDS_PER_BLOCK; i++) {
        u64 expected = word_value(key, i);
        u64 found = words[i];
        if (found != expected) {
            bad_word(block, where, i, expected, found);
            return 0;
        }
    }
    return 1;
}

static void print_id(void)
{
    struct line l;
    char text[VIRTIO_BLK_ID_BYTES + 1];
    u32 n = 0;
    const volatile char *id = request()->id;
    /* The ID is NUL-padded, not NUL-terminated, when it is 20 bytes long. */
    while (n < VIRTIO_BLK_ID_BYTES && id[n]) {
        text[n] = id[n] >= ' ' && id[n] <= '~' ? id[n] : '?';
        n++;
    }
    text[n] = '\0';
    line_start(&l, "ferry-test-guest: virtio blk id=");
    line_str(&l, text);
    device_print(&l);
}

/* ---- Requests ---------------------------------------------------------- */

/*
 * Header, optional data, status (spec 5.2.6). With INDIRECT_DESC the chain
 * sits in the request's indirect table and descriptor 0 points at it;
 * otherwise it is descriptors 0..2 of the queue itself.
 */
static void submit(enum op op, u32 type, u64 block, void *data, u32 data_len, int device_writes, u64 now)
{
    struct blk_request *r = request();
    struct virtq *q = &virtio_blk.vq[0];
    r->type = type;
    r->reserved = 0;
    r->sector = (op == OP_FLUSH || op == OP_GET_ID) ? 0 : block * SECTORS_PER_BLOCK;
    r->status = STATUS_UNSET;

    struct virtq_desc *chain = s.indirect ? r->indirect : q->desc;
    u16 n = 0;
    set_desc(&chain[n], (u64)r, HEADER_BYTES, VIRTQ_DESC_F_NEXT, n + 1);
    n++;
    if (data_len) {
        set_desc(&chain[n], (u64)data, data_len,
                 VIRTQ_DESC_F_NEXT | (device_writes ? VIRTQ_DESC_F_WRITE : 0), n + 1);
        n++;
    }
    set_desc(&chain[n], (u64)&r->status, 1, VIRTQ_DESC_F_WRITE, 0);
    n++;
    if (s.indirect)
        set_desc(&q->desc[CHAIN_HEAD], (u64)r->indirect, n * sizeof(struct virtq_desc),
                 VIRTQ_DESC_F_INDIRECT, 0);

    s.op = op;
    s.op_block = block;
    s.op_start = now;
    s.stall_reported = 0;
    virtq_post(q, CHAIN_HEAD);
}

static void write_block(u64 block, u64 gen, u64 now)
{
    u64 key = block_key(block, gen);
    u64 *words = blk_area.write_buffer;
    for (u64 i = 0; i < WORDS_PER_BLOCK; i++)
        words[i] = word_value(key, i);
    s.op_gen = gen;
    submit(OP_WRITE, VIRTIO_BLK_T_OUT, block, words, BLOCK_SIZE, 0, now);
}

static void read_block(enum op why, u64 block, u64 now)
{
    submit(why, VIRTIO_BLK_T_IN, block, mirror(block), BLOCK_SIZE, 1, now);
}

/* A read of block b completed: verify what landed in mirror[b] and note its generation. */
static void finish_read(enum op op, u64 block, u8 status)
{
    u64 gen = blk_area.gen[block];
    blk_area.mirror_gen[block] = GEN_UNKNOWN;
    if (status != VIRTIO_BLK_S_OK)
        bad_status(block, op, status);
    else if (check_block(mirror(block), block, gen, op))
        blk_area.mirror_gen[block] = gen;
}

/* 1 = the request in flight completed (and was handled). */
static int complete(u64 now)
{
    u32 id, len;
    if (!virtq_take(&virtio_blk.vq[0], &id, &len)) {
        if (!s.stall_reported && now - s.op_start >= STALL_TICKS) {
            s.stall_reported = 1;
            struct line l;
            line_start(&l, "BLOCK STALL pass=");
            line_dec(&l, s.pass);
            line_str(&l, " block=");
            line_dec(&l, s.op_block);
            line_str(&l, " op=");
            line_str(&l, op_names[s.op]);
            line_str(&l, " ticks=");
            line_dec(&l, now - s.op_start);
            device_print(&l);
        }
        return 0;
    }
    u8 status = request()->status;
    enum op op = s.op;
    u64 block = s.op_block;
    s.op = OP_NONE;
    switch (op) {
    case OP_GET_ID:
        s.id_done = 1;
        if (status == VIRTIO_BLK_S_OK)
            print_id();
        else
            bad_status(0, op, status);
        break;
    case OP_WRITE:
        s.writes++;
        if (status != VIRTIO_BLK_S_OK)
            bad_status(block, op, status);
        blk_area.gen[block] = s.op_gen;
        s.readback_pending = 1;
        s.readback_block = block;
        break;
    case OP_READBACK:
    case OP_DISK_READ:
        s.reads++;
        finish_read(op, block, status);
        break;
    case OP_FLUSH:
        if (status != VIRTIO_BLK_S_OK)
            bad_status(0, op, status);
        break;
    default:
        break;
    }
    return 1;
}

/* ---- Scheduling -------------------------------------------------------- */

/* Same budget as the memory workload: rate * elapsed ticks / TICK_HZ since the fill, minus those done. */
static int rewrite_due(u64 now)
{
    if (blk_area.rate == BLOCK_RATE_MAX)
        return 1;
    u64 elapsed = now - s.run_start;
    u64 target = blk_area.rate / TICK_HZ * elapsed + blk_area.rate % TICK_HZ * elapsed / TICK_HZ;
    return s.rewrites < target;
}

static void rewrite_next(u64 now)
{
    u64 block = s.rewrites % blk_area.blocks;
    s.rewrites++;
    write_block(block, blk_area.gen[block] + 1, now);
}

/* Part (a) of a pass: mirror[b] must still hold what was verified there. Runs with nothing in flight. */
static void check_mirror_chunk(void)
{
    for (u32 k = 0; k < MIRROR_CHUNK && s.cursor < blk_area.blocks; k++, s.cursor++) {
        u64 gen = blk_area.mirror_gen[s.cursor];
        if (gen != GEN_UNKNOWN)
            check_block(mirror(s.cursor), s.cursor, gen, OP_MIRROR);
    }
}

static void end_pass(void)
{
    if (!s.failed) {
        struct line l;
        line_start(&l, "BLOCK OK pass=");
        line_dec(&l, s.pass);
        line_str(&l, " blocks=");
        line_dec(&l, blk_area.blocks);
        line_str(&l, " writes=");
        line_dec(&l, s.writes);
        line_str(&l, " reads=");
        line_dec(&l, s.reads);
        device_print(&l);
    }
    s.pass++;
    s.failed = 0;
    s.phase = PASS_IDLE;
}

void blk_start(u64 now)
{
    if (!virtio_blk.ready || blk_area.blocks == 0)
        return;
    for (u64 b = 0; b < blk_area.blocks; b++) {
        blk_area.gen[b] = 0;
        blk_area.mirror_gen[b] = GEN_UNKNOWN;
    }
    s.indirect = (virtio_blk.features & VIRTIO_F_INDIRECT_DESC) != 0;
    s.flush = (virtio_blk.features & VIRTIO_BLK_F_FLUSH) != 0;
    s.pass = 1;
    s.run_start = now;
    s.active = 1;
}

/*
 * One step: finish the request in flight (1 = still waiting: the caller
 * keeps polling instead of idling), else start the next one. Priority: the
 * device ID, the read-back of the block just written, the fill, a pass's
 * mirror check, then pass reads alternating with due rewrites, the pass's
 * flush and report.
 */
int blk_step(u64 now)
{
    if (!s.active)
        return 0;
    if (s.op != OP_NONE && !complete(now))
        return 1;

    if (!s.id_done) {
        submit(OP_GET_ID, VIRTIO_BLK_T_GET_ID, 0, request()->id, VIRTIO_BLK_ID_BYTES, 1, now);
        return 1;
    }
    if (s.readback_pending) {
        s.readback_pending = 0;
        read_block(OP_READBACK, s.readback_block, now);
        return 1;
    }
    if (!s.filled) {
        if (s.fill_next < blk_area.blocks) {
            write_block(s.fill_next++, FIRST_GENERATION, now);
            return 1;
        }
        s.filled = 1;
        s.run_start = now;
        s.next_pass = now;                      /* first pass right away: the fill is proven early */
        struct line l;
        line_start(&l, "ferry-test-guest: block fill done blocks=");
        line_dec(&l, blk_area.blocks);
        device_print(&l);
    }

    if (s.phase == PASS_IDLE && blk_area.verify_ticks && now >= s.next_pass) {
        s.phase = PASS_MIRROR;
        s.cursor = 0;
        s.next_pass += blk_area.verify_ticks;
        if (s.next_pass <= now)                 /* fell behind: skip, do not burst */
            s.next_pass = now + blk_area.verify_ticks;
    }
    if (s.phase == PASS_MIRROR) {
        check_mirror_chunk();
        if (s.cursor == blk_area.blocks) {
            s.phase = PASS_DISK;
            s.cursor = 0;
        }
        return 1;
    }
    int write_due = rewrite_due(now);
    if (s.phase == PASS_DISK && s.cursor == blk_area.blocks)
        s.phase = PASS_FLUSH;
    if (s.phase == PASS_DISK && (!write_due || s.pass_turn)) {
        s.pass_turn = 0;
        read_block(OP_DISK_READ, s.cursor++, now);
        return 1;
    }
    if (s.phase == PASS_FLUSH) {
        s.phase = PASS_REPORT;
        if (s.flush) {
            submit(OP_FLUSH, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, now);
            return 1;
        }
    }
    if (s.phase == PASS_REPORT)
        end_pass();
    if (write_due) {
        s.pass_turn = 1;
        rewrite_next(now);
        return 1;
    }
    return 0;
}
