/* Metal.h - exactly the Metal subset that csrc/metal/bridge.m uses, declared the way the macOS
 * SDK declares it (protocols, types, enum values, nullability, availability); see
 * Foundation/Foundation.h for how these headers are used and kept. Each declaration cites the
 * documentation page of its protocol, class or type (developer.apple.com path) and the member's
 * Objective-C name as that page lists it. */
#ifndef MF_DECLS_METAL_H
#define MF_DECLS_METAL_H

#include <Foundation/Foundation.h>

#pragma clang assume_nonnull begin

/* https://developer.apple.com/documentation/metal/mtlsize: "MTLSize", "MTLSizeMake" */
typedef struct {
    NSUInteger width, height, depth;
} MTLSize;
static inline MTLSize MTLSizeMake(NSUInteger width, NSUInteger height, NSUInteger depth) {
    MTLSize s = {width, height, depth};
    return s;
}

/* https://developer.apple.com/documentation/metal/mtlgpufamily: "MTLGPUFamilyApple1" = 1001 ...
 * "MTLGPUFamilyApple9" = 1009 (bridge.m passes raw values 1001...1010) */
typedef NS_ENUM_MF(NSInteger, MTLGPUFamily){MTLGPUFamilyApple7 = 1007, MTLGPUFamilyApple8 = 1008,
                                           MTLGPUFamilyApple9 = 1009};

/* https://developer.apple.com/documentation/metal/mtlresourceoptions:
 * "MTLResourceStorageModePrivate" = MTLStorageModePrivate (2) << 4 */
typedef NS_OPTIONS_MF(NSUInteger, MTLResourceOptions){MTLResourceStorageModeShared = 0 << 4,
                                                     MTLResourceStorageModePrivate = 2 << 4};

/* https://developer.apple.com/documentation/metal/mtlbarrierscope: "MTLBarrierScopeBuffers" */
typedef NS_OPTIONS_MF(NSUInteger, MTLBarrierScope){MTLBarrierScopeBuffers = 1 << 0};

/* https://developer.apple.com/documentation/metal/mtlcommandbufferstatus */
typedef NS_ENUM_MF(NSUInteger, MTLCommandBufferStatus){
    MTLCommandBufferStatusNotEnqueued = 0, MTLCommandBufferStatusEnqueued = 1,
    MTLCommandBufferStatusCommitted = 2,   MTLCommandBufferStatusScheduled = 3,
    MTLCommandBufferStatusCompleted = 4,   MTLCommandBufferStatusError = 5};

/* https://developer.apple.com/documentation/metal/mtllanguageversion: (major << 16) + minor,
 * e.g. "MTLLanguageVersion3_0" = 0x30000 (bridge.m passes raw values) */
typedef NS_ENUM_MF(NSUInteger, MTLLanguageVersion){MTLLanguageVersion3_0 MF_API_AVAILABLE(13.0) = (3 << 16)};

#if MF_DECLS_SDK >= 150000
/* https://developer.apple.com/documentation/metal/mtlmathmode (macOS 15): "MTLMathModeSafe" */
typedef NS_ENUM_MF(NSInteger, MTLMathMode){MTLMathModeSafe = 0, MTLMathModeRelaxed = 1,
                                          MTLMathModeFast = 2} MF_API_AVAILABLE(15.0);
/* https://developer.apple.com/documentation/metal/mtlmathfloatingpointfunctions (macOS 15) */
typedef NS_ENUM_MF(NSInteger, MTLMathFloatingPointFunctions){
    MTLMathFloatingPointFunctionsFast = 0, MTLMathFloatingPointFunctionsPrecise = 1} MF_API_AVAILABLE(15.0);
#endif

/* https://developer.apple.com/documentation/metal/mtlcompileoptions:
 * "preprocessorMacros", "fastMathEnabled" (deprecated in macOS 15 for mathMode), "languageVersion",
 * "mathMode" and "mathFloatingPointFunctions" (macOS 15) */
@interface MTLCompileOptions : NSObject
@property(nullable, readwrite, copy) NSDictionary<NSString *, NSObject *> *preprocessorMacros;
#if MF_DECLS_SDK >= 150000
@property(readwrite, nonatomic) BOOL fastMathEnabled MF_API_DEPRECATED(10.11, 15.0);
@property(readwrite, nonatomic) MTLMathMode mathMode MF_API_AVAILABLE(15.0);
@property(readwrite, nonatomic) MTLMathFloatingPointFunctions mathFloatingPointFunctions MF_API_AVAILABLE(15.0);
#else
@property(readwrite, nonatomic) BOOL fastMathEnabled;
#endif
@property(readwrite, nonatomic) MTLLanguageVersion languageVersion;
@end

