/*
 * kscinc_native: a tiny N-API addon exposing the few file-system syscalls that
 * Node's fs module does not offer:
 *
 *   punchHole(fd, offset, length)   fallocate(PUNCH_HOLE | KEEP_SIZE)
 *   zeroRange(fd, offset, length)   fallocate(ZERO_RANGE)
 *   seekData(fd, offset)            lseek(SEEK_DATA)
 *   seekHole(fd, offset)            lseek(SEEK_HOLE)
 *   flock(fd, exclusive, nonblock)  flock(LOCK_EX|LOCK_SH [|LOCK_NB])
 *   funlock(fd)                     flock(LOCK_UN)
 *   readCached(fd, buf, position)   preadv2(RWF_NOWAIT): only what the page cache holds
 *   readCachedAt(fd, buf, at, length, position)   the same into buf[at, at+length)
 *   setSendBuffer(fd, bytes)        setsockopt(SO_SNDBUF), returns the size granted
 *   peerCred(fd)                    getsockopt(SO_PEERCRED): {pid, uid, gid} of a unix socket's peer
 *   aesGcmOpen, aesGcmSeal, gmacId  AES-256-GCM in place through Node's OpenSSL (kscinc_aead.c)
 *
 * Conventions:
 *   - Wrong argument types throw a TypeError (code ERR_INVALID_ARG_TYPE);
 *     numbers that are not safe integers throw a RangeError
 *     (code ERR_OUT_OF_RANGE).
 *   - Negative offsets / lengths throw an Error with code 'EINVAL' before any
 *     syscall is made; a file descriptor outside 0..INT_MAX throws 'EBADF'.
 *   - Other syscall failures throw an Error shaped like Node's fs errors:
 *     message "CODE: description, syscall", properties code, errno
 *     (negative, as in Node) and syscall.
 *   - "Not supported by this file system / kernel" is not an error: the
 *     fallocate wrappers return false, the seek wrappers return -2.
 *
 * Every call is synchronous and runs on the calling JS thread.  A blocking
 * flock() (nonblocking = false) therefore blocks that thread until the lock
 * is granted.  seekData/seekHole move the descriptor's file position, which is
 * harmless for callers that use positional reads and writes.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/types.h>
#include <unistd.h>

#include <node_api.h>

#include "kscinc_aead.h"
#include "kscinc_send.h"
#include "kscinc_exit.h"
#include "kscinc_sync.h"
#include "kscinc_ident.h"
#include "kscinc_xxh64.h"
#include "kscinc_idtable.h"
#include "kscinc_pages.h"

/* Largest integer a JS number holds exactly (Number.MAX_SAFE_INTEGER). */
#define MAX_SAFE_INT 9007199254740991.0

/* ------------------------------------------------------------------------ */
/* errno -> name                                                            */

typedef struct {
  int num;
  const char* name;
} errno_name_t;

static const errno_name_t errno_names[] = {
  {EPERM, "EPERM"},         {ENOENT, "ENOENT"},     {ESRCH, "ESRCH"},
  {EINTR, "EINTR"},         {EIO, "EIO"},           {ENXIO, "ENXIO"},
  {E2BIG, "E2BIG"},         {EBADF, "EBADF"},       {EAGAIN, "EAGAIN"},
  {ENOMEM, "ENOMEM"},       {EACCES, "EACCES"},     {EFAULT, "EFAULT"},
  {EBUSY, "EBUSY"},         {EEXIST, "EEXIST"},     {EXDEV, "EXDEV"},
  {ENODEV, "ENODEV"},       {ENOTDIR, "ENOTDIR"},   {EISDIR, "EISDIR"},
  {EINVAL, "EINVAL"},       {ENFILE, "ENFILE"},     {EMFILE, "EMFILE"},
  {ENOTTY, "ENOTTY"},       {ETXTBSY, "ETXTBSY"},   {EFBIG, "EFBIG"},
  {ENOSPC, "ENOSPC"},       {ESPIPE, "ESPIPE"},     {EROFS, "EROFS"},
  {EMLINK, "EMLINK"},       {EPIPE, "EPIPE"},       {ERANGE, "ERANGE"},
  {EDEADLK, "EDEADLK"},     {ENOLCK, "ENOLCK"},     {ENOSYS, "ENOSYS"},
  {EOPNOTSUPP, "EOPNOTSUPP"},
#if defined(ENOTSUP)
  {ENOTSUP, "ENOTSUP"},
#endif
#if defined(EWOULDBLOCK)
  {EWOULDBLOCK, "EWOULDBLOCK"},
#endif
#if defined(EOVERFLOW)
  {EOVERFLOW, "EOVERFLOW"},
#endif
#if defined(EDQUOT)
  {EDQUOT, "EDQUOT"},
#endif
#if defined(ESTALE)
  {ESTALE, "ESTALE"},
#endif
#if defined(ENOTSOCK)
  {ENOTSOCK, "ENOTSOCK"},
#endif
};

