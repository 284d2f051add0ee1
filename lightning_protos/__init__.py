"""lightning-protos: deep clustering and prototype discovery as PyTorch Lightning modules."""

__version__ = "0.1.0"
