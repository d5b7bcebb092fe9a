"""The HTTP API: a FastAPI app factory and the Ray Serve deployment that hosts it."""
