"""The HTTP API every node offers (OpenAI-compatible), its metrics and the status page; the only
user of starlette and hypercorn."""
