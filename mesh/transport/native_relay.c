/* The tunnel's byte relay, native: after the node has authenticated a data-plane stream in
 * Python, one call of sharedllm_relay() copies a local connection (the engine's) and the
 * peer's TCP connection both ways until both directions end, without waking the interpreter.
 * The peer's side carries sealed records (sealed_records.h, compiled together with this
 * file); an end record is TCP half-close on the local side.
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

#include "sealed_records.h"

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

static const struct sealed_crypto crypto = {
    EVP_CIPHER_CTX_new, EVP_CIPHER_CTX_free, EVP_aes_256_gcm,    EVP_CIPHER_CTX_ctrl,
    EVP_EncryptInit_ex, EVP_EncryptUpdate,   EVP_EncryptFinal_ex, EVP_DecryptInit_ex,
    EVP_DecryptUpdate,  EVP_DecryptFinal_ex,
};

struct direction {
    struct sealed_cipher cipher;
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
    struct sealed_counters *counters;
    struct sealed_rpc_watch *watch;
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

/* Seals `len` plaintext bytes (0: the end record) into out.buffer. */
static int seal(struct relay *r, const unsigned char *plain, int len) {
    struct direction *d = &r->out;
    long size = sealed_seal(&crypto, &d->cipher, plain, len, d->buffer);
    if (size < 0) return fail(r, "sealing a record failed");
    d->filled = (size_t)size, d->sent = 0;
    r->counters->wire_out += d->filled;
    return 0;
}

/* Opens the complete record in in.buffer into in.plain. */
static int open_record(struct relay *r, size_t size) {
    struct direction *d = &r->in;
    long len = sealed_open(&crypto, &d->cipher, d->buffer, size, d->plain);
    if (len < 0) {
        errno = 0;
        return fail(r, "a record from the peer failed authentication");
    }
    d->plain_len = (size_t)len, d->plain_sent = 0;
    return 0;
}

static int write_remote(struct relay *r);

/* Reads what the local side has, seals it and sends as much as the peer's socket takes now. */
static int read_local(struct relay *r) {
    ssize_t got = recv(r->local, r->chunk, SEALED_MAX_PLAIN, 0);
    if (got < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : fail(r, "local read");
    if (got > 0) {
        sealed_watch_rpc(r->watch, r->counters, r->chunk, (size_t)got);
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
        if (d->filled == SEALED_HEAD + SEALED_TAG) d->ended = 1; /* the end record is out */
        d->filled = d->sent = 0;
    }
    return 0;
}

static int write_local(struct relay *r);

/* Reads the peer's next record as far as it has arrived; once whole, opens it and writes it
 * to the local side as far as that takes it now. Reads never go past the record. */
static int read_remote(struct relay *r) {
    struct direction *d = &r->in;
    size_t size = 0;
    for (;;) {
        if (d->filled >= SEALED_HEAD) size = sealed_record_size(d->buffer); /* checked when its head came */
        size_t want = d->filled < SEALED_HEAD ? SEALED_HEAD - d->filled : SEALED_HEAD + size - d->filled;
        ssize_t got = recv(r->remote, d->buffer + d->filled, want, 0);
        if (got < 0) return (errno == EAGAIN || errno == EINTR) ? 0 : fail(r, "read from the peer");
        if (got == 0) {
            errno = 0;
            return fail(r, "the peer's stream ended without an end record");
        }
        d->filled += (size_t)got;
        if (d->filled < SEALED_HEAD) continue;
        size = sealed_record_size(d->buffer);
        if (size < SEALED_TAG || size > SEALED_MAX_PLAIN + SEALED_TAG) {
            errno = 0;
            return fail(r, "a record from the peer has an impossible length");
        }
        if (d->filled == SEALED_HEAD + size) break;
    }
    d->filled = 0;
    if (open_record(r, size) < 0) return -1;
    r->counters->wire_back += SEALED_HEAD + size;
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
    d->buffer = malloc(SEALED_MAX_RECORD);
    d->plain = plain ? malloc(plain) : NULL;
    if (!d->buffer || (plain && !d->plain)) return -1;
    return sealed_cipher_init(&crypto, &d->cipher, key, sending);
}

static void teardown(struct direction *d) {
    sealed_cipher_free(&crypto, &d->cipher);
    free(d->buffer);
    free(d->plain);
}

/* Relays until both directions have ended (0), or something failed or `stop` became
 * readable (-1, with the reason in `error`). Both sockets must be non-blocking. `rpc_commands`
 * > 0 counts the local side's llama.cpp RPC requests into `counters`; `spin_us` > 0 polls
 * that long after activity before sleeping. */
int sharedllm_relay(int local, int remote, int stop, const unsigned char *send_key,
                    const unsigned char *receive_key, int rpc_commands, int spin_us,
                    struct sealed_counters *counters, char *error, size_t error_len) {
    int watched = rpc_commands > SEALED_RPC_COMMANDS ? SEALED_RPC_COMMANDS : rpc_commands;
    struct sealed_rpc_watch watch = {{0}, 0, 0, watched > 0 ? watched : 0};
    struct relay r = {local, remote, stop, {0}, {0}, NULL, counters, &watch,
                      0,     spin_us > 0 ? (uint64_t)spin_us : 0, 0, error, error_len};
    int result = -1;
    errno = 0;
    r.chunk = malloc(SEALED_MAX_PLAIN);
    if (!r.chunk || setup(&r.out, send_key, 1, 0) < 0 || setup(&r.in, receive_key, 0, SEALED_MAX_PLAIN)) {
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
