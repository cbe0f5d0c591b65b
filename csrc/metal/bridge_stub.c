/* bridge_stub.c - the Metal bridge on builds that are not for macOS. */
#include <stdio.h>

#include "metal/bridge.h"

static const char k_reason[] = "Metal backend not built (this build is not for macOS)";

int mf_metal_available(char *reason, size_t reason_len) {
    snprintf(reason, reason_len, "%s", k_reason);
    return 0;
}

const char *mf_metal_build_info(void) { return "not built (not macOS)"; }

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
