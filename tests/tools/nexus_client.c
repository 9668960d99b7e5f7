/*
 * nexus_client: a scripted libiscsi client with several sessions whose ISIDs the test chooses,
 * so that two sessions can be the same I_T nexus logged in through two access points
 * (tests/integration/chunk/test_fencing_login.py), and two initiators race COMPARE AND WRITE
 * (tests/integration/chunk/test_caw.py). A test tool may be C; the product is Python.
 *
 *   gcc -O2 -Wall -o nexus-client nexus_client.c -liscsi
 *   nexus-client INITIATOR          (then commands on stdin, one per line)
 *
 * Commands, each answered by one line on stdout:
 *   login NAME RND QUALIFIER URL   session NAME with ISID type random (0x80 RND(24) QUAL(16))
 *                                  -> "OK" or "ERR <message>"
 *   write NAME LBA BYTE            WRITE(16) of 4 KiB filled with BYTE (decimal) at LBA
 *                                  -> "GOOD" or "CHECK <key> <asc> <ascq>" (hex) or "ERR ..."
 *   read NAME LBA                  READ(16) of 4 KiB -> "DATA <first byte> <1 if all equal>"
 *   caw NAME LBA OLD NEW           COMPARE AND WRITE of one 512-byte block: all OLD -> all NEW
 *                                  -> "GOOD", "MISCOMPARE <information field>" or as write
 *   logout NAME                    -> "OK"
 * A UNIT ATTENTION (a new nexus, LUN data changed) is retried, as the Linux midlayer does.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define BLOCK 4096
#define MAX_SESSIONS 8

struct session {
    char name[32];
    struct iscsi_context *ctx;
    int lun;
};

static struct session sessions[MAX_SESSIONS];
static const char *initiator;

static struct session *find(const char *name)
{
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].ctx != NULL && strcmp(sessions[i].name, name) == 0)
            return &sessions[i];
    return NULL;
}

static void login(const char *name, uint32_t rnd, uint32_t qual, const char *url_text)
{
    struct session *s = NULL;
    for (int i = 0; i < MAX_SESSIONS && s == NULL; i++)
        if (sessions[i].ctx == NULL)
            s = &sessions[i];
    if (s == NULL || find(name) != NULL) {
        printf("ERR no free session slot or name in use\n");
        return;
    }
    struct iscsi_context *ctx = iscsi_create_context(initiator);
    struct iscsi_url *url = ctx ? iscsi_parse_full_url(ctx, url_text) : NULL;
    if (url == NULL) {
        printf("ERR bad URL\n");
        return;
    }
    iscsi_set_isid_random(ctx, rnd, qual);
    iscsi_set_session_type(ctx, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(ctx, ISCSI_HEADER_DIGEST_NONE);
    iscsi_set_targetname(ctx, url->target);
    if (iscsi_full_connect_sync(ctx, url->portal, url->lun) != 0) {
        printf("ERR login: %s\n", iscsi_get_error(ctx));
        iscsi_destroy_url(url);
        iscsi_destroy_context(ctx);
        return;
    }
    snprintf(s->name, sizeof s->name, "%s", name);
    s->ctx = ctx;
    s->lun = url->lun;
    iscsi_destroy_url(url);
    printf("OK\n");
}

static int unit_attention(struct scsi_task *task)
{
    return task != NULL && task->status == SCSI_STATUS_CHECK_CONDITION &&
           task->sense.key == SCSI_SENSE_UNIT_ATTENTION;
}

static void report(struct session *s, struct scsi_task *task)
{
    if (task == NULL)
        printf("ERR %s\n", iscsi_get_error(s->ctx));
    else if (task->status == SCSI_STATUS_GOOD)
        printf("GOOD\n");
    else if (task->status == SCSI_STATUS_CHECK_CONDITION)
        printf("CHECK %x %x %x\n", task->sense.key, task->sense.ascq >> 8,
               task->sense.ascq & 0xff);
    else
        printf("ERR status %d\n", task->status);
}

static void write_block(struct session *s, uint64_t lba, int byte)
{
    unsigned char buf[BLOCK];
    memset(buf, byte, sizeof buf);
    struct scsi_task *task = NULL;
    for (int attempt = 0; attempt < 5; attempt++) {
        if (task != NULL)
            scsi_free_scsi_task(task);
        task = iscsi_write16_sync(s->ctx, s->lun, lba, buf, BLOCK, 512, 0, 0, 1, 0, 0);
        if (!unit_attention(task))
            break;
    }
    report(s, task);
    if (task != NULL)
        scsi_free_scsi_task(task);
}

static void read_block(struct session *s, uint64_t lba)
{
    struct scsi_task *task = NULL;
    for (int attempt = 0; attempt < 5; attempt++) {
        if (task != NULL)
            scsi_free_scsi_task(task);
        task = iscsi_read16_sync(s->ctx, s->lun, lba, BLOCK, 512, 0, 0, 0, 0, 0);
        if (!unit_attention(task))
            break;
    }
    if (task != NULL && task->status == SCSI_STATUS_GOOD && task->datain.size == BLOCK) {
        int same = 1;
        for (int i = 1; i < BLOCK; i++)
            same &= task->datain.data[i] == task->datain.data[0];
        printf("DATA %d %d\n", task->datain.data[0], same);
    } else {
        report(s, task);
    }
    if (task != NULL)
        scsi_free_scsi_task(task);
}

/* The INFORMATION field of fixed (70h/71h) or descriptor (72h/73h) sense data, -1 if none. */
static long long sense_information(const struct scsi_task *task)
{
    if (task->datain.size < 2 + 8)
        return -1;
    const unsigned char *sense = task->datain.data + 2;
    int len = task->datain.size - 2;
    if ((sense[0] & 0x7e) == 0x70 && (sense[0] & 0x80))
        return ((long long)sense[3] << 24) | (sense[4] << 16) | (sense[5] << 8) | sense[6];
    if ((sense[0] & 0x7e) == 0x72) {
        for (int at = 8; at + 12 <= len; at += 2 + sense[at + 1])
            if (sense[at] == 0x00) {
                long long v = 0;
                for (int i = 0; i < 8; i++)
                    v = (v << 8) | sense[at + 4 + i];
                return v;
            }
    }
    return -1;
}

