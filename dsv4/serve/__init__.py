"""`dsv4 serve`: an OpenAI-compatible server with continuous batching and a prefix cache (docs/serve.md).

Modules: scheduler (continuous batching over the engine; also the Python API), prefix (the prefix cache in
memory), store (its files on disk), protocol (request bodies and errors), chat (chat templates), text (output text
and stop strings), app (the FastAPI app and uvicorn). FastAPI, uvicorn and jinja2 come with the `serve` extra and
are imported only here, so the base install stays small."""
