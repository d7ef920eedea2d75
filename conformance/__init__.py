"""The PKM conformance toolkit: run every path, compare with golden tensors, benchmark."""

__version__ = "0.1.0"
