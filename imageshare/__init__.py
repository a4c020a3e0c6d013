"""ImageShare: an open image server for cross-enterprise medical image sharing."""

__version__ = "0.1.0"
__all__ = ["__version__"]
