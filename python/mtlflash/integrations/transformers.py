"""Hugging Face transformers integration: ``attn_implementation="mtl_attention"``.

transformers dispatches its own ``flash_attention_2`` only on CUDA-like devices, so the
flash_attn shim alone does not reach it. Instead::

    import mtlflash.integrations.transformers as mtf
    mtf.register()                       # once per process
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="mtl_attention")
    # or, on a loaded model: model.set_attn_implementation("mtl_attention")

:func:`register` adds :func:`attention_forward` to transformers' ``AttentionInterface``
and, under the same name, transformers' SDPA mask builder to ``AttentionMaskInterface``
(so padding masks are built exactly as for ``attn_implementation="sdpa"``).

What runs on mtlflash (everything else runs transformers' own ``sdpa`` attention function,
so results never depend on what mtlflash supports):

* no mask (causal or not); a causal call with more keys than queries and no mask (static
  cache prefill) drops the trailing keys exactly as transformers' sdpa path does;
* a boolean 4-D mask (B, 1, Lq, Lk) that is, per batch row, "a contiguous block of real
  keys" combined with a causal limit ``key <= query + c`` (left or right padding, prefill
  and decoding with a KV cache). It is verified element by element; anything else (packed
  sequences, custom masks, float masks, sliding-window masks) goes to sdpa. Query rows that
  see no key give 0, as torch's SDPA does;
* softcap (mtlflash supports it; transformers' sdpa does not, so a softcap call that
  mtlflash cannot serve raises ValueError);
* training too: inputs that need grad are differentiable through mtlflash's backward, and
  attention dropout (``attention_dropout`` > 0 in training mode) runs as mtlflash's dropout;
  position_bias and paged caches go to sdpa.
"""

from __future__ import annotations

from .. import trace

__all__ = ["register", "unregister", "attention_forward", "DEFAULT_NAME"]

# transformers treats every attn_implementation whose name contains "flash" as a flash
# attention kernel to load from its kernel hub, so the name avoids that word
DEFAULT_NAME = "mtl_attention"


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _sdpa_mask():
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask


def register(name: str = DEFAULT_NAME) -> str:
    """Register ``attention_forward`` with transformers under ``name``; returns ``name``.

    Afterwards ``attn_implementation=name`` works in ``from_pretrained``, ``from_config``
    and ``model.set_attn_implementation``. The name must not contain "flash": transformers
    would then look for a flash attention kernel of that name instead.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("register: name must be a non-empty string, got %r" % (name,))
    if "flash" in name:
        raise ValueError(
            "register: name %r contains 'flash'; transformers treats such attn_implementation "
            "names as flash attention kernels to fetch, so pick another (default %r)"
            % (name, DEFAULT_NAME)
        )
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older layouts
        from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, _sdpa_mask())
    return name


def unregister(name: str = DEFAULT_NAME) -> None:
    """Remove ``name`` from transformers' global attention and mask registries."""
    from transformers import AttentionInterface

    try:
        from transformers import AttentionMaskInterface
    except ImportError:
        from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


def _record(query, key, causal, tier):
    try:
        trace.record(
            "transformers",
            str(query.dtype).replace("torch.", ""),
            query.shape[-1],
            query.shape[-2],
            key.shape[-2],
            bool(causal),
            tier,
        )
    except Exception:
        pass


def _mask_plan(mask, bsz, lq, lk):
    """Decompose a (B, 1, Lq, Lk) bool mask, or return None if it has another shape.

    Returns (starts, ends, rights) as Python lists: batch row b attends to the real keys
    [starts[b], ends[b]) and query i sees key j iff ``j <= i + c_b``, expressed as the
    flash_attn window right edge ``rights[b]`` relative to the compacted keys (-1: no limit).
    """
    import torch

    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return None
    if mask.shape[0] != bsz or mask.shape[2] != lq or mask.shape[3] != lk:
        return None
    m = mask[:, 0]
    dev = m.device
    ar_k = torch.arange(lk, device=dev)
    ar_q = torch.arange(lq, device=dev)
    keys = m.any(dim=1)  # (B, Lk): keys that some query sees
    nkeys = keys.sum(dim=-1)
    starts = torch.where(nkeys > 0, keys.to(torch.uint8).argmax(dim=-1), torch.zeros_like(nkeys))
    ends = starts + nkeys
    # contiguous block of real keys
    block = (ar_k[None, :] >= starts[:, None]) & (ar_k[None, :] < ends[:, None])
    if not torch.equal(block, keys):
        return None
    # causal limit: last key each row sees, where it is below the block's end
    hi = torch.where(m, ar_k[None, None, :], torch.full_like(ar_k, -1)[None, None, :]).amax(dim=-1)
    limited = (hi >= starts[:, None]) & (hi < ends[:, None] - 1)  # (B, Lq)
    big = lk + lq + 1
    cand = torch.where(limited, hi - ar_q[None, :], torch.full_like(hi, big))
    c = cand.amin(dim=-1)  # (B,)
    # no partially visible row, but some rows see nothing: the limit sits just below the
    # first row that sees the whole block
    rows_seeing = m.any(dim=-1)  # (B, Lq)
    first_row = rows_seeing.to(torch.uint8).argmax(dim=-1)
    some_blind = (~rows_seeing).any(dim=-1) & (nkeys > 0)
    c = torch.where((c >= big) & some_blind, ends - 1 - first_row, c)
    expected = keys[:, None, :] & (ar_k[None, None, :] <= ar_q[None, :, None] + c[:, None, None])
    if not torch.equal(expected, m):
        return None
    starts_l = starts.tolist()
    ends_l = ends.tolist()
    rights = []
    for s, e, cb in zip(starts_l, ends_l, c.tolist()):
        if cb >= big:
            rights.append(-1)  # every row sees the whole block
            continue
        # compacted keys j' = j - s, Sk = e - s, Sq = lq; flash_attn's window edge is
        # j' <= i + Sk - Sq + right, and j <= i + c means right = c - e + lq
        right = cb - e + lq
        if right < 0:
            return None  # not expressible as a flash_attn window
        rights.append(right)
    return starts_l, ends_l, rights


