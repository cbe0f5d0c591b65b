/* bridge.m - the Metal bridge on macOS (Objective-C, ARC). Plain C ABI in bridge.h.
 *
 * Everything that can be decided without a GPU (tier, source, defines, grid, threadgroup,
 * scratch size, the params block) arrives decided in an mf_metal_plan from dispatch.c; this file
 * only turns it into Metal calls:
 *   device   = the device of q's MTLBuffer (so torch and mtlflash share one MTLDevice)
 *   library  = newLibraryWithSource: on the self-contained source (sources.c), compiled once per
 *              (device, source, defines) with explicit options (math mode safe, language
 *              version per OS), cached
 *   pipeline = one per (library, kernel), cached
 *   launch   = own command queue per device, one compute encoder, buffers bound by fixed slot
 *              (unbound slots get a small dummy buffer), params by setBytes, a buffer barrier
 *              between dependent launches, commit, wait, status check.
 * Nothing here throws across the boundary: NSError text becomes the error string. Every entry
 * point runs inside an autorelease pool. */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "metal/bridge.h"
#include "metal/sources.h"

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static NSMutableDictionary<NSString *, id<MTLLibrary>> *g_libraries;           /* under g_lock */
static NSMutableDictionary<NSString *, id<MTLComputePipelineState>> *g_pipelines; /* under g_lock */
static NSMutableDictionary<NSNumber *, id<MTLCommandQueue>> *g_queues;           /* under g_lock */
static NSMutableDictionary<NSNumber *, id<MTLBuffer>> *g_dummies;                /* under g_lock */
static char g_info[256];

static void set_err(char *err, size_t n, NSString *what, NSError *e) {
    NSString *text = e != nil ? [NSString stringWithFormat:@"%@: %@", what, e.localizedDescription] : what;
    snprintf(err, n, "%s", text.UTF8String != NULL ? text.UTF8String : "Metal error");
}

static id<MTLBuffer> buffer_from_handle(uint64_t handle) {
    return (__bridge id<MTLBuffer>)(void *)(uintptr_t)handle;
}

/* Probed once per process: the default device, else the first of all devices. */
static int g_available;
static char g_available_reason[256];

static void probe_once(void) {
    @autoreleasepool {
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        if (dev == nil) {
            NSArray<id<MTLDevice>> *all = MTLCopyAllDevices();
            dev = all.count > 0 ? all[0] : nil;
        }
        g_available = dev != nil;
        snprintf(g_available_reason, sizeof g_available_reason, dev != nil ? "Metal device '%s'" : "%s",
                 dev != nil ? dev.name.UTF8String : "no Metal device found");
    }
}

int mf_metal_available(char *reason, size_t reason_len) {
    static dispatch_once_t once;
    dispatch_once(&once, ^{
      probe_once();
    });
    snprintf(reason, reason_len, "%s", g_available_reason);
    return g_available;
}

const char *mf_metal_build_info(void) {
    @autoreleasepool {
        id<MTLDevice> dev = MTLCreateSystemDefaultDevice();
        snprintf(g_info, sizeof g_info, "built; device: %s", dev != nil ? dev.name.UTF8String : "none");
        return g_info;
    }
}

static void caps_of_device(id<MTLDevice> dev, mf_metal_caps *caps) {
    memset(caps, 0, sizeof *caps);
    /* MTLGPUFamilyAppleN == 1000 + N; raw values, since older SDKs lack the newest names. */
    for (int f = 10; f >= 1; f--) {
        if ([dev supportsFamily:(MTLGPUFamily)(1000 + f)]) {
            caps->apple_family = f;
            break;
        }
    }
    if (@available(macOS 14.0, *)) caps->bfloat = 1;
    caps->tensorops = 0; /* no probe yet: the tier does not exist */
}

static NSMutableDictionary<NSNumber *, NSData *> *g_caps; /* under g_lock: registryID -> caps */

