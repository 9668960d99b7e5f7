/*
 * verified_writer: a libiscsi client that writes versioned, self-checking 4 KiB blocks in a loop
 * and records which writes the target acknowledged, and when (tests/integration/
 * test_redirector_failover.py). A test tool may be C; the product is Python.
 *
 *   gcc -O2 -o verified-writer verified_writer.c -liscsi
 *   verified-writer URL INITIATOR BLOCKS STRIDE_BYTES STOP_FILE
 *   verified-writer --read URL INITIATOR BLOCKS STRIDE_BYTES
 *
 * Block k lives at byte offset k * STRIDE_BYTES. Round r (from 1) writes version r of every
 * block in turn, synchronously, one command in flight. Before each write it prints
 *   I <block> <version> <monotonic seconds>
 * and after it
 *   A <block> <version> <monotonic seconds>    acknowledged (GOOD status)
 *   F <block> <version> <monotonic seconds>    failed
 * It stops after the write in progress once STOP_FILE exists (a file, not a signal: a signal
 * would interrupt libiscsi's poll and fail the write in flight). libiscsi's automatic reconnect
 * is on (its default, unlimited retries): after a broken connection it logs in again to the
 * portal in URL, the VIP, and reissues the commands in flight. The new session's first command
 * gets a UNIT ATTENTION (29h/00h, a new I_T nexus): like the Linux SCSI midlayer, the writer
 * retries a write that got one.
 *
 * Block contents: "lunastor block <k> version <v>\n", then byte i (from the start of the block)
 * is (i * 131 + k * 7 + v * 13) & 0xff — pattern() in the test builds the same bytes.
 *
 * With --read it writes nothing: it reads every block once and prints
 *   R <block> <version>       the block holds exactly version <version> of itself
 *   R <block> 0               the block reads as zeros (never written)
 *   R <block> bad <hex>       anything else (torn, stale block of another number, corrupt),
 *                             with its first 48 bytes
 * (tests/integration/chunk/test_fault_rounds.py reads a volume back this way: 4 KiB per block
 * instead of the whole volume).
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define BLOCK 4096

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void fill(unsigned char *buf, uint64_t block, uint64_t version)
{
    char head[64];
    int n = snprintf(head, sizeof head, "lunastor block %llu version %llu\n",
                     (unsigned long long)block, (unsigned long long)version);
    for (int i = 0; i < BLOCK; i++)
        buf[i] = (unsigned char)((i * 131 + block * 7 + version * 13) & 0xff);
    memcpy(buf, head, (size_t)n); /* without the NUL */
}

/* The version of `block` that buf holds: > 0, 0 for zeros, -1 for anything else. */
static long long version_of(const unsigned char *buf, uint64_t block)
{
    static const unsigned char zeros[BLOCK];
    if (memcmp(buf, zeros, BLOCK) == 0)
        return 0;
    unsigned long long k, v;
    if (sscanf((const char *)buf, "lunastor block %llu version %llu\n", &k, &v) != 2 ||
        k != block || v == 0)
        return -1;
    unsigned char want[BLOCK];
    fill(want, block, v);
    return memcmp(buf, want, BLOCK) == 0 ? (long long)v : -1;
}

static int read_back(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: verified-writer --read URL INITIATOR BLOCKS STRIDE_BYTES\n");
        return 2;
    }
    uint64_t blocks = strtoull(argv[4], NULL, 10), stride = strtoull(argv[5], NULL, 10);
    struct iscsi_context *ctx = iscsi_create_context(argv[3]);
    struct iscsi_url *url = ctx ? iscsi_parse_full_url(ctx, argv[2]) : NULL;
    if (url == NULL) {
        fprintf(stderr, "verified_writer: bad URL %s\n", argv[2]);
        return 2;
    }
    iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    iscsi_set_targetname(ctx, url->target);
    if (iscsi_full_connect_sync(ctx, url->portal, url->lun) != 0) {
        fprintf(stderr, "verified_writer: login failed: %s\n", iscsi_get_error(ctx));
        return 1;
    }
    int status = 0;
    for (uint64_t k = 0; k < blocks; k++) {
        struct scsi_task *task = NULL;
        for (int attempt = 0; attempt < 5; attempt++) {
            if (task != NULL)
                scsi_free_scsi_task(task);
            task = iscsi_read16_sync(ctx, url->lun, k * stride / 512, BLOCK, 512, 0, 0, 0, 0, 0);
            if (task == NULL || task->status != SCSI_STATUS_CHECK_CONDITION ||
                task->sense.key != SCSI_SENSE_UNIT_ATTENTION)
                break;
        }
        if (task == NULL || task->status != SCSI_STATUS_GOOD || task->datain.size != BLOCK) {
            fprintf(stderr, "verified_writer: read of block %llu failed: %s\n",
                    (unsigned long long)k, iscsi_get_error(ctx));
            status = 1;
        } else {
            long long v = version_of(task->datain.data, k);
            if (v >= 0) {
                printf("R %llu %lld\n", (unsigned long long)k, v);
            } else {
                printf("R %llu bad ", (unsigned long long)k);
                for (int i = 0; i < 48; i++)
                    printf("%02x", task->datain.data[i]);
                printf("\n");
            }
        }
        if (task != NULL)
            scsi_free_scsi_task(task);
    }
    iscsi_logout_sync(ctx);
    iscsi_destroy_url(url);
    iscsi_destroy_context(ctx);
    return status;
}

