/* bridge.m - the Metal bridge on macOS.
 *
 * This version only probes for a Metal device: the kernels and their dispatch are not part of
 * this version yet, so every Metal tier reports itself unavailable and MPS tensors run on the
 * `reference` tier. The C ABI (bridge.h) is the seam the kernel dispatch plugs into. */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <stdio.h>

#include "metal/bridge.h"

static char g_info[256];

int mf_metal_available(char *reason, size_t reason_len) {
    @autoreleasepool {
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        if (dev == nil) {
            snprintf(reason, reason_len, "no Metal device found");
            return 0;
        }
        snprintf(reason, reason_len,
                 "Metal device '%s' found, but the Metal kernels are not part of this version",
                 [[dev name] UTF8String]);
        return 0;
    }
}

const char *mf_metal_build_info(void) {
    @autoreleasepool {
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        snprintf(g_info, sizeof g_info, "built; device: %s",
                 dev != nil ? [[dev name] UTF8String] : "none");
        return g_info;
    }
}
