"""upcli: feature upsampling, zero-shot super-resolution and pretraining from the command line."""

__version__ = "0.1.0"


def features(image, *args, **kwargs):
    """The features of one image at its resolution, in one call (what ``upcli upsample`` stores for it):
    ``upcli.features("cat.jpg", backbone="dinov2", weights=..., upsampler="jbu", size=448)``. Arguments and
    defaults: :func:`upcli.api.features`."""
    from .api import features as _features

    return _features(image, *args, **kwargs)
