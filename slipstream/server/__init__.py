"""The OpenAI-compatible HTTP embedding server (``slipstream serve``).

Modules:

- ``cli``: the ``serve`` command's flags; imports the web stack only inside ``run``.
- ``settings``: the frozen ``ServerSettings``.
- ``async_engine``: ``AsyncEngine``, the one scheduler loop that owns the model and packs
  queued inputs of all requests into forwards.
- ``protocol``: pydantic request and response models (the OpenAPI schema).
- ``errors``: ``APIError`` and the single mapping from exceptions to status codes.
- ``metrics``: Prometheus metrics, one registry per app.
- ``app``: ``create_app`` (FastAPI routes, middleware) and ``SlipstreamServer`` (uvicorn
  with draining on SIGTERM / SIGINT).
- ``testing``: ``LiveServer``, a real server on loopback in a background thread.

Nothing here is imported by ``import slipstream``: fastapi and uvicorn are optional.
"""

from __future__ import annotations
