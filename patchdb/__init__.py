"""patchdb: analytic patch-mosaic score machines and the convolutional diffusion models they explain."""

__version__ = "0.1.0"
