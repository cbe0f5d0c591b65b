/* Availability.h - the SDK version macros bridge.m tests (subset of the macOS SDK's
 * <Availability.h>, https://developer.apple.com/documentation/kernel/availability_h ... see
 * "Marking API availability in Objective-C",
 * https://developer.apple.com/documentation/swift/marking-api-availability-in-objective-c).
 * MF_DECLS_SDK selects the SDK these declarations stand for: 140000 (macOS 14, the default) or
 * 150000 (macOS 15, which adds MTLCompileOptions.mathMode). */
#ifndef MF_DECLS_AVAILABILITY_H
#define MF_DECLS_AVAILABILITY_H
#ifndef MF_DECLS_SDK
#define MF_DECLS_SDK 140000
#endif
#define __MAC_13_0 130000
#define __MAC_14_0 140000
#if MF_DECLS_SDK >= 150000
#define __MAC_15_0 150000
#endif
#define __MAC_OS_X_VERSION_MAX_ALLOWED MF_DECLS_SDK
#define MF_API_AVAILABLE(v) __attribute__((availability(macos, introduced = v)))
#define MF_API_DEPRECATED(a, d) __attribute__((availability(macos, introduced = a, deprecated = d)))
#endif