@protocol MTLDevice;

/* https://developer.apple.com/documentation/metal/mtlfunction */
@protocol MTLFunction <NSObject>
@end

/* https://developer.apple.com/documentation/metal/mtllibrary: "- newFunctionWithName:" */
@protocol MTLLibrary <NSObject>
- (nullable id<MTLFunction>)newFunctionWithName:(NSString *)functionName;
@end

/* https://developer.apple.com/documentation/metal/mtlresource: "device" (bridge.m reads it from a buffer) */
@protocol MTLResource <NSObject>
@property(readonly) id<MTLDevice> device;
@end

/* https://developer.apple.com/documentation/metal/mtlbuffer */
@protocol MTLBuffer <MTLResource>
@end

/* https://developer.apple.com/documentation/metal/mtlcomputepipelinestate:
 * "maxTotalThreadsPerThreadgroup", "threadExecutionWidth" */
@protocol MTLComputePipelineState <NSObject>
@property(readonly) NSUInteger maxTotalThreadsPerThreadgroup;
@property(readonly) NSUInteger threadExecutionWidth;
@end

/* https://developer.apple.com/documentation/metal/mtlcommandencoder: "- endEncoding" */
@protocol MTLCommandEncoder <NSObject>
- (void)endEncoding;
@end

/* https://developer.apple.com/documentation/metal/mtlcomputecommandencoder:
 * "- setComputePipelineState:", "- setBuffer:offset:atIndex:", "- setBytes:length:atIndex:",
 * "- dispatchThreadgroups:threadsPerThreadgroup:", "- memoryBarrierWithScope:" */
@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
- (void)setComputePipelineState:(id<MTLComputePipelineState>)state;
- (void)setBuffer:(nullable id<MTLBuffer>)buffer offset:(NSUInteger)offset atIndex:(NSUInteger)index;
- (void)setBytes:(const void *)bytes length:(NSUInteger)length atIndex:(NSUInteger)index;
- (void)dispatchThreadgroups:(MTLSize)threadgroupsPerGrid threadsPerThreadgroup:(MTLSize)threadsPerThreadgroup;
- (void)memoryBarrierWithScope:(MTLBarrierScope)scope;
@end

/* https://developer.apple.com/documentation/metal/mtlcommandbuffer: "status", "error",
 * "- computeCommandEncoder", "- commit", "- waitUntilCompleted" */
@protocol MTLCommandBuffer <NSObject>
@property(readonly) MTLCommandBufferStatus status;
@property(nullable, readonly) NSError *error;
- (nullable id<MTLComputeCommandEncoder>)computeCommandEncoder;
- (void)commit;
- (void)waitUntilCompleted;
@end

/* https://developer.apple.com/documentation/metal/mtlcommandqueue: "- commandBuffer" */
@protocol MTLCommandQueue <NSObject>
- (nullable id<MTLCommandBuffer>)commandBuffer;
@end

/* https://developer.apple.com/documentation/metal/mtldevice: "name", "registryID",
 * "- supportsFamily:", "- newCommandQueue", "- newBufferWithLength:options:",
 * "- newLibraryWithSource:options:error:", "- newComputePipelineStateWithFunction:error:" */
@protocol MTLDevice <NSObject>
@property(readonly) NSString *name;
@property(readonly) uint64_t registryID;
- (BOOL)supportsFamily:(MTLGPUFamily)gpuFamily;
- (nullable id<MTLCommandQueue>)newCommandQueue;
- (nullable id<MTLBuffer>)newBufferWithLength:(NSUInteger)length options:(MTLResourceOptions)options;
- (nullable id<MTLLibrary>)newLibraryWithSource:(NSString *)source
                                        options:(nullable MTLCompileOptions *)options
                                          error:(__autoreleasing NSError *_Nullable *_Nullable)error;
- (nullable id<MTLComputePipelineState>)newComputePipelineStateWithFunction:(id<MTLFunction>)computeFunction
                                                                      error:(__autoreleasing NSError *_Nullable *_Nullable)error;
@end

/* https://developer.apple.com/documentation/metal/mtlcreatesystemdefaultdevice() */
extern id<MTLDevice> _Nullable MTLCreateSystemDefaultDevice(void) __attribute__((ns_returns_retained));
/* https://developer.apple.com/documentation/metal/mtlcopyalldevices() (macOS only) */
extern NSArray<id<MTLDevice>> *MTLCopyAllDevices(void) __attribute__((ns_returns_retained));

#pragma clang assume_nonnull end

#endif