int mf_metal_caps_of(uint64_t mtl_buffer, mf_metal_caps *caps, char *err, size_t err_len) {
    @autoreleasepool {
        id<MTLBuffer> buf = buffer_from_handle(mtl_buffer);
        if (buf == nil) {
            snprintf(err, err_len, "tensor has no Metal buffer");
            return -1;
        }
        id<MTLDevice> dev = buf.device;
        NSNumber *key = @(dev.registryID);
        pthread_mutex_lock(&g_lock);
        if (g_caps == nil) g_caps = [NSMutableDictionary dictionary];
        NSData *known = g_caps[key];
        if (known != nil) {
            memcpy(caps, known.bytes, sizeof *caps);
        } else {
            caps_of_device(dev, caps);
            g_caps[key] = [NSData dataWithBytes:caps length:sizeof *caps];
        }
        pthread_mutex_unlock(&g_lock);
        return 0;
    }
}

static MTLCompileOptions *compile_options(const mf_metal_define *defines, int n_defines) {
    MTLCompileOptions *opt = [MTLCompileOptions new];
    /* No fast math and precise library functions: mathMode exists only in the macOS 15 SDK (and
     * @available checks the running OS, not the SDK), so older SDKs use fastMathEnabled. */
#if defined(__MAC_15_0) && __MAC_OS_X_VERSION_MAX_ALLOWED >= __MAC_15_0
    if (@available(macOS 15.0, *)) {
        opt.mathMode = MTLMathModeSafe;
        opt.mathFloatingPointFunctions = MTLMathFloatingPointFunctionsPrecise;
    } else
#endif
    {
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wdeprecated-declarations"
        opt.fastMathEnabled = NO;
#pragma clang diagnostic pop
    }
    /* Metal 3.1 (macOS 14) for bfloat, else 3.0; raw values (major << 16 | minor) because older
     * SDKs lack the newer names. */
    if (@available(macOS 14.0, *)) {
        opt.languageVersion = (MTLLanguageVersion)((3 << 16) + 1);
    } else if (@available(macOS 13.0, *)) {
        opt.languageVersion = (MTLLanguageVersion)(3 << 16);
    }
    NSMutableDictionary *macros = [NSMutableDictionary dictionary];
    for (int i = 0; i < n_defines; i++)
        macros[@(defines[i].name)] = @(defines[i].value);
    opt.preprocessorMacros = macros;
    return opt;
}

/* The pipeline of one kernel of a source compiled with some defines (the plan's attention
 * program, or its append pass). Caches are looked up under g_lock; a compile runs outside it
 * (two threads may compile the same variant once each: harmless). */
static id<MTLComputePipelineState> pipeline_for(id<MTLDevice> dev, const char *source,
                                                const mf_metal_define *defines, int n_defines,
                                                const char *kernel, char *err, size_t n) {
    NSMutableString *lib_key = [NSMutableString stringWithFormat:@"%llu|%s", (unsigned long long)dev.registryID,
                                                                 source];
    for (int i = 0; i < n_defines; i++)
        [lib_key appendFormat:@"|%s=%d", defines[i].name, defines[i].value];
    NSString *pipe_key = [NSString stringWithFormat:@"%@|%s", lib_key, kernel];

    pthread_mutex_lock(&g_lock);
    id<MTLComputePipelineState> ps = g_pipelines[pipe_key];
    id<MTLLibrary> lib = g_libraries[lib_key];
    pthread_mutex_unlock(&g_lock);
    if (ps != nil) return ps;
    if (lib == nil) {
        mf_error e = {MF_OK, ""};
        char *text = mf_metal_source(source, &e);
        if (text == NULL) {
            snprintf(err, n, "%s", e.msg);
            return nil;
        }
        NSString *src = [NSString stringWithUTF8String:text];
        free(text);
        if (src == nil) {
            snprintf(err, n, "%s is not valid UTF-8", source);
            return nil;
        }
        NSError *error = nil;
        lib = [dev newLibraryWithSource:src options:compile_options(defines, n_defines) error:&error];
        if (lib == nil) {
            set_err(err, n, [NSString stringWithFormat:@"compiling %s failed", source], error);
            return nil;
        }
        pthread_mutex_lock(&g_lock);
        if (g_libraries[lib_key] == nil) g_libraries[lib_key] = lib;
        pthread_mutex_unlock(&g_lock);
    }
    id<MTLFunction> fn = [lib newFunctionWithName:@(kernel)];
    if (fn == nil) {
        snprintf(err, n, "kernel %s not found in %s", kernel, source);
        return nil;
    }
    NSError *error = nil;
    ps = [dev newComputePipelineStateWithFunction:fn error:&error];
    if (ps == nil) {
        set_err(err, n, [NSString stringWithFormat:@"pipeline for %s failed", kernel], error);
        return nil;
    }
    if (ps.threadExecutionWidth != 32) {
        snprintf(err, n, "%s: the GPU's simdgroup width is %lu; the kernels need 32", kernel,
                 (unsigned long)ps.threadExecutionWidth);
        return nil;
    }
    pthread_mutex_lock(&g_lock);
    if (g_pipelines[pipe_key] == nil) g_pipelines[pipe_key] = ps;
    pthread_mutex_unlock(&g_lock);
    return ps;
}

