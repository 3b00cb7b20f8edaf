"""Weights for workers: the native hash that names cache entries, warm loading, and sharing
between peers."""
