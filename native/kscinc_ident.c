/* Which file a restore mark was written for (src/engines/restore-target.ts, formats/repository.md §9.5).  */
/*                                                                                                      */
/* inodeGeneration(fd) -> number: ioctl(FS_IOC_GETVERSION), the generation number the file system gave   */
/*   the inode when it was allocated (ext2/3/4, XFS, btrfs, tmpfs...): a file made later that gets the    */
/*   same inode number gets another generation, also where the file system keeps no birth time. -2 when  */
/*   the file system has no such number (ENOTTY, EOPNOTSUPP, EINVAL); other failures throw.              */
#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>

#include "kscinc_ident.h"
#include "kscinc_send.h"

#if defined(__linux__)
#include <linux/fs.h>

static napi_value InodeGeneration(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv)) return NULL;
  if (!get_fd(env, argv[0], "inodeGeneration", "ioctl", &fd)) return NULL;
  /* The kernel writes an int-sized value for FS_IOC_GETVERSION whatever the macro's declared type. */
  unsigned int gen = 0;
  if (ioctl(fd, FS_IOC_GETVERSION, &gen) != 0) {
    if (errno == ENOTTY || errno == EOPNOTSUPP || errno == EINVAL) return make_int64(env, -2);
    return throw_errno(env, errno, "ioctl");
  }
  return make_int64(env, (int64_t)gen);
}

bool kscinc_ident_register(napi_env env, napi_value exports) {
  napi_value fn;
  if (napi_create_function(env, "inodeGeneration", NAPI_AUTO_LENGTH, InodeGeneration, NULL, &fn) != napi_ok) return false;
  return napi_set_named_property(env, exports, "inodeGeneration", fn) == napi_ok;
}

#else

bool kscinc_ident_register(napi_env env, napi_value exports) {
  (void)env;
  (void)exports;
  return true; /* no inode generation: marks name a file by inode number and birth time */
}

#endif
