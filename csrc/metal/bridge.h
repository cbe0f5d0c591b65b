/* bridge.h - the plain C ABI of the Metal backend (bridge.m on macOS, bridge_stub.c elsewhere).
 * No Objective-C or Python types cross this boundary. */
#ifndef MF_METAL_BRIDGE_H
#define MF_METAL_BRIDGE_H

#include <stddef.h>

/* 1 when a Metal device can be used; otherwise 0 and the reason. */
int mf_metal_available(char *reason, size_t reason_len);

/* Human-readable build facts ("not built", or the device name once probed). */
const char *mf_metal_build_info(void);

#endif /* MF_METAL_BRIDGE_H */
