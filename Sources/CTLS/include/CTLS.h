// C shim over the system's OpenSSL for the migration channel's mutual TLS (docs/security.md).
//
// Swift sees only these functions and two opaque types; OpenSSL's macros (SNI, protocol bounds)
// and its error queue stay on this side. Every function is for one thread at a time per session,
// on a non-blocking socket: a call that needs the socket ready returns FERRY_TLS_WANT_READ or
// FERRY_TLS_WANT_WRITE, and the caller polls and calls again.
#ifndef FERRY_CTLS_H
#define FERRY_CTLS_H

#include <stddef.h>

struct ssl_ctx_st;
struct ssl_st;

enum {
    FERRY_TLS_WANT_READ = -1,
    FERRY_TLS_WANT_WRITE = -2,
    /// The peer closed the connection (a TLS close_notify, or the end of the stream).
    FERRY_TLS_CLOSED = -3,
    /// TLS failed; the error buffer says why.
    FERRY_TLS_FAILED = -4,
    /// A system call failed; errno says why.
    FERRY_TLS_SYSCALL = -5,
};

/// A TLS 1.3-only context that presents `certificate_path` (a PEM chain) with `key_path` and
/// demands a peer certificate signed by `ca_path`. `server` chooses the role. NULL on failure,
/// with the reason in `error`.
struct ssl_ctx_st *ferry_tls_context_new(int server, const char *ca_path, const char *certificate_path,
                                         const char *key_path, char *error, size_t error_size);
void ferry_tls_context_free(struct ssl_ctx_st *context);

/// A session on connected socket `fd`. A client verifies that the peer's certificate names
/// `peer_host` (an IP address or a DNS name) and sends it as SNI; a server passes NULL.
struct ssl_st *ferry_tls_session_new(struct ssl_ctx_st *context, int fd, const char *peer_host,
                                     char *error, size_t error_size);
void ferry_tls_session_free(struct ssl_st *session);

/// One step of the handshake: 0 once it is done, else one of the codes above. A client's handshake
/// is done only once the server has accepted its certificate.
int ferry_tls_handshake(struct ssl_st *session, char *error, size_t error_size);

/// Bytes moved (> 0), or one of the codes above.
long ferry_tls_read(struct ssl_st *session, void *buffer, size_t count, char *error, size_t error_size);
long ferry_tls_write(struct ssl_st *session, const void *buffer, size_t count, char *error, size_t error_size);

/// Sends close_notify, once, without waiting for the peer's.
void ferry_tls_close_notify(struct ssl_st *session);

/// The negotiated protocol version and cipher suite, e.g. "TLSv1.3" and "TLS_AES_128_GCM_SHA256".
const char *ferry_tls_version(struct ssl_st *session);
const char *ferry_tls_cipher(struct ssl_st *session);

#endif