static const char* errno_name(int err) {
  size_t i;
  for (i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++) {
    if (errno_names[i].num == err) return errno_names[i].name;
  }
  return "UNKNOWN";
}

/* ------------------------------------------------------------------------ */
/* Throwing helpers. Each returns NULL so callers can `return throw_...`.    */

/* If a N-API call fails without leaving an exception pending, throw a
 * generic one so JS never sees a silent undefined. */
static napi_value throw_napi_failure(napi_env env, const char* what) {
  bool pending = false;
  if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
    return NULL;
  }
  const napi_extended_error_info* info = NULL;
  char msg[256];
  if (napi_get_last_error_info(env, &info) == napi_ok && info != NULL &&
      info->error_message != NULL) {
    snprintf(msg, sizeof(msg), "kscinc_native: %s failed: %s", what,
             info->error_message);
  } else {
    snprintf(msg, sizeof(msg), "kscinc_native: %s failed", what);
  }
  napi_throw_error(env, NULL, msg);
  return NULL;
}

#define NAPI_CALL(env, call)                          \
  do {                                                \
    if ((call) != napi_ok) {                          \
      return throw_napi_failure((env), #call);        \
    }                                                 \
  } while (0)

/* Throw an Error like Node's fs errors: "EBADF: Bad file descriptor, fallocate"
 * with .code, .errno (negative) and .syscall. */
napi_value throw_errno(napi_env env, int err, const char* syscall) {
  const char* code = errno_name(err);
  char msg[256];
  napi_value code_v, msg_v, error_v, errno_v, syscall_v;

  snprintf(msg, sizeof(msg), "%s: %s, %s", code, strerror(err), syscall);
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok ||
      napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &msg_v) != napi_ok ||
      napi_create_error(env, code_v, msg_v, &error_v) != napi_ok) {
    return throw_napi_failure(env, "creating an Error");
  }
  /* Best effort: the error is still meaningful without these extras. */
  if (napi_create_int32(env, -err, &errno_v) == napi_ok) {
    napi_set_named_property(env, error_v, "errno", errno_v);
  }
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_v) ==
      napi_ok) {
    napi_set_named_property(env, error_v, "syscall", syscall_v);
  }
  napi_throw(env, error_v);
  return NULL;
}

static napi_value throw_type(napi_env env, const char* fn, const char* arg,
                             const char* expected) {
  char msg[192];
  snprintf(msg, sizeof(msg), "%s(): the \"%s\" argument must be of type %s",
           fn, arg, expected);
  napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
  return NULL;
}

/* ------------------------------------------------------------------------ */
/* Argument parsing. Each returns false with a JS exception pending.        */

bool get_args(napi_env env, napi_callback_info info, size_t want,
                     napi_value* argv) {
  size_t argc = want;
  /* Missing arguments are filled in with `undefined` by N-API, so the type
   * checks below reject them. */
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_napi_failure(env, "napi_get_cb_info");
    return false;
  }
  return true;
}

/* A JS number that is a safe integer. One napi call: napi_get_value_double
 * itself reports a value that is not a number, and a safe integer's double
 * converts to int64 exactly (this runs several times per NBD request). */
static bool get_integer(napi_env env, napi_value v, const char* fn,
                        const char* arg, int64_t* out) {
  double d;
  napi_status st = napi_get_value_double(env, v, &d);
  if (st == napi_number_expected) {
    throw_type(env, fn, arg, "number");
    return false;
  }
  if (st != napi_ok) {
    throw_napi_failure(env, "napi_get_value_double");
    return false;
  }
  /* Written so that NaN fails too. */
  if (!(d >= -MAX_SAFE_INT && d <= MAX_SAFE_INT) || (double)(int64_t)d != d) {
    char msg[192];
    snprintf(msg, sizeof(msg),
             "%s(): the \"%s\" argument must be a safe integer", fn, arg);
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", msg);
    return false;
  }
  *out = (int64_t)d;
  return true;
}

bool get_fd(napi_env env, napi_value v, const char* fn,
                   const char* syscall, int* out) {
  int64_t fd;
  if (!get_integer(env, v, fn, "fd", &fd)) return false;
  if (fd < 0 || fd > INT_MAX) {
    throw_errno(env, EBADF, syscall);
    return false;
  }
  *out = (int)fd;
  return true;
}

/* A non-negative safe integer; negative values throw EINVAL. */
bool get_offset(napi_env env, napi_value v, const char* fn,
                       const char* arg, const char* syscall, off_t* out) {
  int64_t n;
  if (!get_integer(env, v, fn, arg, &n)) return false;
  if (n < 0) {
    throw_errno(env, EINVAL, syscall);
    return false;
  }
  *out = (off_t)n;
  return true;
}

bool get_bool(napi_env env, napi_value v, const char* fn,
                     const char* arg, bool* out) {
  napi_valuetype type;
  if (napi_typeof(env, v, &type) != napi_ok) {
    throw_napi_failure(env, "napi_typeof");
    return false;
  }
  if (type != napi_boolean) {
    throw_type(env, fn, arg, "boolean");
    return false;
  }
  if (napi_get_value_bool(env, v, out) != napi_ok) {
    throw_napi_failure(env, "napi_get_value_bool");
    return false;
  }
  return true;
}

