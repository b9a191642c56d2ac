#include "CTLS.h"

#include <arpa/inet.h>
#include <errno.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

// What went wrong, from OpenSSL's error queue (which is then emptied): a failed certificate check
// says which check failed; anything else gives OpenSSL's reason text, of the first error queued
// (the cause: "no start line" rather than the "PEM lib" reported on top of it).
static void describe(SSL *session, char *error, size_t size, const char *fallback) {
    unsigned long code = session ? ERR_peek_last_error() : ERR_peek_error();
    long verify = session ? SSL_get_verify_result(session) : X509_V_OK;
    if (session && verify != X509_V_OK && ERR_GET_REASON(code) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
        snprintf(error, size, "certificate verify failed: %s", X509_verify_cert_error_string(verify));
    } else if (code != 0) {
        const char *reason = ERR_reason_error_string(code);
        if (reason) {
            snprintf(error, size, "%s", reason);
        } else {
            ERR_error_string_n(code, error, size);
        }
    } else {
        snprintf(error, size, "%s", fallback);
    }
    ERR_clear_error();
}

// OpenSSL writes to the socket with write(2), which raises SIGPIPE once the peer has gone. The
// signal is blocked on this thread for the call, and one it raised is taken before unblocking, so
// the call fails with EPIPE instead and the process's handling of SIGPIPE stays as it was.
typedef struct {
    sigset_t previous;
    int was_pending;
} pipe_guard;

static void guard_begin(pipe_guard *guard) {
    sigset_t pipe, pending;
    sigemptyset(&pipe);
    sigaddset(&pipe, SIGPIPE);
    sigpending(&pending);
    guard->was_pending = sigismember(&pending, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe, &guard->previous);
}

static void guard_end(pipe_guard *guard) {
    int saved = errno;
    if (!guard->was_pending) {
        sigset_t pipe, pending;
        sigemptyset(&pipe);
        sigaddset(&pipe, SIGPIPE);
        sigpending(&pending);
        if (sigismember(&pending, SIGPIPE)) {
            struct timespec zero = {0, 0};
            sigtimedwait(&pipe, NULL, &zero);
        }
    }
    pthread_sigmask(SIG_SETMASK, &guard->previous, NULL);
    errno = saved;
}

// Turns an OpenSSL result into one of FERRY_TLS_*.
static int outcome(SSL *session, int result, char *error, size_t size) {
    int saved = errno;
    switch (SSL_get_error(session, result)) {
    case SSL_ERROR_WANT_READ:
        return FERRY_TLS_WANT_READ;
    case SSL_ERROR_WANT_WRITE:
        return FERRY_TLS_WANT_WRITE;
    case SSL_ERROR_ZERO_RETURN:
        return FERRY_TLS_CLOSED;
    case SSL_ERROR_SYSCALL:
        // OpenSSL 3.2 and later queue a failed system call as an error of the system library,
        // its reason the errno.
        if (ERR_GET_LIB(ERR_peek_error()) == ERR_LIB_SYS) {
            errno = ERR_GET_REASON(ERR_peek_error());
            ERR_clear_error();
            return FERRY_TLS_SYSCALL;
        }
        if (ERR_peek_error() == 0) {
            ERR_clear_error();
            if (saved == 0) return FERRY_TLS_CLOSED;
            errno = saved;
            return FERRY_TLS_SYSCALL;
        }
        describe(session, error, size, "TLS failed");
        return FERRY_TLS_FAILED;
    case SSL_ERROR_SSL:
        if (ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            ERR_clear_error();
            return FERRY_TLS_CLOSED;
        }
        describe(session, error, size, "TLS failed");
        return FERRY_TLS_FAILED;
    default:
        describe(session, error, size, "TLS failed");
        return FERRY_TLS_FAILED;
    }
}

// A client learns that the server accepted its certificate from the session ticket the server
// sends once it has checked it (TLS 1.3 lets a client finish its handshake before that): the
// ticket is only marked, never kept, and no session is ever resumed.
static char confirmed;

static int on_session_ticket(SSL *session, SSL_SESSION *ticket) {
    (void)ticket;
    SSL_set_app_data(session, &confirmed);
    return 0;
}

