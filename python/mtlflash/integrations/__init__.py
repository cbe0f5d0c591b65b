"""Integrations of mtlflash with other libraries.

``mtlflash.integrations.transformers.register()`` adds an ``attn_implementation``
(default name ``"mtl_attention"``) to Hugging Face transformers.
``mtlflash.integrations.diffusers.register()`` makes mtlflash diffusers' ``"flash"`` attention
backend (``model.set_attention_backend("flash")``).
"""

__all__ = ["transformers", "diffusers"]


def __getattr__(name):
    # imported on first use: `import mtlflash.integrations` must not import transformers
    if name in ("transformers", "diffusers"):
        import importlib

        return importlib.import_module(__name__ + ".transformers")
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
