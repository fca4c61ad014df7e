"""dsv4: DeepSeek-V4 inference on any accelerator through one device-agnostic model core and a backend registry."""
from dsv4.errors import DSV4Error

__all__ = ["DSV4Error", "load"]


def load(*args, **kwargs):
    """Open a model: see dsv4.api.load."""
    from dsv4.api import load as _load

    return _load(*args, **kwargs)
