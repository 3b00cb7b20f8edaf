/* The tunnel's byte relay, native: after the node has authenticated a data-plane stream in
 * Python, one call of sharedllm_relay() copies a local connection (the engine's) and the
 * peer's TCP connection both ways until both directions end, without waking the interpreter.
 *
 * On the peer's side each direction is a sequence of records sealed with AES-256-GCM:
 *   | length (4 bytes, big-endian) | ciphertext | tag (16) |
 * The length covers ciphertext and tag and is the record's associated data; the nonce is the
 * direction's record counter, so a record cut, reordered, replayed or forged fails to open.
 * A record with no plaintext ends its direction (TCP half-close on the local side).
 * The keys are fresh for each tunnel (see native_relay.py), never reused.
 *
 * libcrypto's EVP interface is declared here rather than included, so that only the shared
 * library (which Python's ssl module already loads) is needed, not its headers.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
extern EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
extern void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
extern const EVP_CIPHER *EVP_aes_256_gcm(void);
extern int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr);
extern int EVP_EncryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                              const unsigned char *);
extern int EVP_EncryptUpdate(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
extern int EVP_EncryptFinal_ex(EVP_CIPHER_CTX *, unsigned char *, int *);
extern int EVP_DecryptInit_ex(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                              const unsigned char *);
extern int EVP_DecryptUpdate(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
extern int EVP_DecryptFinal_ex(EVP_CIPHER_CTX *, unsigned char *, int *);

#define GCM_SET_TAG 0x11
#define GCM_GET_TAG 0x10
#define TAG 16
#define HEAD 4
#define MAX_PLAIN (256 * 1024)
#define MAX_RECORD (HEAD + MAX_PLAIN + TAG)
#define RPC_COMMANDS 32
#define RPC_HEADER 9
#define RPC_SANE_SIZE (1ULL << 40)

/* Read by Python while the relay runs (sampled; each field is one aligned word). */
struct relay_counters {
    uint64_t bytes_out, bytes_back, wire_out, wire_back, round_trips;
    uint64_t rpc_lost;
    uint64_t rpc_requests[RPC_COMMANDS];
    uint64_t rpc_bytes[RPC_COMMANDS];
};

struct rpc_watch { /* llama.cpp RPC requests: | command (1) | size (8, little-endian) | payload | */
    unsigned char header[RPC_HEADER];
    int have;
    uint64_t skip;
    int commands;
};

struct direction {
    EVP_CIPHER_CTX *cipher;
    uint64_t counter;
    unsigned char *buffer; /* a record being written, or (inbound) read then opened */
    size_t filled, sent;
    unsigned char *plain;  /* inbound: the opened record's plaintext, being written locally */
    size_t plain_len, plain_sent;
    int ended;             /* the end record went (outbound) or came and was passed on */
};

struct relay {
    int local, remote, stop;
    struct direction out, in;
    unsigned char *chunk; /* one local read */
    struct relay_counters *counters;
    struct rpc_watch *watch;
    int last; /* +1 after outbound data, -1 after inbound: a turn from out to back is a trip */
    uint64_t spin_us, active_us; /* how long to look again after activity; when it last was */
    char *error;
    size_t error_len;
};

static uint64_t now_us(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u;
}

static int fail(struct relay *r, const char *what) {
    snprintf(r->error, r->error_len, "%s%s%s", what, errno ? ": " : "", errno ? strerror(errno) : "");
    return -1;
}

static void nonce_of(uint64_t counter, unsigned char nonce[12]) {
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++) nonce[4 + i] = (unsigned char)(counter >> (56 - 8 * i));
}

static void watch_rpc(struct rpc_watch *w, struct relay_counters *c, const unsigned char *p, size_t n) {
    while (n > 0 && !c->rpc_lost) {
        if (w->skip) {
            size_t step = w->skip < n ? (size_t)w->skip : n;
            w->skip -= step, p += step, n -= step;
            continue;
        }
        size_t need = RPC_HEADER - (size_t)w->have, step = need < n ? need : n;
        memcpy(w->header + w->have, p, step);
        w->have += (int)step, p += step, n -= step;
        if (w->have < RPC_HEADER) break;
        w->have = 0;
        uint64_t size = 0;
        for (int i = 8; i >= 1; i--) size = (size << 8) | w->header[i];
        if (w->header[0] >= w->commands || size > RPC_SANE_SIZE) {
            c->rpc_lost = 1;
            break;
        }
        c->rpc_requests[w->header[0]] += 1;
        c->rpc_bytes[w->header[0]] += size;
        w->skip = size;
    }
}

