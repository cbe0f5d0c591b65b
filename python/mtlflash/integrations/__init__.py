"""Integrations of mtlflash with other libraries.

``mtlflash.integrations.transformers.register()`` adds an ``attn_implementation``
(default name ``"mtl_attention"``) to Hugging Face transformers.
"""

__all__ = ["transformers"]


def __getattr__(name):
    # imported on first use: `import mtlflash.integrations` must not import transformers
    if name == "transformers":
        import importlib

        return importlib.import_module(__name__ + ".transformers")
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
