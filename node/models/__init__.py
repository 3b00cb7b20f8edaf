"""Model files: the GGUF header and metadata reader, and the embedded default model."""