static napi_value make_bool(napi_env env, bool b) {
  napi_value result;
  NAPI_CALL(env, napi_get_boolean(env, b, &result));
  return result;
}

napi_value make_int64(napi_env env, int64_t n) {
  napi_value result;
  NAPI_CALL(env, napi_create_int64(env, n, &result));
  return result;
}

static bool is_unsupported(int err) {
  if (err == EOPNOTSUPP || err == ENOSYS) return true;
#if defined(ENOTSUP)
  if (err == ENOTSUP) return true;
#endif
  return false;
}

/* ------------------------------------------------------------------------ */
/* fallocate wrappers                                                       */

/* Shared body of punchHole / zeroRange. mode < 0 means "not available on
 * this platform". */
static napi_value do_fallocate(napi_env env, napi_callback_info info,
                               const char* fn, int mode) {
  napi_value argv[3];
  int fd;
  off_t offset, length;

  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_fd(env, argv[0], fn, "fallocate", &fd)) return NULL;
  if (!get_offset(env, argv[1], fn, "offset", "fallocate", &offset)) return NULL;
  if (!get_offset(env, argv[2], fn, "length", "fallocate", &length)) return NULL;

  if (length == 0) {
    /* fallocate() rejects len == 0 with EINVAL; an empty range is trivially
     * done. Still report a bad descriptor. */
    if (fcntl(fd, F_GETFD) == -1) return throw_errno(env, errno, "fallocate");
    return make_bool(env, true);
  }

#if defined(__linux__)
  if (mode >= 0) {
    int rc;
    do {
      rc = fallocate(fd, mode, offset, length);
    } while (rc == -1 && errno == EINTR);
    if (rc == 0) return make_bool(env, true);
    if (is_unsupported(errno)) return make_bool(env, false);
    return throw_errno(env, errno, "fallocate");
  }
#endif
  (void)offset;
  (void)mode;
  /* No fallocate on this platform: unsupported, but keep EBADF honest. */
  if (fcntl(fd, F_GETFD) == -1) return throw_errno(env, errno, "fallocate");
  return make_bool(env, false);
}

static napi_value PunchHole(napi_env env, napi_callback_info info) {
#if defined(__linux__) && defined(FALLOC_FL_PUNCH_HOLE) && \
    defined(FALLOC_FL_KEEP_SIZE)
  return do_fallocate(env, info, "punchHole",
                      FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
#else
  return do_fallocate(env, info, "punchHole", -1);
#endif
}

static napi_value ZeroRange(napi_env env, napi_callback_info info) {
#if defined(__linux__) && defined(FALLOC_FL_ZERO_RANGE)
  return do_fallocate(env, info, "zeroRange", FALLOC_FL_ZERO_RANGE);
#else
  return do_fallocate(env, info, "zeroRange", -1);
#endif
}

/* ------------------------------------------------------------------------ */
/* lseek(SEEK_DATA / SEEK_HOLE)                                             */

/* whence < 0 means "not available on this platform". Returns the offset,
 * -1 on ENXIO (no data / hole at or after offset, i.e. offset >= EOF for
 * SEEK_HOLE), -2 when unsupported. */
static napi_value do_seek(napi_env env, napi_callback_info info,
                          const char* fn, int whence) {
  napi_value argv[2];
  int fd;
  off_t offset, result;

  if (!get_args(env, info, 2, argv)) return NULL;
  if (!get_fd(env, argv[0], fn, "lseek", &fd)) return NULL;
  if (!get_offset(env, argv[1], fn, "offset", "lseek", &offset)) return NULL;

  if (whence < 0) {
    if (fcntl(fd, F_GETFD) == -1) return throw_errno(env, errno, "lseek");
    return make_int64(env, -2);
  }
  result = lseek(fd, offset, whence);
  if (result >= 0) return make_int64(env, (int64_t)result);
  if (errno == ENXIO) return make_int64(env, -1);
  /* The offset was validated as non-negative, so EINVAL means the file
   * system does not understand this whence. */
  if (errno == EINVAL) return make_int64(env, -2);
  return throw_errno(env, errno, "lseek");
}

static napi_value SeekData(napi_env env, napi_callback_info info) {
#if defined(SEEK_DATA)
  return do_seek(env, info, "seekData", SEEK_DATA);
#else
  return do_seek(env, info, "seekData", -1);
#endif
}

static napi_value SeekHole(napi_env env, napi_callback_info info) {
#if defined(SEEK_HOLE)
  return do_seek(env, info, "seekHole", SEEK_HOLE);
#else
  return do_seek(env, info, "seekHole", -1);
#endif
}

/* ------------------------------------------------------------------------ */
/* flock                                                                    */

static napi_value Flock(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd, op, rc;
  bool exclusive, nonblocking;

  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_fd(env, argv[0], "flock", "flock", &fd)) return NULL;
  if (!get_bool(env, argv[1], "flock", "exclusive", &exclusive)) return NULL;
  if (!get_bool(env, argv[2], "flock", "nonblocking", &nonblocking)) return NULL;

  op = exclusive ? LOCK_EX : LOCK_SH;
  if (nonblocking) op |= LOCK_NB;
  do {
    rc = flock(fd, op);
  } while (rc == -1 && errno == EINTR);
  if (rc == 0) return make_bool(env, true);
  if (nonblocking && (errno == EWOULDBLOCK || errno == EAGAIN)) {
    return make_bool(env, false);
  }
  return throw_errno(env, errno, "flock");
}

