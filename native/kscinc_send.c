/* Zero-copy replies of the NBD server (src/nbd/zerocopy.ts).                                           */
/*                                                                                                      */
/* cachedRange(fd, position, length) -> 1 when every page of the range is in the page cache, 0 when not, */
/*   -2 when the kernel has no cachestat(2) (Linux < 6.5) or this file system cannot tell.               */
/* sendFile(socket, fd, position, length) -> bytes sent: sendfile(2) from the file to the socket, which  */
/*   must be non-blocking, looping until done, the socket's buffer is full (EAGAIN) or the file ends.    */
/*   The kernel passes page-cache pages to the socket without copying them through this process. Only    */
/*   call it for ranges cachedRange() just found cached: on the event loop it must not wait for a disk.  */
/* sendBytes(socket, buf, more) -> bytes sent: send(2) with MSG_DONTWAIT (and MSG_MORE when `more`).     */
/* Both send functions throw an errno-coded Error only when nothing was sent; after a short count the    */
/* caller writes the rest the ordinary way, which meets the error again.                                 */
#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "kscinc_send.h"

#if defined(__linux__)
#include <sys/sendfile.h>

#ifndef __NR_cachestat
#define __NR_cachestat 451 /* the same number on every architecture (the unified table of new syscalls) */
#endif

struct kscinc_cachestat_range {
  uint64_t off;
  uint64_t len;
};
struct kscinc_cachestat {
  uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

static long page_size(void) {
  static long ps = 0;
  if (ps == 0) ps = sysconf(_SC_PAGESIZE);
  return ps > 0 ? ps : 4096;
}

static napi_value CachedRange(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int fd;
  off_t pos, len;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_fd(env, argv[0], "cachedRange", "cachestat", &fd)) return NULL;
  if (!get_offset(env, argv[1], "cachedRange", "position", "cachestat", &pos)) return NULL;
  if (!get_offset(env, argv[2], "cachedRange", "length", "cachestat", &len)) return NULL;
  if (len == 0) return make_int64(env, 1);
  struct kscinc_cachestat_range r = {(uint64_t)pos, (uint64_t)len};
  struct kscinc_cachestat cs = {0, 0, 0, 0, 0};
  if (syscall(__NR_cachestat, fd, &r, &cs, 0) != 0) {
    if (errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL) return make_int64(env, -2);
    return throw_errno(env, errno, "cachestat");
  }
  long ps = page_size();
  uint64_t pages = ((uint64_t)pos + (uint64_t)len + (uint64_t)ps - 1) / (uint64_t)ps - (uint64_t)pos / (uint64_t)ps;
  return make_int64(env, cs.nr_cache >= pages ? 1 : 0);
}

static napi_value SendFile(napi_env env, napi_callback_info info) {
  napi_value argv[4];
  int sock, fd;
  off_t pos, len;
  if (!get_args(env, info, 4, argv)) return NULL;
  if (!get_fd(env, argv[0], "sendFile", "sendfile", &sock)) return NULL;
  if (!get_fd(env, argv[1], "sendFile", "sendfile", &fd)) return NULL;
  if (!get_offset(env, argv[2], "sendFile", "position", "sendfile", &pos)) return NULL;
  if (!get_offset(env, argv[3], "sendFile", "length", "sendfile", &len)) return NULL;
  off_t done = 0;
  while (done < len) {
    off_t at = pos + done;
    off_t want = len - done;
    if (want > 0x7ffff000) want = 0x7ffff000;
    ssize_t n = sendfile(sock, fd, &at, (size_t)want);
    if (n > 0) {
      done += n;
      continue;
    }
    if (n == 0) break; /* end of file */
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK || done > 0) break;
    return throw_errno(env, errno, "sendfile");
  }
  return make_int64(env, (int64_t)done);
}

static napi_value SendBytes(napi_env env, napi_callback_info info) {
  napi_value argv[3];
  int sock;
  uint8_t* data;
  size_t len;
  bool more;
  if (!get_args(env, info, 3, argv)) return NULL;
  if (!get_fd(env, argv[0], "sendBytes", "send", &sock)) return NULL;
  if (!get_bytes(env, argv[1], "sendBytes", "buf", &data, &len)) return NULL;
  if (!get_bool(env, argv[2], "sendBytes", "more", &more)) return NULL;
  size_t done = 0;
  int flags = MSG_DONTWAIT | MSG_NOSIGNAL | (more ? MSG_MORE : 0);
  while (done < len) {
    ssize_t n = send(sock, data + done, len - done, flags);
    if (n > 0) {
      done += (size_t)n;
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK || done > 0) break;
    return throw_errno(env, errno, "send");
  }
  return make_int64(env, (int64_t)done);
}

bool kscinc_send_register(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"cachedRange", NULL, CachedRange, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sendFile", NULL, SendFile, NULL, NULL, NULL, napi_enumerable, NULL},
      {"sendBytes", NULL, SendBytes, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  return napi_define_properties(env, exports, sizeof props / sizeof props[0], props) == napi_ok;
}

#else

bool kscinc_send_register(napi_env env, napi_value exports) {
  (void)env;
  (void)exports;
  return true;
}

#endif