/* Seals `len` plaintext bytes (0: the end record) into out.buffer. */
static int seal(struct relay *r, const unsigned char *plain, int len) {
    struct direction *d = &r->out;
    unsigned char nonce[12];
    int size = len + TAG, got = 0, tail = 0;
    d->buffer[0] = (unsigned char)(size >> 24), d->buffer[1] = (unsigned char)(size >> 16);
    d->buffer[2] = (unsigned char)(size >> 8), d->buffer[3] = (unsigned char)size;
    nonce_of(d->counter++, nonce);
    if (!EVP_EncryptInit_ex(d->cipher, NULL, NULL, NULL, nonce) ||
        !EVP_EncryptUpdate(d->cipher, NULL, &got, d->buffer, HEAD) ||
        (len > 0 && !EVP_EncryptUpdate(d->cipher, d->buffer + HEAD, &got, plain, len)) ||
        !EVP_EncryptFinal_ex(d->cipher, d->buffer + HEAD + len, &tail) ||
        !EVP_CIPHER_CTX_ctrl(d->cipher, GCM_GET_TAG, TAG, d->buffer + HEAD + len))
        return fail(r, "sealing a record failed");
    d->filled = (size_t)(HEAD + size), d->sent = 0;
    r->counters->wire_out += d->filled;
    return 0;
}

/* Opens the complete record in in.buffer into in.plain. */
static int open_record(struct relay *r, size_t size) {
    struct direction *d = &r->in;
    unsigned char nonce[12];
    int len = (int)size - TAG, got = 0, tail = 0;
    nonce_of(d->counter++, nonce);
    if (!EVP_DecryptInit_ex(d->cipher, NULL, NULL, NULL, nonce) ||
        !EVP_DecryptUpdate(d->cipher, NULL, &got, d->buffer, HEAD) ||
        (len > 0 && !EVP_DecryptUpdate(d->cipher, d->plain, &got, d->buffer + HEAD, len)) ||
        !EVP_CIPHER_CTX_ctrl(d->cipher, GCM_SET_TAG, TAG, d->buffer + HEAD + len) ||
        EVP_DecryptFinal_ex(d->cipher, d->plain + (len > 0 ? len : 0), &tail) <= 0) {
        errno = 0;
        return fail(r, "a record from the peer failed authentication");
    }
    d->plain_len = (size_t)len, d->plain_sent = 0;
    return 0;
}

static int write_remote(struct relay *r);

