"""ecgbridge: a hospital integration engine for explainable ECG AI."""

__version__ = "0.1.0"
__all__ = ["__version__"]
