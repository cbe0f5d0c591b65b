"""``flash_attn.layers``, served by mtlflash (only ``rotary`` is provided)."""
