"""RadJEPA: an I-JEPA chest X-ray encoder library (pure Python + torch; no Ray, no HTTP).

Layers above this one (``pipelines`` for Ray jobs, ``serve`` for the HTTP API) call into it;
nothing here imports them, so every piece runs in a plain Python loop and is unit-tested so.
"""

__version__ = "0.1.0"
