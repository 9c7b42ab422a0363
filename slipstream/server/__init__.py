"""The OpenAI-compatible HTTP server for embeddings and text generation (``slipstream serve``).

Modules:

- ``cli``: the ``serve`` command's flags; imports the web stack only inside ``run``.
- ``settings``: the frozen ``ServerSettings``.
- ``async_engine``: ``AsyncEngine``: packs queued embedding inputs of all requests into
  forwards, and feeds generation requests to the ``GenerationEngine`` (token deltas come
  back as ``GenerationStream``s).
- ``worker``: ``ModelWorker``, the one thread that owns the model: it alternates embedding
  forwards and generation steps.
- ``completions``: ``POST /v1/completions`` and ``POST /v1/chat/completions`` (validation,
  server-sent events).
- ``chat``: the model's Jinja chat template, rendered as transformers does.
- ``protocol``: pydantic request and response models (the OpenAPI schema).
- ``errors``: ``APIError`` and the single mapping from exceptions to status codes.
- ``metrics``: Prometheus metrics, one registry per app.
- ``app``: ``create_app`` (FastAPI routes, middleware) and ``SlipstreamServer`` (uvicorn
  with draining on SIGTERM / SIGINT).
- ``testing``: ``LiveServer``, a real server on loopback in a background thread.

Nothing here is imported by ``import slipstream``: fastapi and uvicorn are optional.
"""

from __future__ import annotations
