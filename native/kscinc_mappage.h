/* A ksc_inc map page's decode (kscinc_mappage.c, src/image/maptable.ts). */
#ifndef KSCINC_MAPPAGE_H
#define KSCINC_MAPPAGE_H
#include <stdbool.h>
#include <node_api.h>

/* Adds mapPageDecode to `exports`. False when N-API failed. */
bool kscinc_mappage_register(napi_env env, napi_value exports);

#endif