/* Binds one launch's buffers: every slot but the params, unbound ones to the dummy buffer;
 * `bytes_slot` (>= 0) gets `bytes` by setBytes instead (the append pass's own params). */
static void bind_slots(id<MTLComputeCommandEncoder> enc, const mf_metal_binding slots[MF_NUM_SLOTS],
                       id<MTLBuffer> scratch, id<MTLBuffer> dummy, int bytes_slot, const void *bytes,
                       size_t n_bytes) {
    for (int s = 0; s < MF_NUM_SLOTS; s++) {
        if (s == MF_SLOT_PARAMS) continue;
        if (s == bytes_slot)
            [enc setBytes:bytes length:n_bytes atIndex:(NSUInteger)s];
        else if (s == MF_SLOT_SCRATCH && scratch != nil)
            [enc setBuffer:scratch offset:0 atIndex:(NSUInteger)s];
        else if (slots[s].buffer != 0)
            [enc setBuffer:buffer_from_handle(slots[s].buffer) offset:(NSUInteger)slots[s].offset
                   atIndex:(NSUInteger)s];
        else
            [enc setBuffer:dummy offset:0 atIndex:(NSUInteger)s];
    }
}

int mf_metal_run(const mf_metal_plan *plan, const mf_metal_binding slots[MF_NUM_SLOTS],
                 const mf_metal_binding app_slots[MF_NUM_SLOTS], char *err, size_t err_len) {
    @autoreleasepool {
        const int has_append = plan->append.present && app_slots != NULL;
        if (plan->n_launches == 0 && !has_append) return 0;
        /* the device: q's buffer's, or the cache's (an append with no query rows) */
        id<MTLBuffer> qbuf = buffer_from_handle(slots[MF_SLOT_Q].buffer != 0 ? slots[MF_SLOT_Q].buffer
                                                                             : slots[MF_SLOT_K].buffer);
        if (qbuf == nil) {
            snprintf(err, err_len, "q has no Metal buffer");
            return -1;
        }
        id<MTLDevice> dev = qbuf.device;
        NSNumber *dev_key = @(dev.registryID);
        id<MTLComputePipelineState> ps[MF_METAL_MAX_LAUNCHES] = {nil};
        id<MTLComputePipelineState> app_ps = nil;
        id<MTLCommandQueue> queue = nil;
        id<MTLBuffer> dummy = nil;

        pthread_mutex_lock(&g_lock);
        if (g_libraries == nil) {
            g_libraries = [NSMutableDictionary dictionary];
            g_pipelines = [NSMutableDictionary dictionary];
            g_queues = [NSMutableDictionary dictionary];
            g_dummies = [NSMutableDictionary dictionary];
        }
        queue = g_queues[dev_key];
        if (queue == nil) {
            queue = [dev newCommandQueue];
            if (queue != nil) g_queues[dev_key] = queue;
        }
        dummy = g_dummies[dev_key];
        if (dummy == nil) {
            dummy = [dev newBufferWithLength:64 options:MTLResourceStorageModePrivate];
            if (dummy != nil) g_dummies[dev_key] = dummy;
        }
        pthread_mutex_unlock(&g_lock);
        int ok = queue != nil && dummy != nil;
        if (!ok) snprintf(err, err_len, "could not create a command queue or buffer on %s", dev.name.UTF8String);
        for (int i = 0; ok && i < plan->n_launches; i++) {
            ps[i] = pipeline_for(dev, plan->source, plan->defines, plan->n_defines, plan->launches[i].kernel, err,
                                 err_len);
            ok = ps[i] != nil;
        }
        if (ok && has_append) {
            app_ps = pipeline_for(dev, plan->append.source, plan->append.defines, plan->append.n_defines,
                                  plan->append.launch.kernel, err, err_len);
            ok = app_ps != nil;
        }
        if (!ok) return -1;

        id<MTLBuffer> scratch = nil;
        if (plan->scratch_floats > 0) {
            scratch = [dev newBufferWithLength:(NSUInteger)(plan->scratch_floats * sizeof(float))
                                       options:MTLResourceStorageModePrivate];
            if (scratch == nil) {
                snprintf(err, err_len, "could not allocate %llu bytes of scratch",
                         (unsigned long long)(plan->scratch_floats * sizeof(float)));
                return -1;
            }
        }

        id<MTLCommandBuffer> cb = [queue commandBuffer];
        id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
        if (cb == nil || enc == nil) {
            if (enc != nil) [enc endEncoding];
            snprintf(err, err_len, "could not create a command buffer");
            return -1;
        }
        if (has_append) { /* the append + rotary pass: its writes are read by the launches below */
            const mf_metal_launch *l = &plan->append.launch;
            if (l->grid[0] != 0 && l->grid[1] != 0 && l->grid[2] != 0) {
                [enc setComputePipelineState:app_ps];
                bind_slots(enc, app_slots, nil, dummy, MF_APP_SLOT_APP_PARAMS, &plan->append.params,
                           sizeof(mf_append_params));
                [enc setBytes:&plan->params length:sizeof(mf_params) atIndex:MF_SLOT_PARAMS];
                [enc dispatchThreadgroups:MTLSizeMake(l->grid[0], l->grid[1], l->grid[2])
                    threadsPerThreadgroup:MTLSizeMake(l->threadgroup[0], l->threadgroup[1], l->threadgroup[2])];
                [enc memoryBarrierWithScope:MTLBarrierScopeBuffers];
            }
        }
        for (int i = 0; i < plan->n_launches; i++) {
            const mf_metal_launch *l = &plan->launches[i];
            if (l->grid[0] == 0 || l->grid[1] == 0 || l->grid[2] == 0) continue; /* nothing to do */
            NSUInteger threads = (NSUInteger)l->threadgroup[0] * l->threadgroup[1] * l->threadgroup[2];
            if (threads > ps[i].maxTotalThreadsPerThreadgroup) {
                [enc endEncoding];
                snprintf(err, err_len, "%s needs %lu threads per threadgroup, the device allows %lu",
                         l->kernel, (unsigned long)threads, (unsigned long)ps[i].maxTotalThreadsPerThreadgroup);
                return -1;
            }
            [enc setComputePipelineState:ps[i]];
            bind_slots(enc, slots, scratch, dummy, -1, NULL, 0);
            [enc setBytes:&plan->params length:sizeof(mf_params) atIndex:MF_SLOT_PARAMS];
            [enc dispatchThreadgroups:MTLSizeMake(l->grid[0], l->grid[1], l->grid[2])
                threadsPerThreadgroup:MTLSizeMake(l->threadgroup[0], l->threadgroup[1], l->threadgroup[2])];
            if (i + 1 < plan->n_launches) [enc memoryBarrierWithScope:MTLBarrierScopeBuffers];
        }
        [enc endEncoding];
        [cb commit];
        [cb waitUntilCompleted];
        if (cb.status != MTLCommandBufferStatusCompleted) {
            set_err(err, err_len, [NSString stringWithFormat:@"the Metal command buffer failed (status %ld)",
                                                             (long)cb.status], cb.error);
            return -1;
        }
        return 0;
    }
}
