"""Reading images (``images.py``) and the feature store (``store.py``)."""

from .images import IMAGE_EXTENSIONS, ImageRef, image_size, load_rgb, resize_rgb, scan_images, target_size
from .store import FeatureStore

__all__ = [
    "IMAGE_EXTENSIONS",
    "FeatureStore",
    "ImageRef",
    "image_size",
    "load_rgb",
    "resize_rgb",
    "scan_images",
    "target_size",
]