static napi_value Funlock(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  napi_value undefined;
  int fd, rc;

  if (!get_args(env, info, 1, argv)) return NULL;
  if (!get_fd(env, argv[0], "funlock", "flock", &fd)) return NULL;
  do {
    rc = flock(fd, LOCK_UN);
  } while (rc == -1 && errno == EINTR);
  if (rc != 0) return throw_errno(env, errno, "flock");
  NAPI_CALL(env, napi_get_undefined(env, &undefined));
  return undefined;
}

bool get_bytes(napi_env env, napi_value v, const char* fn, const char* arg, uint8_t** data, size_t* len) {
  bool is_typed = false;
  if (napi_is_typedarray(env, v, &is_typed) != napi_ok || !is_typed) {
    throw_type(env, fn, arg, "Uint8Array");
    return false;
  }
  napi_typedarray_type type;
  size_t length;
  void* base;
  napi_value ab;
  size_t offset;
  if (napi_get_typedarray_info(env, v, &type, &length, &base, &ab, &offset) != napi_ok || type != napi_uint8_array) {
    throw_type(env, fn, arg, "Uint8Array");
    return false;
  }
  *data = (uint8_t*)base;
  *len = length;
  return true;
}

/* ------------------------------------------------------------------------ */
/* pwrite + per-block CRC-32 on the libuv pool                              */
/*                                                                          */
/* writeCrc(fd, buf, position, blockSize) -> Promise<number[]>: writes buf   */
/* at position (looping over short writes) and returns the CRC-32 of each    */
/* blockSize slice. Both run on a pool thread: for in-place overwrites the   */
/* main thread had been spending as long on the checksum as on everything    */
/* else. CRC-32 is libdeflate's when its headers were installed, else Node's */
/* own zlib (exported as Cr_z_crc32); without either, no writeCrc.           */

extern unsigned long Cr_z_crc32(unsigned long crc, const unsigned char* buf, unsigned int len) __attribute__((weak));

/* libdeflate's CRC-32 (the same function, with PCLMULQDQ folding: ~2.3x Node's zlib here) when its
 * headers were present at build time; else Node's zlib. */
#ifdef KSCINC_HAVE_LIBDEFLATE
#include <libdeflate.h>
static uint32_t block_crc32(const uint8_t* buf, size_t len) { return libdeflate_crc32(0, buf, len); }
#define HAVE_BLOCK_CRC32 1
#else
static uint32_t block_crc32(const uint8_t* buf, size_t len) { return (uint32_t)Cr_z_crc32(0, buf, (unsigned int)len); }
#define HAVE_BLOCK_CRC32 (Cr_z_crc32 != NULL)
#endif

/* Batching: a pool job per write cost the event loop more than the write (libuv's queue mutex and a   */
/* futex wake per submission: ~20 us each on a loaded machine, against ~3 us for a 4 KiB pwrite into   */
/* the page cache). So the writes asked for in one turn of the event loop go to the pool as one job:   */
/* writeCrc appends to the environment's pending list and starts an idle handle (which also keeps the  */
/* loop from blocking in poll); its callback, in the next idle phase, queues the list as one async     */
/* work. A list past BATCH_BYTES is queued at once (large writes keep several pool threads busy). The  */
/* writes of a job run in the order asked; each promise settles on its own (its own errno).            */

#include <uv.h>

#define BATCH_BYTES (1u << 20)

typedef struct wjob {
  struct wjob* next;
  napi_deferred deferred;
  napi_ref buf_ref;
  int fd;
  uint8_t* data;
  size_t len;
  int64_t pos;
  /* Only data[lo, hi) is written (at pos + lo); the CRCs are of all of data. */
  size_t lo;
  size_t hi;
  size_t block;
  size_t ncrc;
  int err;
  uint32_t crcs[]; /* ncrc of them: one allocation per job */
} wjob_t;

typedef struct {
  napi_async_work work;
  wjob_t* head;
} wbatch_t;

typedef struct {
  napi_env env;
  uv_idle_t idle;
  bool idle_on;
  wjob_t* head;
  wjob_t** tail;
  size_t bytes;
} wstate_t;

