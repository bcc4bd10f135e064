/*
 * auth.c — the bearer token check a server makes before a call reaches Ruby.
 *
 * The server's acceptor answers a call without the right token itself (UNAUTHENTICATED),
 * so a peer without the token never occupies a worker. RFC 6750 2.1: the credentials are
 * `Bearer` (any case, RFC 7235 2.1) then one or more spaces, then the token. The token is
 * compared in constant time over the whole expected value: how long the check takes
 * depends on the configured token's length only, never on what the peer sent.
 *
 * A leaf: no Ruby, no lock; the acceptor thread.
 */
#include "flowctl.h"
#include <strings.h>

/* The first "authorization" value, or NULL. */
static const grpc_slice *
authorization(const grpc_metadata_array *md)
{
    static const char key[] = "authorization";
    for (size_t i = 0; i < md->count; i++) {
        const grpc_slice *k = &md->metadata[i].key;
        if (GRPC_SLICE_LENGTH(*k) == sizeof(key) - 1 && memcmp(GRPC_SLICE_START_PTR(*k), key, sizeof(key) - 1) == 0)
            return &md->metadata[i].value;
    }
    return NULL;
}

/* Every byte of expected is looked at, whatever the peer sent. */
static bool
same_secret(const uint8_t *given, size_t given_len, const char *expected, size_t len)
{
    unsigned diff = given_len != len;
    for (size_t i = 0; i < len; i++) diff |= (uint8_t)expected[i] ^ (i < given_len ? given[i] : 0u);
    return diff == 0;
}

bool
flowctl_bearer_ok(const char *token, size_t len, const grpc_metadata_array *md)
{
    const grpc_slice *v = authorization(md);
    if (!v) return false;
    const uint8_t *p = GRPC_SLICE_START_PTR(*v);
    size_t n = GRPC_SLICE_LENGTH(*v);
    if (n < 7 || strncasecmp((const char *)p, "bearer ", 7) != 0) return false;
    size_t skip = 7;
    while (skip < n && p[skip] == ' ') skip++;
    return same_secret(p + skip, n - skip, token, len);
}
