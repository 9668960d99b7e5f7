/*
 * capacity_watch: a libiscsi client that holds one session open across an online expansion
 * and reports what the target tells it (tests/integration/chunk/test_snapshots.py). A test
 * tool may be C; the product is Python.
 *
 *   gcc -O2 -o capacity-watch capacity_watch.c -liscsi
 *   capacity-watch URL INITIATOR GO_FILE
 *
 * It logs in, prints "SIZE <bytes>" from READ CAPACITY (16), then sends TEST UNIT READY
 * every 100 ms (which also keeps the session busy, so it is never dropped as silent) and
 * prints "SENSE <key> <asc> <ascq>" (hex) for every CHECK CONDITION. Once GO_FILE exists and
 * a UNIT ATTENTION was seen (or 20 s after GO_FILE appeared) it prints "SIZE <bytes>" again
 * and exits 0.
 */
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int print_size(struct iscsi_context *ctx, int lun)
{
    struct scsi_task *task = iscsi_readcapacity16_sync(ctx, lun);
    if (task == NULL || task->status != SCSI_STATUS_GOOD) {
        fprintf(stderr, "capacity_watch: READ CAPACITY 16 failed: %s\n", iscsi_get_error(ctx));
        return 1;
    }
    struct scsi_readcapacity16 *rc = scsi_datain_unmarshall(task);
    if (rc == NULL) {
        fprintf(stderr, "capacity_watch: cannot decode READ CAPACITY 16\n");
        return 1;
    }
    printf("SIZE %llu\n", (unsigned long long)(rc->returned_lba + 1) * rc->block_length);
    scsi_free_scsi_task(task);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: capacity-watch URL INITIATOR GO_FILE\n");
        return 2;
    }
    struct iscsi_context *ctx = iscsi_create_context(argv[2]);
    struct iscsi_url *url = ctx ? iscsi_parse_full_url(ctx, argv[1]) : NULL;
    if (url == NULL) {
        fprintf(stderr, "capacity_watch: bad URL %s\n", argv[1]);
        return 2;
    }
    iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    iscsi_set_targetname(ctx, url->target);
    if (iscsi_full_connect_sync(ctx, url->portal, url->lun) != 0) {
        fprintf(stderr, "capacity_watch: login failed: %s\n", iscsi_get_error(ctx));
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (print_size(ctx, url->lun))
        return 1;
    double go = 0;
    int attention = 0;
    for (;;) {
        if (go == 0 && access(argv[3], F_OK) == 0)
            go = now();
        if (go != 0 && (attention || now() - go > 20))
            break;
        struct scsi_task *task = iscsi_testunitready_sync(ctx, url->lun);
        if (task == NULL) {
            fprintf(stderr, "capacity_watch: TEST UNIT READY failed: %s\n", iscsi_get_error(ctx));
            return 1;
        }
        if (task->status == SCSI_STATUS_CHECK_CONDITION) {
            printf("SENSE %x %02x %02x\n", task->sense.key, (task->sense.ascq >> 8) & 0xff,
                   task->sense.ascq & 0xff);
            if (task->sense.key == SCSI_SENSE_UNIT_ATTENTION)
                attention = 1;
        }
        scsi_free_scsi_task(task);
        poll(NULL, 0, 100);
    }
    int rc = print_size(ctx, url->lun);
    iscsi_logout_sync(ctx);
    iscsi_destroy_url(url);
    iscsi_destroy_context(ctx);
    return rc;
}
