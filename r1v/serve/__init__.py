"""Serving r1v models over HTTP: an OpenAI-compatible chat completions server (`r1v.serve.openai_server`)."""
