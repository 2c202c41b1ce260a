"""`longctx serve`: an OpenAI-compatible HTTP server over the engine.

app.py holds the routes (FastAPI, from the `serve` extra), protocol.py the API's request and
response shapes, engine_loop.py the thread that owns the engine, metrics.py the Prometheus
exposition. Import the module you need: importing this package pulls in no web framework.
"""

DEFAULT_MAX_REQUEST_BYTES = 32 << 20
