"""The operations console: an HTTP API (OpenAPI at /api/docs), server-rendered pages and /metrics.

Part of the gateway (inbound room): it reads the store and enqueues ids like the
listeners do and never loads a model runtime; heatmaps come from what the workers stored.
"""
