"""Shared core: model loading, text data, module walking, errors."""
