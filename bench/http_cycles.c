/*
 * http_cycles: the control-plane bench's REST client (bench/control_plane.py).
 *
 * CLIENTS keep-alive HTTP/1.1 connections to meta, each running volume cycles one request at a
 * time until OPS cycles are done between them: create (POST /v1/volumes, 201, the volume's id
 * read from the JSON), publish (POST .../exports, 201), unpublish (DELETE .../exports/INITIATOR,
 * 204), delete (DELETE /v1/volumes/ID, 204). Prints one line per cycle, "CP_NS UD_NS" (the
 * create+publish and unpublish+delete latencies, in completion order), then "elapsed SECONDS"
 * (from the first request to the last answer) and "cpu SECONDS" (this process's user + system
 * CPU).
 *
 * Why C: the bench runs this client, meta and etcd on the same two cores, while in production
 * the REST clients (the CSI driver on the nodes) run on other machines. Every microsecond the
 * client spends is one meta and etcd do not get, and the anchor it is compared with has no
 * HTTP client at all. One epoll loop, one send per request, one recv per response (meta
 * answers whole responses), ~5 us of CPU a request against ~90 for asyncio.
 *
 * The requests are byte for byte the ones aiohttp's client sends (bench/control_plane.py passes
 * the header lines): request line, HEADERS, Content-Length, Content-Type for a JSON body, the
 * body as Python's json.dumps writes it. A response must have Content-Length (no chunked
 * bodies, no interim responses) and the expected status; anything else ends the run with a
 * message on stderr and exit status 1, never a guess.
 *
 *   gcc -O2 -o http-cycles http_cycles.c
 *   http-cycles HOST PORT CLIENTS OPS NAME_PREFIX INITIATOR_PREFIX HEADERS
 *
 * Each connection first gets one untimed GET /healthz (200). Volume n is named NAME_PREFIX-n; client c publishes to INITIATOR_PREFIX-c... (INITIATOR_PREFIX
 * followed by c). HEADERS: the header lines after the request line, each ending in CRLF.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IN_BUFFER 65536
#define OUT_BUFFER 4096
#define ID_MAX 128

enum step { CREATE, PUBLISH, UNPUBLISH, DELETE, WARM_UP };
static const int EXPECTED[] = {201, 201, 204, 204, 200};
static const char *STEP_NAME[] = {"create", "publish", "unpublish", "delete", "warm-up"};

struct conn {
    int fd;
    int index;
    enum step step;
    long cycle;
    char id[ID_MAX];
    char initiator[256];
    uint64_t start_ns, mid_ns;
    char in[IN_BUFFER];
    size_t have;
};

static const char *headers;
static const char *name_prefix;
static long ops, next_cycle, done_cycles;
static uint64_t *cp_ns, *ud_ns;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "http-cycles: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Send one request: method, path and, when body is not NULL, a JSON body. */
static void send_request(struct conn *c, const char *method, const char *path, const char *body) {
    char out[OUT_BUFFER];
    int n;
    if (body == NULL)
        n = snprintf(out, sizeof out, "%s %s HTTP/1.1\r\n%sContent-Length: 0\r\n\r\n", method,
                     path, headers);
    else
        n = snprintf(out, sizeof out,
                     "%s %s HTTP/1.1\r\n%sContent-Length: %zu\r\nContent-Type: "
                     "application/json\r\n\r\n%s",
                     method, path, headers, strlen(body), body);
    if (n < 0 || (size_t)n >= sizeof out)
        die("request for %s too long", path);
    ssize_t sent = send(c->fd, out, (size_t)n, MSG_NOSIGNAL);
    if (sent != n)  /* a few hundred bytes into an empty socket buffer: all or an error */
        die("send on connection %d: %s", c->index, sent < 0 ? strerror(errno) : "short send");
}

