/* A file's inode generation (kscinc_ident.c). */
#ifndef KSCINC_IDENT_H
#define KSCINC_IDENT_H
#include <stdbool.h>
#include <node_api.h>

/* Adds inodeGeneration to `exports` (Linux; elsewhere nothing). False when N-API failed. */
bool kscinc_ident_register(napi_env env, napi_value exports);

#endif
