/* bridge_stub.c - the Metal bridge on builds that are not for macOS. */
#include <stdio.h>

#include "metal/bridge.h"

int mf_metal_available(char *reason, size_t reason_len) {
    snprintf(reason, reason_len, "Metal backend not built (this build is not for macOS)");
    return 0;
}

const char *mf_metal_build_info(void) { return "not built (not macOS)"; }
