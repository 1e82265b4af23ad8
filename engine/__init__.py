"""Streaming extraction engine: sources, models, batching, pipeline, store and writer."""
