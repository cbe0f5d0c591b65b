/* Foundation.h - exactly the Foundation subset that csrc/metal/bridge.m uses, declared the way
 * the macOS SDK declares it (names, types, nullability, generics, class vs. instance methods), so
 * that clang --target=arm64-apple-macos13 -fobjc-arc -fsyntax-only -Wall -Wextra -Werror checks
 * the syntax, ARC use and types of bridge changes on Linux (.ci/objc_check.sh).
 *
 * Each declaration cites the Apple documentation page of its class or protocol (the
 * developer.apple.com path) and the member's Objective-C name as the page lists it. A method the
 * bridge starts using must be added here from its page; the check then fails until it is. */
#ifndef MF_DECLS_FOUNDATION_H
#define MF_DECLS_FOUNDATION_H

#include <Availability.h>
#include <dispatch/dispatch.h>
#include <stddef.h>
#include <stdint.h>

#pragma clang assume_nonnull begin

/* https://developer.apple.com/documentation/objectivec/nsinteger
 * https://developer.apple.com/documentation/objectivec/nsuinteger (64-bit on arm64 / x86_64) */
typedef long NSInteger;
typedef unsigned long NSUInteger;
/* https://developer.apple.com/documentation/objectivec/bool (a C bool on arm64) */
typedef _Bool BOOL;
#define YES __objc_yes
#define NO __objc_no
/* https://developer.apple.com/documentation/objectivec/nil */
#define nil ((id)0)

/* NS_ENUM / NS_OPTIONS: enums with a fixed underlying type
 * (https://developer.apple.com/documentation/swift/grouping-related-objective-c-constants) */
#define NS_ENUM_MF(type, name) enum name : type name; enum name : type
#define NS_OPTIONS_MF(type, name) enum __attribute__((flag_enum)) name : type name; enum name : type

/* https://developer.apple.com/documentation/objectivec/nsobjectprotocol */
@protocol NSObject
@end

/* https://developer.apple.com/documentation/foundation/nscopying (dictionary keys must conform) */
@protocol NSCopying
@end

/* https://developer.apple.com/documentation/objectivec/nsobject
 *   "+ new", "+ alloc", "- init" */
__attribute__((objc_root_class))
@interface NSObject <NSObject>
+ (instancetype)new;
+ (instancetype)alloc;
- (instancetype)init;
@end

/* https://developer.apple.com/documentation/foundation/nsstring
 *   "UTF8String" (nullable),
 *   "+ stringWithUTF8String:" (nil for bytes that are not UTF-8), "+ stringWithFormat:" */
@interface NSString : NSObject <NSCopying>
@property(nullable, readonly) const char *UTF8String;
+ (nullable instancetype)stringWithUTF8String:(const char *)nullTerminatedCString;
+ (instancetype)stringWithFormat:(NSString *)format, ... __attribute__((format(__NSString__, 1, 2)));
@end

/* https://developer.apple.com/documentation/foundation/nsmutablestring
 *   "- appendFormat:" */
@interface NSMutableString : NSString
- (void)appendFormat:(NSString *)format, ... __attribute__((format(__NSString__, 1, 2)));
@end

/* https://developer.apple.com/documentation/foundation/nsnumber
 *   "+ numberWithInt:", "+ numberWithUnsignedLongLong:" (what the boxed expressions @(int) and
 *   @(uint64_t) call: https://clang.llvm.org/docs/ObjectiveCLiterals.html) */
@interface NSNumber : NSObject <NSCopying>
+ (NSNumber *)numberWithInt:(int)value;
+ (NSNumber *)numberWithUnsignedLongLong:(unsigned long long)value;
@end

/* https://developer.apple.com/documentation/foundation/nserror
 *   "localizedDescription" */
@interface NSError : NSObject
@property(readonly, copy) NSString *localizedDescription;
@end

/* https://developer.apple.com/documentation/foundation/nsdata
 *   "bytes", "+ dataWithBytes:length:" */
@interface NSData : NSObject
@property(readonly) const void *bytes;
+ (instancetype)dataWithBytes:(nullable const void *)bytes length:(NSUInteger)length;
@end

/* https://developer.apple.com/documentation/foundation/nsarray
 *   "count", "- objectAtIndexedSubscript:" */
@interface NSArray<__covariant ObjectType> : NSObject
@property(readonly) NSUInteger count;
- (ObjectType)objectAtIndexedSubscript:(NSUInteger)idx;
@end

/* https://developer.apple.com/documentation/foundation/nsdictionary
 *   "- objectForKeyedSubscript:" (nil for an absent key), "+ dictionary" */
@interface NSDictionary<__covariant KeyType, __covariant ObjectType> : NSObject
- (nullable ObjectType)objectForKeyedSubscript:(KeyType)key;
+ (instancetype)dictionary;
@end

/* https://developer.apple.com/documentation/foundation/nsmutabledictionary
 *   "- setObject:forKeyedSubscript:" (a nil object removes the key; the key is copied) */
@interface NSMutableDictionary<KeyType, ObjectType> : NSDictionary<KeyType, ObjectType>
- (void)setObject:(nullable ObjectType)obj forKeyedSubscript:(KeyType<NSCopying>)key;
@end

#pragma clang assume_nonnull end

#endif
