"""tunelab: fine-tune open LLMs on your data, measure them against the base, and ship them."""

__version__ = "0.1.0"

__all__ = ["__version__"]
