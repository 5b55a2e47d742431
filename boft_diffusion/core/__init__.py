"""The core: butterfly math, adapter layers, injection and lifecycle, files, configuration."""

#: Written into every adapter file and checkpoint.
__version__ = "0.1.0"
