/* The exit watchdog of the CLI's signal handler (src/cli/program.ts removeUnfinishedOnSignal).            */
/*                                                                                                       */
/* process.exit waits for libuv's thread pool: an fs request that never returns (a hard NFS mount hung in */
/* read or fsync, the open of a fifo nobody opens from the other side) keeps the process alive for ever.  */
/* armExitWatchdog(status, quietMs) -> boolean starts a detached thread that _exit()s the process with    */
/* `status` once the process has done no I/O for `quietMs` in a row; the handler arms it just before it   */
/* calls process.exit, so an exit that finishes ends as before, and one that is stuck ends quietMs later. */
/* An exit that is still reading or writing (an 'exit' listener writing, queued writes draining on the   */
/* pool) is not cut: "I/O" is any change of the counters of /proc/self/io (bytes and calls of read and     */
/* write, bytes sent to and dropped from storage) other than the watchdog's own reads of them. An fsync,  */
/* open or rename moves no counter: one taking longer than quietMs is cut. Where /proc is not readable,   */
/* quietMs after arming. A request in flight when the watchdog ends the process is the kernel's to finish */
/* or abandon, as with SIGKILL: it was issued only after what it depends on was done.                     */
/* False when a watchdog was armed already (the first status stands) or the thread could not start.      */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kscinc_exit.h"
#include "kscinc_send.h"

#define POLL_MS 100

static int exit_status;
static int64_t quiet_ms;
static int armed; /* only the JS thread arms */

/* Sum of the numbers of an io file (/proc/.../io: "rchar: N" lines) read with one read(2) of `*got` */
/* bytes; false when it cannot be read. */
static bool read_io(const char* path, uint64_t* sum, uint64_t* got) {
  char buf[512];
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  ssize_t n;
  do n = read(fd, buf, sizeof(buf) - 1);
  while (n < 0 && errno == EINTR);
  close(fd);
  if (n <= 0) return false;
  buf[n] = '\0';
  uint64_t s = 0;
  for (char* p = buf; (p = strchr(p, ':')) != NULL;) s += strtoull(++p, &p, 10);
  *sum = s;
  *got = (uint64_t)n;
  return true;
}

/* The I/O of every thread but this one so far, or false when /proc does not tell. The process's total is */
/* read first: it holds this thread's reads up to then, which this thread's own count (read next) holds    */
/* too, with the read of the total besides (its bytes in rchar, one call in syscr): taken off again.       */
static bool others_io(uint64_t* out) {
  uint64_t all, mine, got, ignored;
  if (!read_io("/proc/self/io", &all, &got) || !read_io("/proc/thread-self/io", &mine, &ignored)) return false;
  *out = all - (mine - got - 1);
  return true;
}

static void* watch(void* arg) {
  (void)arg;
  uint64_t last = 0;
  bool known = others_io(&last);
  int64_t quiet = 0;
  struct timespec step = {POLL_MS / 1000, (POLL_MS % 1000) * 1000000L};
  for (;;) {
    struct timespec left = step;
    while (nanosleep(&left, &left) != 0 && errno == EINTR) {
    }
    uint64_t now;
    if (known && others_io(&now) && now != last) {
      last = now;
      quiet = 0;
    } else {
      quiet += POLL_MS;
    }
    if (quiet >= quiet_ms) _exit(exit_status);
  }
  return NULL;
}

static napi_value ArmExitWatchdog(napi_env env, napi_callback_info info) {
  napi_value argv[2], result;
  int32_t status;
  int64_t ms;
  if (!get_args(env, info, 2, argv)) return NULL;
  if (napi_get_value_int32(env, argv[0], &status) != napi_ok || napi_get_value_int64(env, argv[1], &ms) != napi_ok || ms < 0) {
    napi_throw_type_error(env, NULL, "armExitWatchdog(status, quietMs): two numbers, quietMs >= 0");
    return NULL;
  }
  bool started = false;
  if (!armed) {
    exit_status = status;
    quiet_ms = ms;
    pthread_attr_t attr;
    pthread_t t;
    if (pthread_attr_init(&attr) == 0) {
      pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
      pthread_attr_setstacksize(&attr, 64 * 1024);
      started = pthread_create(&t, &attr, watch, NULL) == 0;
      pthread_attr_destroy(&attr);
    }
    armed = started;
  }
  if (napi_get_boolean(env, started, &result) != napi_ok) return NULL;
  return result;
}

bool kscinc_exit_register(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "armExitWatchdog", NAPI_AUTO_LENGTH, ArmExitWatchdog, NULL, &fn) != napi_ok) return false;
  return napi_set_named_property(env, exports, "armExitWatchdog", fn) == napi_ok;
}
