"""Serving r1v models over HTTP: `r1v serve` (`r1v.serve.app`: an OpenAI-compatible chat API on Ray Serve, behind
r1v's front, `r1v.serve.front`)."""