static void wjob_run(wjob_t* w) {
  size_t done = w->lo;
  while (done < w->hi) {
    ssize_t n = pwrite(w->fd, w->data + done, w->hi - done, (off_t)(w->pos + (int64_t)done));
    if (n < 0) {
      if (errno == EINTR) continue;
      w->err = errno;
      return;
    }
    if (n == 0) {
      w->err = EIO;
      return;
    }
    done += (size_t)n;
  }
  for (size_t i = 0; i < w->ncrc; i++) {
    size_t off = i * w->block;
    size_t l = w->len - off < w->block ? w->len - off : w->block;
    w->crcs[i] = block_crc32(w->data + off, l);
  }
}

static void WriteBatchExecute(napi_env env, void* arg) {
  (void)env;
  for (wjob_t* w = ((wbatch_t*)arg)->head; w; w = w->next) wjob_run(w);
}

/* Settles one job's promise (`status`: the async work's) and frees it. */
static void wjob_settle(napi_env env, napi_status status, wjob_t* w) {
  if (status != napi_ok || w->err != 0) {
    int e = w->err != 0 ? w->err : EIO;
    napi_value msg, code, err;
    char text[128];
    snprintf(text, sizeof(text), "%s: pwrite", strerror(e));
    napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &msg);
    napi_create_string_utf8(env, errno_name(e), NAPI_AUTO_LENGTH, &code);
    napi_create_error(env, code, msg, &err);
    napi_set_named_property(env, err, "code", code);
    napi_reject_deferred(env, w->deferred, err);
  } else {
    napi_value result;
    napi_create_array_with_length(env, w->ncrc, &result);
    for (size_t i = 0; i < w->ncrc; i++) {
      napi_value v;
      napi_create_uint32(env, w->crcs[i], &v);
      napi_set_element(env, result, (uint32_t)i, v);
    }
    napi_resolve_deferred(env, w->deferred, result);
  }
  napi_delete_reference(env, w->buf_ref);
  free(w);
}

static void WriteBatchComplete(napi_env env, napi_status status, void* arg) {
  wbatch_t* b = (wbatch_t*)arg;
  wjob_t* w = b->head;
  while (w) {
    wjob_t* next = w->next;
    napi_handle_scope scope;
    bool scoped = napi_open_handle_scope(env, &scope) == napi_ok;
    wjob_settle(env, status, w);
    if (scoped) napi_close_handle_scope(env, scope);
    w = next;
  }
  napi_delete_async_work(env, b->work);
  free(b);
}

/* Queues the pending list as one async work (called in a JS call or with a handle scope open). */
static void wstate_submit(wstate_t* st) {
  napi_env env = st->env;
  wjob_t* head = st->head;
  if (!head) return;
  st->head = NULL;
  st->tail = &st->head;
  st->bytes = 0;
  wbatch_t* b = (wbatch_t*)calloc(1, sizeof(wbatch_t));
  napi_value name;
  if (b) {
    b->head = head;
    if (napi_create_string_utf8(env, "kscinc.writeCrc", NAPI_AUTO_LENGTH, &name) == napi_ok &&
        napi_create_async_work(env, NULL, name, WriteBatchExecute, WriteBatchComplete, b, &b->work) == napi_ok) {
      if (napi_queue_async_work(env, b->work) == napi_ok) return;
      napi_delete_async_work(env, b->work);
    }
    free(b);
  }
  /* Could not queue: every job fails (ENOMEM), nothing was written. */
  while (head) {
    wjob_t* next = head->next;
    head->err = ENOMEM;
    wjob_settle(env, napi_ok, head);
    head = next;
  }
}

static void wstate_idle(uv_idle_t* h) {
  wstate_t* st = (wstate_t*)h->data;
  uv_idle_stop(h);
  st->idle_on = false;
  napi_handle_scope scope;
  if (napi_open_handle_scope(st->env, &scope) != napi_ok) return;
  wstate_submit(st);
  napi_close_handle_scope(st->env, scope);
}

/* The environment is going away: pending jobs are dropped with it (their promises never settle). No close
 * callback, and the state is not freed: a worker thread's environment unloads this addon before its loop
 * runs the closing handles' callbacks (a callback of ours would be gone), and libuv still touches the
 * handle then. So each environment that wrote leaves its few dozen bytes behind. */
static void wstate_cleanup(void* arg) { uv_close((uv_handle_t*)&((wstate_t*)arg)->idle, NULL); }

/* The environment's batching state, created at its first write. */
static wstate_t* wstate_of(napi_env env) {
  void* data = NULL;
  if (napi_get_instance_data(env, &data) == napi_ok && data) return (wstate_t*)data;
  uv_loop_t* loop;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return NULL;
  wstate_t* st = (wstate_t*)calloc(1, sizeof(wstate_t));
  if (!st) return NULL;
  st->env = env;
  st->tail = &st->head;
  if (uv_idle_init(loop, &st->idle) != 0) {
    free(st);
    return NULL;
  }
  st->idle.data = st; /* active (and so keeping the loop alive) only while writes wait to be queued */
  if (napi_set_instance_data(env, st, NULL, NULL) != napi_ok || napi_add_env_cleanup_hook(env, wstate_cleanup, st) != napi_ok) {
    uv_close((uv_handle_t*)&st->idle, NULL); /* st stays allocated: see wstate_cleanup */
    return NULL;
  }
  return st;
}

