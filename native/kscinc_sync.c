/* Starting writeback early (src/io/file.ts, write-behind of a serving image).                           */
/*                                                                                                      */
/* syncFileRange(fd, offset, nbytes, flags) -> Promise<void>: sync_file_range(2) on a libuv pool thread. */
/*   flags: 1 SYNC_FILE_RANGE_WAIT_BEFORE, 2 SYNC_FILE_RANGE_WRITE, 4 SYNC_FILE_RANGE_WAIT_AFTER (the    */
/*   kernel's values); nbytes 0 means "to the end of the file". With WRITE alone (or with WAIT_BEFORE)   */
/*   it starts writeback of the range's dirty pages and makes nothing durable: no file metadata, no disk */
/*   cache flush. Even then the call may block while the device queue is full, so it never runs on the  */
/*   event loop. Rejects with an errno-coded Error (ENOSYS where the kernel has no such call).           */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>

#include "kscinc_send.h"
#include "kscinc_sync.h"

#if defined(__linux__)

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  int fd;
  off_t offset;
  off_t nbytes;
  unsigned int flags;
  int err;
} sync_range_t;

static void SyncRangeExecute(napi_env env, void* arg) {
  (void)env;
  sync_range_t* s = (sync_range_t*)arg;
  while (sync_file_range(s->fd, s->offset, s->nbytes, s->flags) != 0) {
    if (errno == EINTR) continue;
    s->err = errno;
    return;
  }
}

static void SyncRangeComplete(napi_env env, napi_status status, void* arg) {
  sync_range_t* s = (sync_range_t*)arg;
  int err = status != napi_ok ? EIO : s->err;
  if (err == 0) {
    napi_value undefined;
    napi_get_undefined(env, &undefined);
    napi_resolve_deferred(env, s->deferred, undefined);
  } else {
    /* throw_errno builds the errno-coded Error every other function throws; take it back as a value. */
    napi_value error;
    throw_errno(env, err, "sync_file_range");
    if (napi_get_and_clear_last_exception(env, &error) != napi_ok) napi_get_undefined(env, &error);
    napi_reject_deferred(env, s->deferred, error);
  }
  napi_delete_async_work(env, s->work);
  free(s);
}

static napi_value SyncFileRange(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int fd;
  off_t offset, nbytes, flags;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!get_fd(env, argv[0], "syncFileRange", "sync_file_range", &fd)) return NULL;
  if (!get_offset(env, argv[1], "syncFileRange", "offset", "sync_file_range", &offset)) return NULL;
  if (!get_offset(env, argv[2], "syncFileRange", "nbytes", "sync_file_range", &nbytes)) return NULL;
  if (!get_offset(env, argv[3], "syncFileRange", "flags", "sync_file_range", &flags)) return NULL;
  if (flags > 7) return throw_errno(env, EINVAL, "sync_file_range");
  sync_range_t* s = (sync_range_t*)calloc(1, sizeof(sync_range_t));
  if (!s) return throw_errno(env, ENOMEM, "sync_file_range");
  s->fd = fd;
  s->offset = offset;
  s->nbytes = nbytes;
  s->flags = (unsigned int)flags;
  napi_value promise, name;
  if (napi_create_promise(env, &s->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, "kscinc.syncFileRange", NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, SyncRangeExecute, SyncRangeComplete, s, &s->work) != napi_ok ||
      napi_queue_async_work(env, s->work) != napi_ok) {
    free(s);
    return throw_errno(env, EIO, "napi_queue_async_work");
  }
  return promise;
}

bool kscinc_sync_register(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "syncFileRange", NAPI_AUTO_LENGTH, SyncFileRange, NULL, &fn) != napi_ok) return false;
  return napi_set_named_property(env, exports, "syncFileRange", fn) == napi_ok;
}

#else

bool kscinc_sync_register(napi_env env, napi_value exports) {
  (void)env;
  (void)exports;
  return true; /* no sync_file_range: callers go without write-behind */
}

#endif