int main(int argc, char **argv)
{
    /* Dies with the test that started it: a harness stopped mid-test must not leave it behind,
     * reconnecting (libiscsi retries forever) to a portal that is gone; one did, for an hour,
     * at two thirds of a core. Not under `docker exec` (docker/client.Dockerfile sets
     * VERIFIED_WRITER_NO_PDEATHSIG): there the parent is runc, which exits once we run, so
     * whether runc's exit came after this call decided whether we were killed at once (compose
     * tests failed with 137 under load); the container's end ends us there. */
    if (getenv("VERIFIED_WRITER_NO_PDEATHSIG") == NULL)
        prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (argc > 1 && strcmp(argv[1], "--read") == 0)
        return read_back(argc, argv);
    if (argc != 6) {
        fprintf(stderr, "usage: verified-writer URL INITIATOR BLOCKS STRIDE_BYTES STOP_FILE\n");
        return 2;
    }
    uint64_t blocks = strtoull(argv[3], NULL, 10), stride = strtoull(argv[4], NULL, 10);
    struct iscsi_context *ctx = iscsi_create_context(argv[2]);
    struct iscsi_url *url = ctx ? iscsi_parse_full_url(ctx, argv[1]) : NULL;
    if (url == NULL) {
        fprintf(stderr, "verified_writer: bad URL %s\n", argv[1]);
        return 2;
    }
    iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    iscsi_set_targetname(ctx, url->target);
    if (iscsi_full_connect_sync(ctx, url->portal, url->lun) != 0) {
        fprintf(stderr, "verified_writer: login failed: %s\n", iscsi_get_error(ctx));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    unsigned char buf[BLOCK];
    int stopping = 0;
    for (uint64_t version = 1; !stopping; version++) {
        for (uint64_t k = 0; k < blocks && !(stopping = access(argv[5], F_OK) == 0); k++) {
            fill(buf, k, version);
            printf("I %llu %llu %.6f\n", (unsigned long long)k, (unsigned long long)version, now());
            struct scsi_task *task = NULL;
            for (int attempt = 0; attempt < 5; attempt++) {
                if (task != NULL)
                    scsi_free_scsi_task(task);
                task = iscsi_write16_sync(ctx, url->lun, k * stride / 512, buf, BLOCK, 512, 0, 0,
                                          1, 0, 0);
                if (task == NULL || task->status != SCSI_STATUS_CHECK_CONDITION ||
                    task->sense.key != SCSI_SENSE_UNIT_ATTENTION)
                    break;
                fprintf(stderr, "verified_writer: block %llu version %llu: %s, retrying\n",
                        (unsigned long long)k, (unsigned long long)version, iscsi_get_error(ctx));
            }
            int good = task != NULL && task->status == SCSI_STATUS_GOOD;
            printf("%c %llu %llu %.6f\n", good ? 'A' : 'F', (unsigned long long)k,
                   (unsigned long long)version, now());
            if (!good)
                fprintf(stderr, "verified_writer: write failed: %s\n", iscsi_get_error(ctx));
            if (task != NULL)
                scsi_free_scsi_task(task);
        }
    }
    iscsi_logout_sync(ctx);
    iscsi_destroy_url(url);
    iscsi_destroy_context(ctx);
    return 0;
}
