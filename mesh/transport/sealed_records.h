/* A tunnel's sealed records and what is counted of them, shared by the node's native relay
 * (native_relay.c) and by our change to llama.cpp's RPC transport (node/engine/patch.py), so
 * that either end of a tunnel may be a relay or the engine itself: the wire is the same.
 *
 * On the peer's side each direction is a sequence of records sealed with AES-256-GCM:
 *   | length (4 bytes, big-endian) | ciphertext | tag (16) |
 * The length covers ciphertext and tag and is the record's associated data; the nonce is the
 * direction's record counter, so a record cut, reordered, replayed or forged fails to open.
 * A record with no plaintext ends its direction. The keys are fresh for each tunnel.
 *
 * libcrypto's EVP interface is declared here, not included, and reached through a table of
 * functions: the relay links libcrypto, the engine opens it at run time (it is built without).
 * Valid C and C++.
 */
#ifndef SHAREDLLM_SEALED_RECORDS_H
#define SHAREDLLM_SEALED_RECORDS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;

struct sealed_crypto {
    EVP_CIPHER_CTX *(*ctx_new)(void);
    void (*ctx_free)(EVP_CIPHER_CTX *);
    const EVP_CIPHER *(*aes_256_gcm)(void);
    int (*ctrl)(EVP_CIPHER_CTX *, int, int, void *);
    int (*encrypt_init)(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                        const unsigned char *);
    int (*encrypt_update)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
    int (*encrypt_final)(EVP_CIPHER_CTX *, unsigned char *, int *);
    int (*decrypt_init)(EVP_CIPHER_CTX *, const EVP_CIPHER *, void *, const unsigned char *,
                        const unsigned char *);
    int (*decrypt_update)(EVP_CIPHER_CTX *, unsigned char *, int *, const unsigned char *, int);
    int (*decrypt_final)(EVP_CIPHER_CTX *, unsigned char *, int *);
};

#define SEALED_GCM_SET_TAG 0x11
#define SEALED_GCM_GET_TAG 0x10
#define SEALED_TAG 16
#define SEALED_HEAD 4
#define SEALED_KEY 32
#define SEALED_MAX_PLAIN (256 * 1024)
#define SEALED_MAX_RECORD (SEALED_HEAD + SEALED_MAX_PLAIN + SEALED_TAG)
#define SEALED_RPC_COMMANDS 32
#define SEALED_RPC_HEADER 9
#define SEALED_RPC_SANE_SIZE (1ULL << 40)

/* Read by the node while a tunnel runs (sampled; each field is one aligned word). Its layout
 * is RelayCounters' in native_relay.py. "out" is what the local side (an engine) sent. */
struct sealed_counters {
    uint64_t bytes_out, bytes_back, wire_out, wire_back, round_trips;
    uint64_t rpc_lost;
    uint64_t rpc_requests[SEALED_RPC_COMMANDS];
    uint64_t rpc_bytes[SEALED_RPC_COMMANDS];
};

/* Follows llama.cpp RPC requests: | command (1) | size (8, little-endian) | payload | */
struct sealed_rpc_watch {
    unsigned char header[SEALED_RPC_HEADER];
    int have;
    uint64_t skip;
    int commands; /* command numbers counted; 0: not watching */
};

/* One direction's cipher: a record's nonce is its number in the direction. */
struct sealed_cipher {
    EVP_CIPHER_CTX *ctx;
    uint64_t counter;
};

static void sealed_watch_rpc(struct sealed_rpc_watch *w, struct sealed_counters *c,
                             const unsigned char *p, size_t n) {
    while (w->commands > 0 && n > 0 && !c->rpc_lost) {
        if (w->skip) {
            size_t step = w->skip < n ? (size_t)w->skip : n;
            w->skip -= step, p += step, n -= step;
            continue;
        }
        size_t need = SEALED_RPC_HEADER - (size_t)w->have, step = need < n ? need : n;
        memcpy(w->header + w->have, p, step);
        w->have += (int)step, p += step, n -= step;
        if (w->have < SEALED_RPC_HEADER) break;
        w->have = 0;
        uint64_t size = 0;
        for (int i = 8; i >= 1; i--) size = (size << 8) | w->header[i];
        if (w->header[0] >= w->commands || size > SEALED_RPC_SANE_SIZE) {
            c->rpc_lost = 1;
            break;
        }
        c->rpc_requests[w->header[0]] += 1;
        c->rpc_bytes[w->header[0]] += size;
        w->skip = size;
    }
}

