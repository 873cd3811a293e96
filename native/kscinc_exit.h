/* The exit watchdog of the CLI's signal handler (kscinc_exit.c). */
#ifndef KSCINC_EXIT_H
#define KSCINC_EXIT_H
#include <stdbool.h>
#include <node_api.h>

/* Adds armExitWatchdog to `exports`. False when N-API failed. */
bool kscinc_exit_register(napi_env env, napi_value exports);

#endif
