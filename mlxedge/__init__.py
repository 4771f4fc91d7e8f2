"""mlxedge: quantize language models for Apple Silicon and prove every artifact."""

__version__ = "0.1.0"
