"""upcli: feature upsampling, zero-shot super-resolution and pretraining from the command line."""

__version__ = "0.1.0"