/* The next request of c's cycle; a new cycle (or nothing, when all are taken) after DELETE. */
static void issue(struct conn *c) {
    char path[512], body[512];
    switch (c->step) {
    case CREATE:
        if (next_cycle >= ops) {
            c->cycle = -1;
            return;
        }
        c->cycle = next_cycle++;
        snprintf(body, sizeof body, "{\"name\": \"%s-%ld\", \"size_bytes\": 1073741824}",
                 name_prefix, c->cycle);
        c->start_ns = now_ns();
        send_request(c, "POST", "/v1/volumes", body);
        break;
    case PUBLISH:
        snprintf(path, sizeof path, "/v1/volumes/%s/exports", c->id);
        snprintf(body, sizeof body, "{\"initiator\": \"%s\"}", c->initiator);
        send_request(c, "POST", path, body);
        break;
    case UNPUBLISH:
        snprintf(path, sizeof path, "/v1/volumes/%s/exports/%s", c->id, c->initiator);
        send_request(c, "DELETE", path, NULL);
        break;
    case DELETE:
        snprintf(path, sizeof path, "/v1/volumes/%s", c->id);
        send_request(c, "DELETE", path, NULL);
        break;
    case WARM_UP:
        send_request(c, "GET", "/healthz", NULL);
        break;
    }
}

/* The value of the top-level "id" member of a create's JSON answer (volume ids are
 * [a-z0-9-]); dies if there is none. */
static void read_id(struct conn *c, const char *body, size_t len) {
    const char *p = memmem(body, len, "\"id\"", 4), *end = body + len;
    if (p == NULL)
        die("create answer without an id: %.*s", (int)(len < 300 ? len : 300), body);
    p += 4;
    while (p < end && (*p == ' ' || *p == ':'))
        p++;
    if (p >= end || *p != '"')
        die("create answer's id is not a string");
    p++;
    size_t n = 0;
    while (p + n < end && p[n] != '"') {
        char ch = p[n];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-') || n >= ID_MAX - 1)
            die("create answer's id is not a volume id");
        n++;
    }
    memcpy(c->id, p, n);
    c->id[n] = 0;
}

