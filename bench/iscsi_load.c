/*
 * iscsi_load: a libiscsi load client for lunastor's benchmarks (bench/iscsi_target.py).
 *
 * Keeps QD READ(16) or WRITE(16) commands in flight against one LUN for a bounded time, with one
 * reusable buffer per slot, and prints one JSON line: ios, errors, seconds, iops, MB/s and latency
 * percentiles (microseconds). A benchmark client may be C; the product is Python.
 *
 *   gcc -O2 -o iscsi-load iscsi_load.c -liscsi
 *   iscsi-load URL read|write rand|seq BLOCK_BYTES QUEUE_DEPTH SECONDS [RANGE_BYTES [INITIATOR]]
 *
 * INITIATOR: the initiator name (default the bench's): several clients as several hosts.
 */
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define MAX_SAMPLES (1u << 22)

struct slot {
    unsigned char *buf;
    struct scsi_iovec iov;
    double issued_at;
};

static struct iscsi_context *ctx;
static int lun, writing, random_io, stopping;
static uint32_t block_bytes, lba_size = 512;
static uint64_t range_blocks, next_lba, completed, failed, inflight;
static uint64_t rng = 0x9e3779b97f4a7c15ULL;
static struct slot *slots;
static float *latencies;
static uint64_t nlat;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t next_random(void)
{
    /* splitmix64: cheap and well spread */
    uint64_t z = (rng += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void submit(int index);

static void on_done(struct iscsi_context *c, int status, void *command_data, void *private_data)
{
    struct scsi_task *task = command_data;
    int index = (int)(intptr_t)private_data;
    if (status == SCSI_STATUS_GOOD) {
        completed++;
        if (nlat < MAX_SAMPLES)
            latencies[nlat++] = (float)((now() - slots[index].issued_at) * 1e6);
    } else {
        failed++;
        if (failed <= 5) /* say what failed: a count alone cannot be diagnosed */
            fprintf(stderr, "iscsi_load: command failed: status 0x%02x, sense %s/0x%04x: %s\n",
                    task->status, scsi_sense_key_str(task->sense.key), task->sense.ascq,
                    iscsi_get_error(c));
    }
    scsi_free_scsi_task(task);
    inflight--;
    if (!stopping)
        submit(index);
}

static void submit(int index)
{
    uint64_t per_io = block_bytes / lba_size, lba;
    uint64_t positions = range_blocks / per_io;
    struct scsi_task *task;

    if (random_io) {
        lba = (next_random() % positions) * per_io;
    } else {
        lba = next_lba;
        next_lba += per_io;
        if (next_lba + per_io > range_blocks)
            next_lba = 0;
    }
    slots[index].issued_at = now();
    if (writing)
        task = iscsi_write16_task(ctx, lun, lba, slots[index].buf, block_bytes, lba_size, 0, 0, 0,
                                  0, 0, on_done, (void *)(intptr_t)index);
    else
        task = iscsi_read16_iov_task(ctx, lun, lba, block_bytes, lba_size, 0, 0, 0, 0, 0, on_done,
                                     (void *)(intptr_t)index, &slots[index].iov, 1);
    if (task == NULL) {
        fprintf(stderr, "iscsi_load: cannot queue a command: %s\n", iscsi_get_error(ctx));
        exit(1);
    }
    inflight++;
}

static int compare_floats(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static double percentile(double p)
{
    if (nlat == 0)
        return 0;
    uint64_t i = (uint64_t)(p * (nlat - 1));
    return latencies[i];
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
    int depth = atoi(argv[5]);
    double seconds = atof(argv[6]);
    uint64_t range_bytes = argc > 7 ? strtoull(argv[7], NULL, 0) : 0;

    ctx = iscsi_create_context(argc > 8 ? argv[8] : "iqn.2026-11.io.lunastor:bench");
    struct iscsi_url *url = iscsi_parse_full_url(ctx, argv[1]);
    if (url == NULL) {
        fprintf(stderr, "iscsi_load: bad URL: %s\n", iscsi_get_error(ctx));
        return 2;
    }
    iscsi_set_targetname(ctx, url->target);
    iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE);
    if (iscsi_full_connect_sync(ctx, url->portal, url->lun) != 0) {
        fprintf(stderr, "iscsi_load: login failed: %s\n", iscsi_get_error(ctx));
        return 1;
    }
    lun = url->lun;
    struct scsi_task *cap = iscsi_readcapacity16_sync(ctx, lun);
    if (cap == NULL || cap->status != SCSI_STATUS_GOOD) {
        fprintf(stderr, "iscsi_load: READ CAPACITY(16) failed: %s\n", iscsi_get_error(ctx));
        return 1;
    }
    struct scsi_readcapacity16 *rc16 = scsi_datain_unmarshall(cap);
    lba_size = rc16->block_length;
    range_blocks = rc16->returned_lba + 1;
    if (range_bytes && range_bytes / lba_size < range_blocks)
        range_blocks = range_bytes / lba_size;
    scsi_free_scsi_task(cap);

    slots = calloc((size_t)depth, sizeof(*slots));
    latencies = malloc(sizeof(float) * MAX_SAMPLES);
    for (int i = 0; i < depth; i++) {
        slots[i].buf = aligned_alloc(4096, block_bytes);
        memset(slots[i].buf, 0xa5 ^ i, block_bytes);
        slots[i].iov.iov_base = slots[i].buf;
        slots[i].iov.iov_len = block_bytes;
    }

    double start = now(), end = start + seconds;
    for (int i = 0; i < depth; i++)
        submit(i);
    while (inflight > 0) {
        if (!stopping && now() >= end)
            stopping = 1;
        struct pollfd pfd = {.fd = iscsi_get_fd(ctx), .events = (short)iscsi_which_events(ctx)};
        if (poll(&pfd, 1, 100) < 0)
            break;
        if (iscsi_service(ctx, pfd.revents) < 0) {
            fprintf(stderr, "iscsi_load: connection failed: %s\n", iscsi_get_error(ctx));
            return 1;
        }
    }
    double elapsed = now() - start;
    qsort(latencies, nlat, sizeof(float), compare_floats);
    printf("{\"ios\": %" PRIu64 ", \"errors\": %" PRIu64 ", \"seconds\": %.3f, \"iops\": %.1f, "
           "\"mbps\": %.2f, \"lat_p50_us\": %.1f, \"lat_p99_us\": %.1f, \"lat_avg_us\": %.1f}\n",
           completed, failed, elapsed, completed / elapsed,
           completed * (double)block_bytes / elapsed / 1e6, percentile(0.5), percentile(0.99),
           elapsed * 1e6 * depth / (completed ? completed : 1));
    iscsi_logout_sync(ctx);
    iscsi_destroy_context(ctx);
    return failed ? 1 : 0;
}
