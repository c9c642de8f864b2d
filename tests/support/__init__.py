"""Shared helpers for the ecgbridge test suite (not part of the shipped package)."""