SSL_CTX *ferry_tls_context_new(int server, const char *ca_path, const char *certificate_path, const char *key_path,
                               char *error, size_t error_size) {
    ERR_clear_error();
    SSL_CTX *context = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
    if (!context) {
        describe(NULL, error, error_size, "cannot create a TLS context");
        return NULL;
    }
    const char *failed = NULL;
    if (!SSL_CTX_set_min_proto_version(context, TLS1_3_VERSION) || !SSL_CTX_set_max_proto_version(context, TLS1_3_VERSION)) {
        failed = "cannot limit TLS to version 1.3";
    } else if (SSL_CTX_load_verify_locations(context, ca_path, NULL) != 1) {
        failed = "ca-cert.pem";
    } else if (SSL_CTX_use_certificate_chain_file(context, certificate_path) != 1) {
        failed = server ? "server-cert.pem" : "client-cert.pem";
    } else if (SSL_CTX_use_PrivateKey_file(context, key_path, SSL_FILETYPE_PEM) != 1) {
        int mismatch = ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH;
        failed = server ? (mismatch ? "server-key.pem does not match server-cert.pem" : "server-key.pem")
                        : (mismatch ? "client-key.pem does not match client-cert.pem" : "client-key.pem");
    } else if (SSL_CTX_check_private_key(context) != 1) {
        failed = server ? "server-key.pem does not match server-cert.pem" : "client-key.pem does not match client-cert.pem";
    }
    if (failed) {
        char reason[256];
        describe(NULL, reason, sizeof reason, "unknown error");
        snprintf(error, error_size, "%s: %s", failed, reason);
        SSL_CTX_free(context);
        return NULL;
    }
    SSL_CTX_set_verify(context, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    // AES-128-GCM first: with AES-NI the fastest of TLS 1.3's suites, and as strong as needed.
    SSL_CTX_set_ciphersuites(context, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256");
    // Writes may end after some records; the buffer may move between retries of one write.
    SSL_CTX_set_mode(context, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (server) {
        // One ticket, sent after the client's certificate passed: the client's confirmation.
        SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF);
        SSL_CTX_set_num_tickets(context, 1);
    } else {
        SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(context, on_session_ticket);
    }
    return context;
}

void ferry_tls_context_free(SSL_CTX *context) {
    SSL_CTX_free(context);
}

SSL *ferry_tls_session_new(SSL_CTX *context, int fd, const char *peer_host, char *error, size_t error_size) {
    ERR_clear_error();
    SSL *session = SSL_new(context);
    if (!session) {
        describe(NULL, error, error_size, "cannot create a TLS session");
        return NULL;
    }
    if (SSL_set_fd(session, fd) != 1) {
        describe(NULL, error, error_size, "cannot attach the TLS session to the socket");
        SSL_free(session);
        return NULL;
    }
    if (peer_host) {
        unsigned char address[16];
        int is_address = inet_pton(AF_INET, peer_host, address) == 1 || inet_pton(AF_INET6, peer_host, address) == 1;
        int named = is_address ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(session), peer_host)
                               : SSL_set1_host(session, peer_host) && SSL_set_tlsext_host_name(session, peer_host);
        if (!named) {
            describe(NULL, error, error_size, "cannot set the name to verify");
            SSL_free(session);
            return NULL;
        }
        SSL_set_connect_state(session);
    } else {
        SSL_set_accept_state(session);
    }
    return session;
}

void ferry_tls_session_free(SSL *session) {
    SSL_free(session);
}

int ferry_tls_handshake(SSL *session, char *error, size_t error_size) {
    pipe_guard guard;
    guard_begin(&guard);
    ERR_clear_error();
    errno = 0;
    int result = SSL_do_handshake(session);
    int code = result == 1 ? 0 : outcome(session, result, error, error_size);
    if (code == 0 && !SSL_is_server(session) && SSL_get_app_data(session) != &confirmed) {
        // Wait for the server's verdict on this side's certificate: its ticket, or an alert.
        char byte;
        size_t peeked = 0;
        ERR_clear_error();
        errno = 0;
        result = SSL_peek_ex(session, &byte, 1, &peeked);
        if (result != 1) {
            code = outcome(session, result, error, error_size);
            if (code == FERRY_TLS_WANT_READ && SSL_get_app_data(session) == &confirmed) code = 0;
        }
    }
    guard_end(&guard);
    return code;
}

long ferry_tls_read(SSL *session, void *buffer, size_t count, char *error, size_t error_size) {
    pipe_guard guard;
    guard_begin(&guard);
    ERR_clear_error();
    errno = 0;
    size_t moved = 0;
    int result = SSL_read_ex(session, buffer, count, &moved);
    long code = result == 1 ? (long)moved : outcome(session, result, error, error_size);
    guard_end(&guard);
    return code;
}

long ferry_tls_write(SSL *session, const void *buffer, size_t count, char *error, size_t error_size) {
    pipe_guard guard;
    guard_begin(&guard);
    ERR_clear_error();
    errno = 0;
    size_t moved = 0;
    int result = SSL_write_ex(session, buffer, count, &moved);
    long code = result == 1 ? (long)moved : outcome(session, result, error, error_size);
    guard_end(&guard);
    return code;
}

void ferry_tls_close_notify(SSL *session) {
    pipe_guard guard;
    guard_begin(&guard);
    SSL_shutdown(session);
    ERR_clear_error();
    guard_end(&guard);
}

const char *ferry_tls_version(SSL *session) {
    return SSL_get_version(session);
}

const char *ferry_tls_cipher(SSL *session) {
    return SSL_get_cipher_name(session);
}
