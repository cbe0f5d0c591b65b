/* bridge_stub.c - the Metal bridge on builds without it: not for macOS, MTLFLASH_METAL=OFF, or
 * bridge.m failed to compile at configure time (cmake/metal_bridge.cmake writes the reason). */
#include <stdio.h>

#include "metal/bridge.h"

#ifdef MF_METAL_STUB_REASON_H
#include "mf_metal_stub_reason.h"
#endif
#ifndef MF_METAL_STUB_REASON
#define MF_METAL_STUB_REASON "this build is not for macOS"
#endif

static const char k_reason[] = "Metal backend not built: " MF_METAL_STUB_REASON;

int mf_metal_available(char *reason, size_t reason_len) {
    snprintf(reason, reason_len, "%s", k_reason);
    return 0;
}

const char *mf_metal_build_info(void) { return "not built: " MF_METAL_STUB_REASON; }

int mf_metal_caps_of(uint64_t mtl_buffer, mf_metal_caps *caps, char *err, size_t err_len) {
    (void)mtl_buffer;
    (void)caps;
    snprintf(err, err_len, "%s", k_reason);
    return -1;
}

int mf_metal_run(const mf_metal_plan *plan, const mf_metal_binding slots[MF_NUM_SLOTS],
                 const mf_metal_binding app_slots[MF_NUM_SLOTS], char *err, size_t err_len) {
    (void)plan;
    (void)slots;
    (void)app_slots;
    snprintf(err, err_len, "%s", k_reason);
    return -1;
}