static void compare_and_write(struct session *s, uint64_t lba, int old, int new)
{
    unsigned char buf[1024];
    memset(buf, old, 512);
    memset(buf + 512, new, 512);
    struct scsi_task *task = NULL;
    for (int attempt = 0; attempt < 5; attempt++) {
        if (task != NULL)
            scsi_free_scsi_task(task);
        task = iscsi_compareandwrite_sync(s->ctx, s->lun, lba, buf, sizeof buf, 512, 0, 0, 0, 0, 0);
        if (!unit_attention(task))
            break;
    }
    if (task != NULL && task->status == SCSI_STATUS_CHECK_CONDITION &&
        task->sense.key == SCSI_SENSE_MISCOMPARE)
        printf("MISCOMPARE %lld\n", sense_information(task));
    else
        report(s, task);
    if (task != NULL)
        scsi_free_scsi_task(task);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: nexus-client INITIATOR < commands\n");
        return 2;
    }
    initiator = argv[1];
    setvbuf(stdout, NULL, _IOLBF, 0);
    char line[1024], cmd[16], name[32], url[512];
    while (fgets(line, sizeof line, stdin) != NULL) {
        unsigned long long a = 0, b = 0, c = 0;
        struct session *s;
        if (sscanf(line, "login %31s %llu %llu %511s", name, &a, &b, url) == 4) {
            login(name, (uint32_t)a, (uint32_t)b, url);
            continue;
        }
        if (sscanf(line, "%15s %31s", cmd, name) != 2 || (s = find(name)) == NULL) {
            printf("ERR unknown command or session\n");
            continue;
        }
        if (strcmp(cmd, "write") == 0 && sscanf(line, "write %*s %llu %llu", &a, &b) == 2)
            write_block(s, a, (int)b);
        else if (strcmp(cmd, "caw") == 0 &&
                 sscanf(line, "caw %*s %llu %llu %llu", &a, &b, &c) == 3)
            compare_and_write(s, a, (int)b, (int)c);
        else if (strcmp(cmd, "read") == 0 && sscanf(line, "read %*s %llu", &a) == 1)
            read_block(s, a);
        else if (strcmp(cmd, "logout") == 0) {
            iscsi_logout_sync(s->ctx);
            iscsi_destroy_context(s->ctx);
            s->ctx = NULL;
            printf("OK\n");
        } else
            printf("ERR unknown command\n");
    }
    for (int i = 0; i < MAX_SESSIONS; i++)
        if (sessions[i].ctx != NULL) {
            iscsi_logout_sync(sessions[i].ctx);
            iscsi_destroy_context(sessions[i].ctx);
        }
    return 0;
}
