/*
 * iscsi_light: a light iSCSI load client for lunastor's benchmarks (bench/workers.py).
 *
 * Same arguments and JSON line as iscsi_load.c, and the same path to the target (one iSCSI
 * session over TCP, login, READ(16)/WRITE(16) with immediate data), but without libiscsi, to
 * spend as little CPU per request as possible: a measurement on a 2-core machine shares the
 * cores between the server and its clients, so every microsecond a client spends is one the
 * server does not get. libiscsi makes three system calls per request (a send per command, a
 * recv for each response's header and another for its data); this client sends every command
 * that is ready in one send, and reads every response that has arrived with one recv into a
 * buffer it parses (copying read data out of it, cheap next to a system call).
 *
 * No digests, no R2T (ImmediateData=Yes, InitialR2T=No: a block up to FirstBurstLength goes
 * in its command), one connection, ErrorRecoveryLevel=0: any surprise ends the run with an
 * error. A NOP-In that asks for an answer gets one. The CmdSN window is respected.
 *
 *   gcc -O2 -o iscsi-light iscsi_light.c
 *   iscsi-light URL read|write rand|seq BLOCK_BYTES QUEUE_DEPTH SECONDS [RANGE_BYTES [INITIATOR]]
 *
 * URL: iscsi://HOST:PORT/TARGET/LUN.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BHS 48
#define MAX_SAMPLES (1u << 22)
#define IN_BUFFER (1u << 20)
#define OP_NOP_OUT 0x00
#define OP_SCSI_CMD 0x01
#define OP_LOGIN_REQ 0x03
#define OP_NOP_IN 0x20
#define OP_SCSI_RSP 0x21
#define OP_LOGIN_RSP 0x23
#define OP_DATA_IN 0x25
#define NO_TAG 0xffffffffu

struct slot {
    unsigned char *buf; /* a write's data; a read's destination */
    uint32_t got;       /* read bytes received */
    double issued_at;
    int ready;          /* waiting for the CmdSN window */
};

static int fd, writing, random_io, stopping, depth;
static uint32_t block_bytes, lba_size = 512, cmd_sn = 1, exp_stat_sn, max_cmd_sn;
static uint64_t lun_field, range_blocks, next_lba, completed, failed, inflight;
static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static struct slot *slots;
static float *latencies;
static uint64_t nlat;
static unsigned char *out, *in;
static size_t out_len, out_cap, in_len;

