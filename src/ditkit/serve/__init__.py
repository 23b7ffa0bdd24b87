"""``ditkit serve``: an HTTP API and a web page over checkpoints chosen by the operator
(docs/serve.md). FastAPI and uvicorn are the optional ``serve`` extra; importing this package
needs neither (``ditkit.serve.app`` does)."""