/* writeCrc(fd, buf, position, blockSize[, lo, hi]): with lo and hi, only buf[lo, hi) is written (at
 * position + lo; the rest of buf is what the file holds there already), the CRCs still those of all of buf. */
static napi_value WriteCrc(napi_env env, napi_callback_info info) {
  napi_value argv[6];
  size_t argc = 6;
  NAPI_CALL(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  if (argc < 4) return throw_type(env, "writeCrc", "arguments", "(fd, buf, position, blockSize[, lo, hi])");
  int fd;
  int64_t pos, block, lo = 0, hi = -1;
  uint8_t* data;
  size_t len;
  if (!get_fd(env, argv[0], "writeCrc", "pwrite", &fd)) return NULL;
  if (!get_bytes(env, argv[1], "writeCrc", "buf", &data, &len)) return NULL;
  if (!get_integer(env, argv[2], "writeCrc", "position", &pos)) return NULL;
  if (!get_integer(env, argv[3], "writeCrc", "blockSize", &block)) return NULL;
  if (argc >= 6) {
    if (!get_integer(env, argv[4], "writeCrc", "lo", &lo)) return NULL;
    if (!get_integer(env, argv[5], "writeCrc", "hi", &hi)) return NULL;
  } else {
    hi = (int64_t)len;
  }
  if (pos < 0 || block <= 0 || block > (int64_t)UINT32_MAX || lo < 0 || hi < lo || hi > (int64_t)len) return throw_errno(env, EINVAL, "pwrite");
  wstate_t* st = wstate_of(env);
  if (!st) return throw_errno(env, ENOMEM, "writeCrc");
  size_t ncrc = (len + (size_t)block - 1) / (size_t)block;
  wjob_t* w = (wjob_t*)malloc(sizeof(wjob_t) + ncrc * sizeof(uint32_t));
  if (!w) return throw_errno(env, ENOMEM, "writeCrc");
  w->next = NULL;
  w->err = 0;
  w->fd = fd;
  w->data = data;
  w->len = len;
  w->pos = pos;
  w->lo = (size_t)lo;
  w->hi = (size_t)hi;
  w->block = (size_t)block;
  w->ncrc = ncrc;
  napi_value promise;
  if (napi_create_promise(env, &w->deferred, &promise) != napi_ok ||
      napi_create_reference(env, argv[1], 1, &w->buf_ref) != napi_ok) { /* keep the buffer alive */
    free(w);
    return throw_napi_failure(env, "writeCrc");
  }
  *st->tail = w;
  st->tail = &w->next;
  st->bytes += w->hi - w->lo;
  if (st->bytes >= BATCH_BYTES) {
    wstate_submit(st);
  } else if (!st->idle_on) {
    st->idle_on = true;
    uv_idle_start(&st->idle, wstate_idle);
  }
  return promise;
}

/* ------------------------------------------------------------------------ */
/* LZ4 blocks (liblz4, when its headers were present at build time)          */
/*                                                                          */
/* The stored form of formats/repository.md §5.4: u32 LE raw length, then   */
/* one LZ4 block. Written straight into the caller's buffer, so the backup  */
/* pipeline allocates nothing per chunk (and no memory the JS engine cannot  */
/* see: lz4-napi's results made worker memory grow between collections).    */

#ifdef KSCINC_HAVE_LZ4
#include <lz4.h>


/* The (src, dst, dstOffset) arguments both LZ4 functions take. */
static bool get_lz4_args(napi_env env, napi_callback_info info, const char* fn, uint8_t** src, size_t* src_len,
                         uint8_t** dst, size_t* dst_len, int64_t* at) {
  napi_value argv[3];
  size_t argc = 3;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) {
    throw_napi_failure(env, "napi_get_cb_info");
    return false;
  }
  if (argc < 3) {
    throw_type(env, fn, "arguments", "(src, dst, offset)");
    return false;
  }
  return get_bytes(env, argv[0], fn, "src", src, src_len) && get_bytes(env, argv[1], fn, "dst", dst, dst_len) &&
         get_integer(env, argv[2], fn, "offset", at);
}

/* lz4Compress(src, dst, dstOffset) -> bytes written at dst[dstOffset...]
 * (4 + block), or 0 when the result would not fit or not be smaller. */
static napi_value Lz4Compress(napi_env env, napi_callback_info info) {
  uint8_t *src, *dst;
  size_t src_len, dst_len;
  int64_t at;
  if (!get_lz4_args(env, info, "lz4Compress", &src, &src_len, &dst, &dst_len, &at)) return NULL;
  if (at < 0 || (size_t)at > dst_len || src_len > (size_t)LZ4_MAX_INPUT_SIZE) return make_int64(env, 0);
  size_t room = dst_len - (size_t)at;
  if (room <= 4 || src_len == 0) return make_int64(env, 0);
  size_t cap = room - 4;
  if (cap >= src_len) cap = src_len - 1; /* only useful when smaller than the raw chunk */
  int n = LZ4_compress_default((const char*)src, (char*)dst + at + 4, (int)src_len, (int)cap);
  if (n <= 0) return make_int64(env, 0);
  uint32_t raw = (uint32_t)src_len;
  dst[at] = raw & 0xff; dst[at + 1] = (raw >> 8) & 0xff; dst[at + 2] = (raw >> 16) & 0xff; dst[at + 3] = (raw >> 24) & 0xff;
  return make_int64(env, (int64_t)n + 4);
}

