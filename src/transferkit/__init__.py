"""transferkit: a folder of images in, a good exported image classifier out.

Attributes are imported lazily so that the torch-free deployment path (`transferkit.onnx_predict`)
can import this package without importing torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "train": "api", "load": "api", "resume": "api", "Classifier": "api",
    "TrainConfig": "config", "TransferkitError": "errors",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'transferkit' has no attribute {name!r}")


def __dir__():
    # The lazy attributes too: dir(transferkit) and tab completion list the API without importing torch.
    return sorted({*globals(), *_LAZY})