static void die(const char *what)
{
    fprintf(stderr, "iscsi_light: %s\n", what);
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t next_random(void)
{
    uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void put32(unsigned char *p, uint32_t v)
{
    p[0] = v >> 24, p[1] = v >> 16, p[2] = v >> 8, p[3] = v;
}

static void put64(unsigned char *p, uint64_t v)
{
    put32(p, v >> 32), put32(p + 4, (uint32_t)v);
}

static uint32_t get32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint32_t get24(const unsigned char *p)
{
    return (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
}

static int sn_le(uint32_t a, uint32_t b) /* serial number arithmetic, RFC 1982 */
{
    return a == b || (int32_t)(a - b) < 0;
}

/* Room for `n` more bytes of output. */
static unsigned char *out_reserve(size_t n)
{
    if (out_len + n > out_cap) {
        out_cap = 2 * (out_len + n);
        out = realloc(out, out_cap);
        if (out == NULL)
            die("out of memory");
    }
    unsigned char *p = out + out_len;
    memset(p, 0, n);
    out_len += n;
    return p;
}

/* Write all pending output (blocking on POLLOUT, reading nothing meanwhile: the target
 * never has more than QUEUE_DEPTH responses to send, which its socket buffer holds). */
static void flush_out(void)
{
    size_t done = 0;
    while (done < out_len) {
        ssize_t n = send(fd, out + done, out_len - done, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            poll(&p, 1, 1000);
            continue;
        }
        if (n <= 0)
            die("send failed");
        done += (size_t)n;
    }
    out_len = 0;
}

/* Read at least one byte more into `in` (waiting for it). */
static void fill_in(void)
{
    for (;;) {
        ssize_t n = recv(fd, in + in_len, IN_BUFFER - in_len, 0);
        if (n > 0) {
            in_len += (size_t)n;
            return;
        }
        if (n == 0)
            die("the target closed the connection");
        if (errno == EAGAIN || errno == EINTR) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            poll(&p, 1, 1000);
            continue;
        }
        die("recv failed");
    }
}

static size_t pdu_length(const unsigned char *h)
{
    return BHS + (size_t)h[4] * 4 + ((get24(h + 5) + 3) & ~3u);
}

/* One command: `cdb` for slot `tag`, with `data_out` bytes of immediate data. */
static void queue_command(uint32_t tag, const unsigned char *cdb, uint32_t expected, int reads,
                          const unsigned char *data_out, uint32_t data_len)
{
    unsigned char *h = out_reserve(BHS + ((data_len + 3) & ~3u));
    h[0] = OP_SCSI_CMD;
    h[1] = 0x80 | (reads ? 0x40 : 0) | (data_len ? 0x20 : 0) | 0x01; /* F, R/W, SIMPLE */
    h[5] = data_len >> 16, h[6] = data_len >> 8, h[7] = data_len;
    put64(h + 8, lun_field);
    put32(h + 16, tag);
    put32(h + 20, expected);
    put32(h + 24, cmd_sn++);
    put32(h + 28, exp_stat_sn);
    memcpy(h + 32, cdb, 16);
    if (data_len)
        memcpy(h + BHS, data_out, data_len);
}

static void submit(int index)
{
    if (!sn_le(cmd_sn, max_cmd_sn)) {
        slots[index].ready = 1; /* sent when the window opens */
        return;
    }
    uint64_t per_io = block_bytes / lba_size, lba;
    if (random_io) {
        lba = (next_random() % (range_blocks / per_io)) * per_io;
    } else {
        lba = next_lba;
        next_lba += per_io;
        if (next_lba + per_io > range_blocks)
            next_lba = 0;
    }
    unsigned char cdb[16] = {writing ? 0x8a : 0x88};
    put64(cdb + 2, lba);
    put32(cdb + 10, (uint32_t)per_io);
    slots[index].ready = 0;
    slots[index].got = 0;
    slots[index].issued_at = now();
    queue_command((uint32_t)index, cdb, block_bytes, !writing, writing ? slots[index].buf : NULL,
                  writing ? block_bytes : 0);
    inflight++;
}

static void window(const unsigned char *h)
{
    uint32_t max = get32(h + 32);
    if ((int32_t)(max - max_cmd_sn) > 0)
        max_cmd_sn = max;
}

static void finish(int index, int good)
{
    if (good) {
        completed++;
        if (nlat < MAX_SAMPLES)
            latencies[nlat++] = (float)((now() - slots[index].issued_at) * 1e6);
    } else if (++failed <= 5) {
        fprintf(stderr, "iscsi_light: command %d failed\n", index);
    }
    inflight--;
    if (!stopping)
        submit(index);
}

/* One PDU from the target, in full at `h`. */
static void handle(const unsigned char *h)
{
    int op = h[0] & 0x3f;
    uint32_t tag = get32(h + 16), data_len = get24(h + 5);
    const unsigned char *data = h + BHS + (size_t)h[4] * 4;
    switch (op) {
    case OP_DATA_IN: {
        if (tag >= (uint32_t)depth)
            die("Data-In for an unknown task");
        uint32_t offset = get32(h + 40);
        if (offset + data_len > block_bytes)
            die("Data-In beyond the buffer");
        memcpy(slots[tag].buf + offset, data, data_len);
        slots[tag].got += data_len;
        window(h);
        if (h[1] & 0x01) { /* status in the last Data-In */
            exp_stat_sn = get32(h + 24) + 1;
            finish((int)tag, h[3] == 0 && slots[tag].got == block_bytes);
        }
        break;
    }
    case OP_SCSI_RSP:
        if (tag >= (uint32_t)depth)
            die("SCSI Response for an unknown task");
        exp_stat_sn = get32(h + 24) + 1;
        window(h);
        finish((int)tag, h[2] == 0 && h[3] == 0 && (writing || slots[tag].got == block_bytes));
        break;
    case OP_NOP_IN: {
        window(h);
        uint32_t ttt = get32(h + 20);
        if (ttt != NO_TAG) { /* the target pings: answer (immediate, CmdSN not advanced) */
            unsigned char *o = out_reserve(BHS);
            o[0] = 0x40 | OP_NOP_OUT;
            o[1] = 0x80;
            memcpy(o + 8, h + 8, 8);
            put32(o + 16, NO_TAG);
            put32(o + 20, ttt);
            put32(o + 24, cmd_sn);
            put32(o + 28, exp_stat_sn);
        }
        break;
    }
    default: {
        char msg[64];
        snprintf(msg, sizeof msg, "unexpected PDU opcode 0x%02x", op);
        die(msg);
    }
    }
}

/* Handle every complete PDU in `in`; keep a partial one. */
static void drain_in(void)
{
    size_t pos = 0;
    while (in_len - pos >= BHS && in_len - pos >= pdu_length(in + pos)) {
        handle(in + pos);
        pos += pdu_length(in + pos);
    }
    memmove(in, in + pos, in_len - pos);
    in_len -= pos;
}

static void connect_to(const char *host, const char *port)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai;
    if (getaddrinfo(host, port, &hints, &ai) != 0)
        die("cannot resolve the portal");
    fd = socket(ai->ai_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, ai->ai_addr, ai->ai_addrlen) != 0)
        die("cannot connect to the portal");
    freeaddrinfo(ai);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Login in one step, straight to the operational stage (no authentication). */
static void login(const char *initiator, const char *target)
{
    char text[1024];
    int n = snprintf(text, sizeof text,
                     "InitiatorName=%s%cTargetName=%s%cSessionType=Normal%cHeaderDigest=None%c"
                     "DataDigest=None%cImmediateData=Yes%cInitialR2T=No%c"
                     "MaxRecvDataSegmentLength=262144%cFirstBurstLength=262144%c"
                     "MaxBurstLength=262144%cErrorRecoveryLevel=0%cMaxConnections=1%c",
                     initiator, 0, target, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    unsigned char *h = out_reserve(BHS + (((size_t)n + 3) & ~3u));
    h[0] = 0x40 | OP_LOGIN_REQ;
    h[1] = 0x80 | (1 << 2) | 3; /* T, CSG operational, NSG full feature */
    h[5] = n >> 16, h[6] = n >> 8, h[7] = n;
    uint32_t pid = (uint32_t)getpid();
    h[8] = 0x80, h[9] = 0, h[10] = pid >> 24, h[11] = pid >> 16, h[12] = pid >> 8, h[13] = pid;
    put32(h + 24, cmd_sn);
    memcpy(h + BHS, text, (size_t)n);
    flush_out();
    while (in_len < BHS || in_len < pdu_length(in))
        fill_in();
    if ((in[0] & 0x3f) != OP_LOGIN_RSP || in[36] != 0)
        die("login refused");
    if (!(in[1] & 0x80) || (in[1] & 3) != 3)
        die("the target wants more login steps than this client makes");
    exp_stat_sn = get32(in + 24) + 1;
    max_cmd_sn = get32(in + 32);
    size_t length = pdu_length(in);
    memmove(in, in + length, in_len - length);
    in_len -= length;
}

/* READ CAPACITY(16): the LUN's block size and block count; 0 on CHECK CONDITION (a new
 * nexus's first command gets a UNIT ATTENTION: asked again). */
static int read_capacity(void)
{
    unsigned char cdb[16] = {0x9e, 0x10}, buf[32];
    put32(cdb + 10, sizeof buf);
    queue_command(0, cdb, sizeof buf, 1, NULL, 0);
    flush_out();
    uint32_t got = 0;
    for (;;) {
        while (in_len < BHS || in_len < pdu_length(in))
            fill_in();
        const unsigned char *h = in;
        int op = h[0] & 0x3f, done = 0, good = 1;
        uint32_t len = get24(h + 5);
        if (op == OP_DATA_IN) {
            memcpy(buf + got, h + BHS, len < sizeof buf - got ? len : sizeof buf - got);
            got += len;
            done = h[1] & 0x01;
            good = !done || h[3] == 0;
        } else if (op == OP_SCSI_RSP) {
            good = h[2] == 0 && h[3] == 0;
            done = 1;
        } else {
            die("unexpected PDU during READ CAPACITY(16)");
        }
        if (done)
            exp_stat_sn = get32(h + 24) + 1;
        window(h);
        size_t length = pdu_length(h);
        memmove(in, in + length, in_len - length);
        in_len -= length;
        if (done && !good)
            return 0;
        if (done)
            break;
    }
    if (got < 12)
        die("short READ CAPACITY(16) data");
    lba_size = get32(buf + 8);
    range_blocks = (((uint64_t)get32(buf) << 32) | get32(buf + 4)) + 1;
    return 1;
}

static int compare_floats(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static double percentile(double p)
{
    return nlat ? latencies[(uint64_t)(p * (nlat - 1))] : 0;
}

int main(int argc, char **argv)
{
    if (argc < 7) {
        fprintf(stderr,
                "usage: %s URL read|write rand|seq BLOCK_BYTES QUEUE_DEPTH SECONDS "
                "[RANGE_BYTES [INITIATOR]]\n",
                argv[0]);
        return 2;
    }
    writing = argv[2][0] == 'w';
    random_io = strcmp(argv[3], "rand") == 0;
    block_bytes = (uint32_t)strtoul(argv[4], NULL, 0);
    depth = atoi(argv[5]);
    double seconds = atof(argv[6]);
    uint64_t range_bytes = argc > 7 ? strtoull(argv[7], NULL, 0) : 0;
    const char *initiator = argc > 8 ? argv[8] : "iqn.2026-11.io.lunastor:bench";
    if (depth < 1 || block_bytes == 0 || block_bytes > 262144)
        die("QUEUE_DEPTH must be >= 1 and BLOCK_BYTES 1..262144");

    /* iscsi://HOST:PORT/TARGET/LUN */
    char url[1024], *host, *port, *target, *lun_text;
    snprintf(url, sizeof url, "%s", argv[1]);
    if (strncmp(url, "iscsi://", 8) != 0)
        die("URL must be iscsi://HOST:PORT/TARGET/LUN");
    host = url + 8;
    target = strchr(host, '/');
    if (target == NULL)
        die("URL must be iscsi://HOST:PORT/TARGET/LUN");
    *target++ = 0;
    lun_text = strrchr(target, '/');
    if (lun_text == NULL)
        die("URL must be iscsi://HOST:PORT/TARGET/LUN");
    *lun_text++ = 0;
    port = strrchr(host, ':');
    if (port != NULL)
        *port++ = 0;
    int lun = atoi(lun_text);
    if (lun < 0 || lun > 255)
        die("LUN must be 0..255");
    lun_field = (uint64_t)lun << 48; /* SAM peripheral addressing, single level */

    out_cap = 1 << 20;
    out = malloc(out_cap);
    in = malloc(IN_BUFFER);
    connect_to(host, port ? port : "3260");
    login(initiator, target);
    for (int tries = 0; !read_capacity(); tries++)
        if (tries == 3)
            die("READ CAPACITY(16) failed");
    if (range_bytes && range_bytes / lba_size < range_blocks)
        range_blocks = range_bytes / lba_size;
    if (block_bytes % lba_size || range_blocks < block_bytes / lba_size)
        die("BLOCK_BYTES must be a multiple of the LUN's block size, within its range");

    slots = calloc((size_t)depth, sizeof(*slots));
    latencies = malloc(sizeof(float) * MAX_SAMPLES);
    for (int i = 0; i < depth; i++) {
        slots[i].buf = aligned_alloc(4096, (block_bytes + 4095) & ~4095u);
        memset(slots[i].buf, 0xa5 ^ i, block_bytes);
    }

    double start = now(), end = start + seconds;
    for (int i = 0; i < depth; i++)
        submit(i);
    while (inflight > 0 || out_len > 0) {
        if (out_len > 0)
            flush_out();
        if (inflight == 0)
            break;
        if (!stopping && now() >= end)
            stopping = 1;
        fill_in();
        drain_in();
        for (int i = 0; i < depth && !stopping; i++) /* the window has moved */
            if (slots[i].ready && sn_le(cmd_sn, max_cmd_sn))
                submit(i);
    }
    double elapsed = now() - start;
    qsort(latencies, nlat, sizeof(float), compare_floats);
    printf("{\"ios\": %" PRIu64 ", \"errors\": %" PRIu64 ", \"seconds\": %.3f, \"iops\": %.1f, "
           "\"mbps\": %.2f, \"lat_p50_us\": %.1f, \"lat_p99_us\": %.1f, \"lat_avg_us\": %.1f}\n",
           completed, failed, elapsed, completed / elapsed,
           completed * (double)block_bytes / elapsed / 1e6, percentile(0.5), percentile(0.99),
           elapsed * 1e6 * depth / (completed ? completed : 1));
    close(fd); /* no logout: the target sees the connection end, as after any client */
    return failed ? 1 : 0;
}