/* lz4Decompress(src, dst, dstOffset) -> bytes written at dst[dstOffset...], or
 * -1 when src (u32 raw length + block) is malformed or does not fit. */
static napi_value Lz4Decompress(napi_env env, napi_callback_info info) {
  uint8_t *src, *dst;
  size_t src_len, dst_len;
  int64_t at;
  if (!get_lz4_args(env, info, "lz4Decompress", &src, &src_len, &dst, &dst_len, &at)) return NULL;
  if (src_len < 4 || at < 0 || (size_t)at > dst_len || src_len - 4 > (size_t)INT32_MAX) return make_int64(env, -1);
  uint32_t raw = (uint32_t)src[0] | ((uint32_t)src[1] << 8) | ((uint32_t)src[2] << 16) | ((uint32_t)src[3] << 24);
  if ((size_t)raw > dst_len - (size_t)at || raw > (uint32_t)INT32_MAX) return make_int64(env, -1);
  int n = LZ4_decompress_safe((const char*)src + 4, (char*)dst + at, (int)(src_len - 4), (int)raw);
  if (n < 0 || (uint32_t)n != raw) return make_int64(env, -1);
  return make_int64(env, n);
}
#endif


/* ------------------------------------------------------------------------ */
/* readCached(fd, buf, position) -> bytes read, or -2                       */
/*                                                                          */
/* preadv2(..., RWF_NOWAIT) into buf at position, looping over short reads:  */
/* it copies only what the page cache already holds and never waits for the */
/* disk, so it may run on the event loop. Returns the bytes read (stopping   */
/* at the first byte that would need the disk, or at end of file), or -2     */
/* when the kernel or file system does not support RWF_NOWAIT.               */

static napi_value ReadCached(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  uint8_t* data;
  size_t len;
  off_t pos;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_fd(env, argv[0], "readCached", "preadv2", &fd)) return NULL;
  if (!get_bytes(env, argv[1], "readCached", "buf", &data, &len)) return NULL;
  if (!get_offset(env, argv[2], "readCached", "position", "preadv2", &pos)) return NULL;
#ifdef RWF_NOWAIT
  size_t done = 0;
  while (done < len) {
    struct iovec iov = {data + done, len - done};
    ssize_t n = preadv2(fd, &iov, 1, pos + (off_t)done, RWF_NOWAIT);
    if (n > 0) {
      done += (size_t)n;
      continue;
    }
    if (n == 0) break; /* end of file */
    if (errno == EINTR) continue;
    if (errno == EAGAIN) break; /* the rest needs the disk */
    if (done == 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)) return make_int64(env, -2);
    if (done > 0) break; /* report what was read; the caller's normal read meets the error */
    return throw_errno(env, errno, "preadv2");
  }
  return make_int64(env, (int64_t)done);
#else
  (void)data; (void)len; (void)pos; (void)fd;
  return make_int64(env, -2);
#endif
}

/* readCachedAt(fd, buf, at, length, position) -> bytes read, or -2          */
/*                                                                          */
/* readCached into buf[at, at+length): an NBD READ's data read straight into */
/* its place in a batch of replies, with no view made per request.          */

static napi_value ReadCachedAt(napi_env env, napi_callback_info info) {
  napi_value argv[5];
  int fd;
  uint8_t* data;
  size_t len;
  off_t at, want, pos;
  if (!get_args(env, info, 5, argv)) return NULL;
  if (!get_fd(env, argv[0], "readCachedAt", "preadv2", &fd)) return NULL;
  if (!get_bytes(env, argv[1], "readCachedAt", "buf", &data, &len)) return NULL;
  if (!get_offset(env, argv[2], "readCachedAt", "at", "preadv2", &at)) return NULL;
  if (!get_offset(env, argv[3], "readCachedAt", "length", "preadv2", &want)) return NULL;
  if (!get_offset(env, argv[4], "readCachedAt", "position", "preadv2", &pos)) return NULL;
  if ((size_t)at > len || (size_t)want > len - (size_t)at) {
    napi_throw_range_error(env, NULL, "readCachedAt: at + length is past the end of buf");
    return NULL;
  }
#ifdef RWF_NOWAIT
  size_t done = 0;
  size_t n_want = (size_t)want;
  data += at;
  while (done < n_want) {
    struct iovec iov = {data + done, n_want - done};
    ssize_t n = preadv2(fd, &iov, 1, pos + (off_t)done, RWF_NOWAIT);
    if (n > 0) {
      done += (size_t)n;
      continue;
    }
    if (n == 0) break; /* end of file */
    if (errno == EINTR) continue;
    if (errno == EAGAIN) break; /* the rest needs the disk */
    if (done == 0 && (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)) return make_int64(env, -2);
    if (done > 0) break;
    return throw_errno(env, errno, "preadv2");
  }
  return make_int64(env, (int64_t)done);
#else
  (void)data; (void)at; (void)pos; (void)fd;
  return make_int64(env, -2);
#endif
}

