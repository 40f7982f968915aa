"""transferkit: a folder of images in, a good exported image classifier out."""

__version__ = "0.1.0"
