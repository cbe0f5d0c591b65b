/* dispatch_once, as bridge.m uses it.
 * https://developer.apple.com/documentation/dispatch/dispatch_once_t
 * https://developer.apple.com/documentation/dispatch/1447169-dispatch_once */
#ifndef MF_DECLS_DISPATCH_H
#define MF_DECLS_DISPATCH_H
typedef long dispatch_once_t;
typedef void (^dispatch_block_t)(void);
void dispatch_once(dispatch_once_t *predicate, dispatch_block_t block);
#endif