/* setSendBuffer(fd, bytes) -> the send buffer size the kernel reports after */
/* setsockopt(SO_SNDBUF) (it doubles the request, capped by wmem_max).       */

static napi_value SetSendBuffer(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  off_t want;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (!get_fd(env, argv[0], "setSendBuffer", "setsockopt", &fd)) return NULL;
  if (!get_offset(env, argv[1], "setSendBuffer", "bytes", "setsockopt", &want)) return NULL;
  int v = want > INT_MAX / 2 ? INT_MAX / 2 : (int)want;
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &v, sizeof v) != 0) return throw_errno(env, errno, "setsockopt");
  int got = 0;
  socklen_t gl = sizeof got;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &gl) != 0) return throw_errno(env, errno, "getsockopt");
  return make_int64(env, got);
}

/* peerCred(fd) -> {pid, uid, gid}: the credentials the kernel recorded for */
/* the peer of a connected unix socket when it connected (or listened).     */

static napi_value PeerCred(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (!get_fd(env, argv[0], "peerCred", "getsockopt", &fd)) return NULL;
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return throw_errno(env, errno, "getsockopt");
  if (len != sizeof cred) return throw_errno(env, EPROTO, "getsockopt");
  napi_value obj;
  NAPI_CALL(env, napi_create_object(env, &obj));
  NAPI_CALL(env, napi_set_named_property(env, obj, "pid", make_int64(env, cred.pid)));
  NAPI_CALL(env, napi_set_named_property(env, obj, "uid", make_int64(env, cred.uid)));
  NAPI_CALL(env, napi_set_named_property(env, obj, "gid", make_int64(env, cred.gid)));
  return obj;
}

/* ------------------------------------------------------------------------ */

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
    {"punchHole", NULL, PunchHole, NULL, NULL, NULL, napi_enumerable, NULL},
    {"zeroRange", NULL, ZeroRange, NULL, NULL, NULL, napi_enumerable, NULL},
    {"seekData", NULL, SeekData, NULL, NULL, NULL, napi_enumerable, NULL},
    {"seekHole", NULL, SeekHole, NULL, NULL, NULL, napi_enumerable, NULL},
    {"flock", NULL, Flock, NULL, NULL, NULL, napi_enumerable, NULL},
    {"funlock", NULL, Funlock, NULL, NULL, NULL, napi_enumerable, NULL},
    {"readCached", NULL, ReadCached, NULL, NULL, NULL, napi_enumerable, NULL},
    {"readCachedAt", NULL, ReadCachedAt, NULL, NULL, NULL, napi_enumerable, NULL},
    {"setSendBuffer", NULL, SetSendBuffer, NULL, NULL, NULL, napi_enumerable, NULL},
    {"peerCred", NULL, PeerCred, NULL, NULL, NULL, napi_enumerable, NULL},
#ifdef KSCINC_HAVE_LZ4
    {"lz4Compress", NULL, Lz4Compress, NULL, NULL, NULL, napi_enumerable, NULL},
    {"lz4Decompress", NULL, Lz4Decompress, NULL, NULL, NULL, napi_enumerable, NULL},
#endif
  };
  NAPI_CALL(env, napi_define_properties(
                     env, exports, sizeof(props) / sizeof(props[0]), props));
  if (HAVE_BLOCK_CRC32) { /* only with a CRC-32 to checksum with (libdeflate, or Node's own zlib) */
    napi_value fn;
    NAPI_CALL(env, napi_create_function(env, "writeCrc", NAPI_AUTO_LENGTH, WriteCrc, NULL, &fn));
    NAPI_CALL(env, napi_set_named_property(env, exports, "writeCrc", fn));
  }
  if (!kscinc_aead_register(env, exports)) return throw_napi_failure(env, "kscinc_aead_register");
  if (!kscinc_send_register(env, exports)) return throw_napi_failure(env, "kscinc_send_register");
  if (!kscinc_sync_register(env, exports)) return throw_napi_failure(env, "kscinc_sync_register");
  if (!kscinc_xxh64_register(env, exports)) return throw_napi_failure(env, "kscinc_xxh64_register");
  if (!kscinc_ident_register(env, exports)) return throw_napi_failure(env, "kscinc_ident_register");
  if (!kscinc_exit_register(env, exports)) return throw_napi_failure(env, "kscinc_exit_register");
  if (!kscinc_idtable_register(env, exports)) return throw_napi_failure(env, "kscinc_idtable_register");
  if (!kscinc_pages_register(env, exports)) return throw_napi_failure(env, "kscinc_pages_register");
  return exports;
}