/* Reads what the local side has, seals it and sends as much as the peer's socket takes now. */
static int read_local(struct relay *r) {
    ssize_t got = recv(r->local, r->chunk, MAX_PLAIN, 0);
    if (got < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : fail(r, "local read");
    if (got > 0) {
        if (r->watch) watch_rpc(r->watch, r->counters, r->chunk, (size_t)got);
        r->counters->bytes_out += (uint64_t)got;
        r->last = 1;
    }
    if (seal(r, r->chunk, (int)got) < 0) return -1;
    return write_remote(r);
}

static int write_remote(struct relay *r) {
    struct direction *d = &r->out;
    ssize_t sent = send(r->remote, d->buffer + d->sent, d->filled - d->sent, MSG_NOSIGNAL);
    if (sent < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : fail(r, "send to the peer");
    d->sent += (size_t)sent;
    if (d->sent == d->filled) {
        if (d->filled == HEAD + TAG) d->ended = 1; /* the end record is out */
        d->filled = d->sent = 0;
    }
    return 0;
}

static size_t record_size(const unsigned char *head) {
    return ((size_t)head[0] << 24) | ((size_t)head[1] << 16) | ((size_t)head[2] << 8) | head[3];
}

static int write_local(struct relay *r);

/* Reads the peer's next record as far as it has arrived; once whole, opens it and writes it
 * to the local side as far as that takes it now. Reads never go past the record. */
static int read_remote(struct relay *r) {
    struct direction *d = &r->in;
    size_t size = 0;
    for (;;) {
        if (d->filled >= HEAD) size = record_size(d->buffer); /* checked when its head came */
        size_t want = d->filled < HEAD ? HEAD - d->filled : HEAD + size - d->filled;
        ssize_t got = recv(r->remote, d->buffer + d->filled, want, 0);
        if (got < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : fail(r, "read from the peer");
        if (got == 0) {
            errno = 0;
            return fail(r, "the peer's stream ended without an end record");
        }
        d->filled += (size_t)got;
        if (d->filled < HEAD) continue;
        size = record_size(d->buffer);
        if (size < TAG || size > MAX_PLAIN + TAG) {
            errno = 0;
            return fail(r, "a record from the peer has an impossible length");
        }
        if (d->filled == HEAD + size) break;
    }
    d->filled = 0;
    if (open_record(r, size) < 0) return -1;
    r->counters->wire_back += HEAD + size;
    r->counters->bytes_back += d->plain_len;
    if (d->plain_len > 0) {
        if (r->last > 0) r->counters->round_trips += 1;
        r->last = -1;
        return write_local(r);
    } else if (shutdown(r->local, SHUT_WR) < 0 && errno != ENOTCONN) {
        return fail(r, "local half-close");
    } else {
        d->ended = 1;
    }
    return 0;
}

static int write_local(struct relay *r) {
    struct direction *d = &r->in;
    ssize_t sent = send(r->local, d->plain + d->plain_sent, d->plain_len - d->plain_sent, MSG_NOSIGNAL);
    if (sent < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : fail(r, "local write");
    d->plain_sent += (size_t)sent;
    if (d->plain_sent == d->plain_len) d->plain_len = d->plain_sent = 0;
    return 0;
}

static int step(struct relay *r) {
    struct pollfd fds[3] = {{r->local, 0, 0}, {r->remote, 0, 0}, {r->stop, POLLIN, 0}};
    int out_busy = r->out.filled > 0, in_busy = r->in.plain_len > 0;
    if (!r->out.ended && !out_busy) fds[0].events |= POLLIN;
    if (out_busy) fds[1].events |= POLLOUT;
    if (!r->in.ended && !in_busy) fds[1].events |= POLLIN;
    if (in_busy) fds[0].events |= POLLOUT;
    for (int i = 0; i < 2; i++)
        if (!fds[i].events) fds[i].fd = -1; /* not waited on: its hang-up must not spin us */
    /* An engine's messages come in bursts (a token's tensors, then its graph). Where the
     * node has cores to spare, the relay looks again without sleeping for `spin_us` after
     * each one: waking a sleeping thread costs more than the look. Then it sleeps. */
    int ready = 0;
    while (r->spin_us && now_us() - r->active_us < r->spin_us && (ready = poll(fds, 3, 0)) == 0) {
    }
    if (ready == 0) ready = poll(fds, 3, -1);
    if (ready < 0) return errno == EINTR ? 0 : fail(r, "poll");
    if (r->spin_us) r->active_us = now_us();
    if (fds[2].revents) {
        errno = 0;
        return fail(r, "stopped");
    }
    if ((fds[0].revents & (POLLOUT | POLLHUP | POLLERR)) && in_busy && write_local(r) < 0) return -1;
    if ((fds[1].revents & (POLLOUT | POLLHUP | POLLERR)) && out_busy && write_remote(r) < 0) return -1;
    if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) && (fds[0].events & POLLIN) &&
        r->out.filled == 0 && read_local(r) < 0)
        return -1;
    if ((fds[1].revents & (POLLIN | POLLHUP | POLLERR)) && (fds[1].events & POLLIN) &&
        r->in.plain_len == 0 && read_remote(r) < 0)
        return -1;
    if ((fds[0].revents | fds[1].revents) & POLLNVAL) {
        errno = 0;
        return fail(r, "a socket was closed under the relay");
    }
    return 0;
}

static int setup(struct direction *d, const unsigned char *key, int sending, size_t plain) {
    d->cipher = EVP_CIPHER_CTX_new();
    d->buffer = malloc(MAX_RECORD);
    d->plain = plain ? malloc(plain) : NULL;
    if (!d->cipher || !d->buffer || (plain && !d->plain)) return -1;
    if (sending) return EVP_EncryptInit_ex(d->cipher, EVP_aes_256_gcm(), NULL, key, NULL) ? 0 : -1;
    return EVP_DecryptInit_ex(d->cipher, EVP_aes_256_gcm(), NULL, key, NULL) ? 0 : -1;
}

static void teardown(struct direction *d) {
    if (d->cipher) EVP_CIPHER_CTX_free(d->cipher);
    free(d->buffer);
    free(d->plain);
}

/* Relays until both directions have ended (0), or something failed or `stop` became
 * readable (-1, with the reason in `error`). Both sockets must be non-blocking. `rpc_commands`
 * > 0 counts the local side's llama.cpp RPC requests into `counters`; `spin_us` > 0 polls
 * that long after activity before sleeping. */
int sharedllm_relay(int local, int remote, int stop, const unsigned char *send_key,
                    const unsigned char *receive_key, int rpc_commands, int spin_us,
                    struct relay_counters *counters, char *error, size_t error_len) {
    struct rpc_watch watch = {{0}, 0, 0, rpc_commands > RPC_COMMANDS ? RPC_COMMANDS : rpc_commands};
    struct relay r = {local, remote, stop, {0}, {0}, NULL, counters, rpc_commands > 0 ? &watch : NULL,
                      0,     spin_us > 0 ? (uint64_t)spin_us : 0, 0, error, error_len};
    int result = -1;
    errno = 0;
    r.chunk = malloc(MAX_PLAIN);
    if (!r.chunk || setup(&r.out, send_key, 1, 0) < 0 || setup(&r.in, receive_key, 0, MAX_PLAIN)) {
        fail(&r, "cannot set up the relay's ciphers");
    } else {
        while (!(r.out.ended && r.in.ended && r.in.plain_len == 0)) {
            if (step(&r) < 0) goto done;
        }
        result = 0;
    }
done:
    teardown(&r.out);
    teardown(&r.in);
    free(r.chunk);
    return result;
}
