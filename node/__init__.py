"""The node: configuration, the llama.cpp engine, process supervision, the HTTP API, the CLI."""