/* A whole response in c->in: check it, move c to its next step. Returns 0 while incomplete. */
static int take_response(struct conn *c) {
    char *head_end = memmem(c->in, c->have, "\r\n\r\n", 4);
    if (head_end == NULL) {
        if (c->have == IN_BUFFER)
            die("response headers over %d bytes", IN_BUFFER);
        return 0;
    }
    size_t head_len = (size_t)(head_end - c->in) + 4;
    if (c->have < 12 || (memcmp(c->in, "HTTP/1.1 ", 9) != 0 && memcmp(c->in, "HTTP/1.0 ", 9) != 0))
        die("bad status line: %.40s", c->in);
    int status = atoi(c->in + 9);
    long length = -1;
    int close_after = memcmp(c->in, "HTTP/1.0 ", 9) == 0;
    for (char *line = memchr(c->in, '\n', head_len) + 1; line < head_end;) {
        char *eol = memmem(line, (size_t)(head_end + 2 - line), "\r\n", 2);
        char *colon = memchr(line, ':', (size_t)(eol - line));
        if (colon == NULL)
            die("bad header line: %.*s", (int)(eol - line), line);
        size_t name_len = (size_t)(colon - line);
        char *value = colon + 1;
        while (*value == ' ')
            value++;
        if (name_len == 14 && strncasecmp(line, "content-length", 14) == 0)
            length = strtol(value, NULL, 10);
        else if (name_len == 17 && strncasecmp(line, "transfer-encoding", 17) == 0)
            die("Transfer-Encoding %.*s not supported", (int)(eol - value), value);
        else if (name_len == 10 && strncasecmp(line, "connection", 10) == 0)
            close_after = strncasecmp(value, "close", 5) == 0;
        line = eol + 2;
    }
    if (status < 200)
        die("interim response %d not supported", status);
    if (length < 0) {
        if (status != 204 && status != 304)
            die("status %d without Content-Length", status);
        length = 0;
    }
    if (head_len + (size_t)length > IN_BUFFER)
        die("response of %zu bytes over the buffer", head_len + (size_t)length);
    if (c->have < head_len + (size_t)length)
        return 0;
    if (c->have > head_len + (size_t)length)
        die("data beyond the response");
    const char *body = c->in + head_len;
    if (status != EXPECTED[c->step])
        die("%s: status %d, expected %d: %.*s", STEP_NAME[c->step], status, EXPECTED[c->step],
            (int)(length < 500 ? length : 500), body);
    if (close_after)  /* one connection per client for the whole run */
        die("the server closes the connection");
    c->have = 0;
    uint64_t t = now_ns();
    switch (c->step) {
    case CREATE:
        read_id(c, body, (size_t)length);
        c->step = PUBLISH;
        break;
    case PUBLISH:
        c->mid_ns = t;
        c->step = UNPUBLISH;
        break;
    case UNPUBLISH:
        c->step = DELETE;
        break;
    case DELETE:
        cp_ns[done_cycles] = c->mid_ns - c->start_ns;
        ud_ns[done_cycles] = t - c->mid_ns;
        done_cycles++;
        c->step = CREATE;
        break;
    case WARM_UP:
        c->step = CREATE;
        break;
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 8)
        die("usage: http-cycles HOST PORT CLIENTS OPS NAME_PREFIX INITIATOR_PREFIX HEADERS");
    int clients = atoi(argv[3]);
    ops = atol(argv[4]);
    name_prefix = argv[5];
    headers = argv[7];
    if (clients <= 0 || ops <= 0)
        die("CLIENTS and OPS must be positive");
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1)
        die("HOST must be an IPv4 address: %s", argv[1]);
    cp_ns = calloc((size_t)ops, sizeof *cp_ns);
    ud_ns = calloc((size_t)ops, sizeof *ud_ns);
    struct conn *conns = calloc((size_t)clients, sizeof *conns);
    int ep = epoll_create1(0);
    if (cp_ns == NULL || ud_ns == NULL || conns == NULL || ep < 0)
        die("out of memory or epoll: %s", strerror(errno));
    /* Connected, and each connection answered once (GET /healthz), before the first timed
     * request, as the anchor's gRPC channel is: a burst of requests on connections the
     * server has not accepted yet times its accepting them too (~100 ms more at 50). */
    for (int i = 0; i < clients; i++) {
        struct conn *c = &conns[i];
        c->index = i;
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) != 0)
            die("connect to %s:%s: %s", argv[1], argv[2], strerror(errno));
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        snprintf(c->initiator, sizeof c->initiator, "%s%d", argv[6], i);
        c->step = WARM_UP;
        issue(c);
        while (c->step == WARM_UP) {
            ssize_t got = recv(c->fd, c->in + c->have, IN_BUFFER - c->have, 0);
            if (got <= 0)
                die("connection %d %s before its first answer", i, got == 0 ? "closed" : strerror(errno));
            c->have += (size_t)got;
            take_response(c);
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0)
            die("epoll_ctl: %s", strerror(errno));
    }
    int active = 0;
    uint64_t started = now_ns();
    for (int i = 0; i < clients; i++) {
        issue(&conns[i]);
        active += conns[i].cycle >= 0;
    }
    struct epoll_event events[64];
    while (active > 0) {
        int n = epoll_wait(ep, events, 64, 60000);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            die("no answer from the server in 60 s");
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            ssize_t got = recv(c->fd, c->in + c->have, IN_BUFFER - c->have, 0);
            if (got <= 0)
                die("connection %d %s mid-response", c->index, got == 0 ? "closed" : strerror(errno));
            c->have += (size_t)got;
            if (!take_response(c))
                continue;
            issue(c);
            if (c->cycle < 0)
                active--;
        }
    }
    uint64_t elapsed = now_ns() - started;
    for (long i = 0; i < done_cycles; i++)
        printf("%llu %llu\n", (unsigned long long)cp_ns[i], (unsigned long long)ud_ns[i]);
    printf("elapsed %.6f\n", elapsed / 1e9);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("cpu %.6f\n", ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                              ru.ru_stime.tv_usec / 1e6);
    return 0;
}
