"""Benchmarks: scripts that measure and print figures, each beside a peer where one exists."""
