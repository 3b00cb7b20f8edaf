"""The llama.cpp engine: finding, building and patching it; running, timing and watching its
processes."""
