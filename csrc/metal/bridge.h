/* bridge.h - the plain C ABI of the Metal backend: bridge.m on macOS, bridge_stub.c elsewhere.
 * No Objective-C or Python types cross this boundary; MTLBuffers travel as the integer handle
 * torch exposes (the storage's data pointer of an MPS tensor is the id<MTLBuffer>). */
#ifndef MF_METAL_BRIDGE_H
#define MF_METAL_BRIDGE_H

#include <stddef.h>
#include <stdint.h>

#include "metal/dispatch.h"

/* 1 when a Metal device can be used; otherwise 0 and the reason. */
int mf_metal_available(char *reason, size_t reason_len);

/* Human-readable build facts ("not built", or the device name). */
const char *mf_metal_build_info(void);

/* Capabilities of the device that owns this MTLBuffer handle. 0 on success, else -1 + reason. */
int mf_metal_caps_of(uint64_t mtl_buffer, mf_metal_caps *caps, char *err, size_t err_len);

/* Queue mode: encodes the plan's launches on mtlflash's own command queue for the buffers'
 * device, commits, waits, and checks the command buffer's status. Call without the GIL, after
 * torch.mps.synchronize(), with every tensor referenced until it returns. Slot MF_SLOT_SCRATCH
 * is allocated here when the plan needs scratch; MF_SLOT_PARAMS comes from plan->params.
 * With plan->append present, its launch runs first with app_slots (the append pass's slot layout,
 * mf_params.h; slot 8 = plan->append.params by setBytes), then a buffer barrier, then the
 * attention launches with slots. Returns 0, or -1 with the error text (compile errors, GPU
 * errors) in err. */
int mf_metal_run(const mf_metal_plan *plan, const mf_metal_binding slots[MF_NUM_SLOTS],
                 const mf_metal_binding app_slots[MF_NUM_SLOTS], char *err, size_t err_len);

#endif /* MF_METAL_BRIDGE_H */