def _run_masked(query, key, value, plan, scaling, softcap, dropout=0.0):
    """Run attention per group of batch rows sharing a window right edge (varlen)."""
    import torch
    import mtlflash

    starts, ends, rights = plan
    bsz, hq, lq, _ = query.shape
    dv = value.shape[-1]
    q = query.transpose(1, 2)  # (B, Lq, Hq, D) views
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    out = torch.empty((bsz, lq, hq, dv), dtype=query.dtype, device=query.device)
    groups = {}
    for b, r in enumerate(rights):
        groups.setdefault(r, []).append(b)
    for right, rows in groups.items():
        idx = torch.tensor(rows, device=query.device, dtype=torch.long)
        qg = q.index_select(0, idx).reshape(len(rows) * lq, hq, q.shape[-1])
        kg = torch.cat([k[b, starts[b] : ends[b]] for b in rows], dim=0)
        vg = torch.cat([v[b, starts[b] : ends[b]] for b in rows], dim=0)
        cu_q = torch.arange(0, (len(rows) + 1) * lq, lq, dtype=torch.int32, device=query.device)
        lens_k = [ends[b] - starts[b] for b in rows]
        cu_k = torch.tensor([0] + lens_k, dtype=torch.int32, device=query.device).cumsum(0).to(torch.int32)
        if right == 0:
            causal, window = True, (-1, -1)
        else:
            causal, window = False, (-1, right)
        og = mtlflash.flash_attn_varlen_func(
            qg,
            kg,
            vg,
            cu_q,
            cu_k,
            lq,
            max(lens_k) if lens_k else 0,
            softmax_scale=scaling,
            causal=causal,
            window_size=window,
            softcap=softcap,
            dropout_p=dropout,
        )
        out.index_copy_(0, idx, og.reshape(len(rows), lq, hq, dv))
    return out


def _reason(module, query, key, value, attention_mask, dropout, kwargs):
    import torch

    T = torch.Tensor
    if type(query) is not T or type(key) is not T or type(value) is not T:
        return "subclass"
    if not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        return "dropout"
    if kwargs.get("position_bias") is not None:
        return "position_bias"
    if kwargs.get("cache") is not None:
        return "paged_cache"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "rank"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return "dtype"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtype"
    if query.shape[1] % key.shape[1] != 0:
        return "heads"
    if query.shape[-1] > 256 or value.shape[-1] > 256:
        return "head_dim"
    if query.shape[2] == 0 or key.shape[2] == 0:
        return "empty"
    if attention_mask is not None and not isinstance(attention_mask, T):
        return "mask_type"
    return None


def attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    is_causal=None,
    **kwargs,
):
    """transformers attention function: q (B, Hq, Lq, D), k/v (B, Hk, Lk, D|Dv).

    Returns ``(attn_output (B, Lq, Hq, Dv) contiguous, None)`` like transformers' sdpa.
    """
    softcap = kwargs.get("softcap")
    sliding_window = kwargs.get("sliding_window")
    reason = _reason(module, query, key, value, attention_mask, dropout, kwargs)
    causal_flag = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = None
    if reason is None:
        try:
            out, reason = _forward_mtlflash(
                query, key, value, attention_mask, scaling, causal_flag, softcap, sliding_window, dropout
            )
        except Exception as exc:
            out, reason = None, "fallback:" + type(exc).__name__
    if out is not None:
        return out, None
    if trace.ENABLED:
        _record(query, key, causal_flag, reason if reason.startswith("fallback:") else "stock:" + reason)
    if softcap is not None and softcap != 0:
        raise ValueError(
            "mtlflash attention could not serve this softcap call (%s) and transformers' sdpa "
            "does not support softcap; use attn_implementation='eager'" % reason
        )
    kwargs.pop("softcap", None)
    return _sdpa_forward()(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _forward_mtlflash(query, key, value, attention_mask, scaling, causal_flag, softcap, sliding_window, dropout=0.0):
    """(output, None) when mtlflash served the call, else (None, reason)."""
    import mtlflash

    lq, lk = query.shape[2], key.shape[2]
    softcap = float(softcap) if softcap else 0.0
    if attention_mask is None:
        if sliding_window is not None and lk >= sliding_window:
            return None, "sliding_window"
        causal = bool(causal_flag) and lq > 1
        if causal and lk > lq:
            # transformers' sdpa path keeps only the first Lq keys here (static cache
            # prefill with top-left causal); do the same so both agree exactly
            key = key[:, :, :lq]
            value = value[:, :, :lq]
            lk = lq
        if causal and lk < lq:
            return None, "causal_lq_gt_lk"
        out = mtlflash.flash_attn_func(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            softmax_scale=scaling,
            causal=causal,
            softcap=softcap,
            dropout_p=float(dropout),
        )
        return out.contiguous(), None
    plan = _mask_plan(attention_mask, query.shape[0], lq, lk)
    if plan is None:
        return None, "mask"
    out = _run_masked(query, key, value, plan, scaling, softcap, float(dropout))
    return out, None