static void sealed_nonce(uint64_t counter, unsigned char nonce[12]) {
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++) nonce[4 + i] = (unsigned char)(counter >> (56 - 8 * i));
}

/* 0, or -1 where the cipher cannot be made. */
static int sealed_cipher_init(const struct sealed_crypto *api, struct sealed_cipher *cipher,
                              const unsigned char key[SEALED_KEY], int sending) {
    cipher->counter = 0;
    cipher->ctx = api->ctx_new();
    if (!cipher->ctx) return -1;
    if (sending) return api->encrypt_init(cipher->ctx, api->aes_256_gcm(), NULL, key, NULL) ? 0 : -1;
    return api->decrypt_init(cipher->ctx, api->aes_256_gcm(), NULL, key, NULL) ? 0 : -1;
}

static void sealed_cipher_free(const struct sealed_crypto *api, struct sealed_cipher *cipher) {
    if (cipher->ctx) api->ctx_free(cipher->ctx);
    cipher->ctx = NULL;
}

static size_t sealed_record_size(const unsigned char *head) {
    return ((size_t)head[0] << 24) | ((size_t)head[1] << 16) | ((size_t)head[2] << 8) | head[3];
}

/* Seals `len` (<= SEALED_MAX_PLAIN; 0: the end record) plaintext bytes into `record`, which
 * has room for SEALED_MAX_RECORD; returns the record's whole size, or -1. */
static long sealed_seal(const struct sealed_crypto *api, struct sealed_cipher *cipher,
                        const unsigned char *plain, int len, unsigned char *record) {
    unsigned char nonce[12];
    int size = len + SEALED_TAG, got = 0, tail = 0;
    record[0] = (unsigned char)(size >> 24), record[1] = (unsigned char)(size >> 16);
    record[2] = (unsigned char)(size >> 8), record[3] = (unsigned char)size;
    sealed_nonce(cipher->counter++, nonce);
    unsigned char *body = record + SEALED_HEAD;
    if (!api->encrypt_init(cipher->ctx, NULL, NULL, NULL, nonce) ||
        !api->encrypt_update(cipher->ctx, NULL, &got, record, SEALED_HEAD) ||
        (len > 0 && !api->encrypt_update(cipher->ctx, body, &got, plain, len)) ||
        !api->encrypt_final(cipher->ctx, body + len, &tail) ||
        !api->ctrl(cipher->ctx, SEALED_GCM_GET_TAG, SEALED_TAG, body + len))
        return -1;
    return (long)(SEALED_HEAD + size);
}

/* Opens a whole record (`record` holds its head and `size` bytes after it, as its head says,
 * already checked to lie in SEALED_TAG..SEALED_MAX_PLAIN + SEALED_TAG) into `plain`; returns
 * the plaintext's length (0: the direction's end), or -1 where it fails authentication. */
static long sealed_open(const struct sealed_crypto *api, struct sealed_cipher *cipher,
                        unsigned char *record, size_t size, unsigned char *plain) {
    unsigned char nonce[12];
    int len = (int)size - SEALED_TAG, got = 0, tail = 0;
    unsigned char *body = record + SEALED_HEAD;
    sealed_nonce(cipher->counter++, nonce);
    if (!api->decrypt_init(cipher->ctx, NULL, NULL, NULL, nonce) ||
        !api->decrypt_update(cipher->ctx, NULL, &got, record, SEALED_HEAD) ||
        (len > 0 && !api->decrypt_update(cipher->ctx, plain, &got, body, len)) ||
        !api->ctrl(cipher->ctx, SEALED_GCM_SET_TAG, SEALED_TAG, body + len) ||
        api->decrypt_final(cipher->ctx, plain + len, &tail) <= 0)
        return -1;
    return (long)len;
}

#endif
