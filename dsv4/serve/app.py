"""The HTTP server: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as server-sent events
or not) and /health, on FastAPI + uvicorn, over one Scheduler.

Every bad request gets an OpenAI-style JSON error with a 4xx status and touches nothing else; a client that goes
away (mid-stream or while waiting for a whole answer) has its request cancelled, which frees its slot and blocks at
the scheduler's next step."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dsv4.api import Pipeline, prompt_tokens
from dsv4.engine import Request, prompt_key
from dsv4.errors import DSV4Error
from dsv4.serve.chat import ChatTemplate
from dsv4.serve.protocol import APIError, ChatRequest, Common, CompletionRequest, parse
from dsv4.serve.scheduler import Event, Failed, Finished, QueueFull, Scheduler, Token
from dsv4.serve.text import TextStream

DISCONNECT_POLL_SECONDS = 0.25   # how often a non-streaming request checks that its client is still there


@dataclass
class Service:
    name: str                          # the model id clients name
    pipe: Pipeline
    scheduler: Scheduler
    template: ChatTemplate | None


@dataclass
class Outcome:
    """A request's token counts, for `usage`."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def create_app(service: Service, on_start: Callable[[], None] = lambda: None) -> FastAPI:
    """The app; its lifespan starts the scheduler (then calls `on_start`) and closes it at shutdown."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        service.scheduler.start()
        on_start()
        yield
        service.scheduler.close()

    app = FastAPI(title="dsv4", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, **service.scheduler.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list",
                "data": [{"id": service.name, "object": "model", "created": created, "owned_by": "dsv4"}]}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = parse(await http.body(), CompletionRequest)
        _served(service, body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request is supported, got a list of "
                                    f"{len(prompt)}", "prompt")
            prompt = prompt[0]
        ids = _checked(lambda: prompt_tokens(prompt, service.pipe.tokenizer, service.pipe.config), "prompt")
        return await _respond(service, http, body, ids, body.max_tokens, body.logprobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        body = parse(await http.body(), ChatRequest)
        _served(service, body)
        if service.template is None:
            raise APIError(400, f"model {service.name!r} has no chat template (its tokenizer_config.json has no "
                                "chat_template); use /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in body.messages]
        text = _checked(lambda: service.template.render(messages), "messages")
        ids = _checked(lambda: prompt_tokens(text, service.pipe.tokenizer, service.pipe.config), "messages")
        top = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if limit is None:
            limit = service.pipe.config.max_seq_len - len(ids)
        return await _respond(service, http, body, ids, limit, top, chat=True)

    return app


def _served(service: Service, body: Common) -> None:
    if body.model != service.name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {service.name!r}",
                       "model", code="model_not_found")


def _checked(fn: Callable[[], Any], param: str) -> Any:
    try:
        return fn()
    except DSV4Error as e:
        raise APIError(400, str(e), param) from None


async def _respond(service: Service, http: HTTPRequest, body: Common, ids: list[int], max_tokens: int | None,
                   top_logprobs: int | None, chat: bool):
    context = service.pipe.config.max_seq_len
    if len(ids) >= context:
        raise APIError(400, f"the prompt is {len(ids)} tokens; the context is {context}, so at most {context - 1} "
                            f"leave room for a new token", "prompt")
    if max_tokens is None or max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    stop = body.stop_strings()
    request = Request(ids, max_tokens, body.temperature, body.top_p, prompt_key([body.seed or 0] + ids))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    try:
        ticket = service.scheduler.submit(request, lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
                                          top_logprobs)
    except QueueFull as e:
        raise APIError(429, str(e), kind="rate_limit_exceeded") from None
    except DSV4Error as e:
        raise APIError(400, str(e), "max_tokens") from None
    reply = Reply(service, chat, body.model, top_logprobs is not None)
    pieces = _pieces(service, events, ticket, TextStream(service.pipe.tokenizer, stop), reply)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_sse(pieces, reply, usage, ticket), media_type="text/event-stream")
    return JSONResponse(await _whole(pieces, reply, http, ticket))


class Reply:
    """Builds the OpenAI response objects of one request, whole or as stream chunks."""

    def __init__(self, service: Service, chat: bool, model: str, logprobs: bool):
        self.service, self.chat, self.model, self.logprobs = service, chat, model, logprobs
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.outcome = Outcome()

    def token_entries(self, tokens: list[tuple[Token, int]]) -> Any:
        """The logprobs object for these (token, text offset) pairs, in the endpoint's format."""
        if not self.logprobs:
            return None
        decode = self.service.pipe.tokenizer.decode
        if self.chat:
            def entry(token: int, logprob: float) -> dict[str, Any]:
                text = decode([token])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
            return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(i, p) for i, p in t.top]}
                                for t, _ in tokens]}
        return {"tokens": [decode([t.token]) for t, _ in tokens], "token_logprobs": [t.logprob for t, _ in tokens],
                "top_logprobs": [{decode([i]): p for i, p in t.top} for t, _ in tokens],
                "text_offset": [offset for _, offset in tokens]}

    def choice(self, text: str, tokens: list[tuple[Token, int]], finish: str | None, stream: bool,
               first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": self.token_entries(tokens), "finish_reason": finish}
        if not self.chat:
            choice["text"] = text
        elif stream:
            choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def envelope(self, choices: list[dict[str, Any]], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if stream and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}


async def _pieces(service: Service, events: asyncio.Queue, ticket, text: TextStream,
                  reply: Reply) -> AsyncIterator[tuple[str, list[tuple[Token, int]], str | None]]:
    """(new text, its tokens with their offsets in the text, finish reason or None) as the request runs; the last
    piece has the reason."""
    outcome = reply.outcome
    finish = None
    while True:
        event = await events.get()
        if isinstance(event, Failed):
            raise APIError(500, event.message, kind="server_error")
        if isinstance(event, Finished):
            outcome.prompt_tokens, outcome.cached_tokens = event.prompt_tokens, event.cached_tokens
            if finish is None:
                finish = event.reason
                outcome.completion_tokens = event.completion_tokens
                yield text.finish(), [], finish
            return
        if finish is not None:
            continue                  # tokens the scheduler made before it saw the cancel after a stop string
        outcome.completion_tokens += 1
        token = (event, len(text.text))
        piece = text.push(event.token)
        if text.stopped:
            finish = "stop"
            ticket.cancel()
            yield piece + text.finish(), [token], None
            yield "", [], finish
            continue
        yield piece, [token], None


async def _whole(pieces, reply: Reply, http: HTTPRequest, ticket) -> dict[str, Any]:
    """The whole response, cancelling the request if the client goes away meanwhile."""
    async def collect():
        parts, tokens, finish = [], [], None
        async for piece, toks, reason in pieces:
            parts.append(piece)
            tokens += toks
            finish = reason or finish
        return "".join(parts), tokens, finish

    task = asyncio.ensure_future(collect())
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            break
        if await http.is_disconnected():
            ticket.cancel()
            task.cancel()
            raise APIError(499, "the client closed the connection")
    text, tokens, finish = task.result()
    body = reply.envelope([reply.choice(text, tokens, finish, stream=False)], stream=False)
    return body | {"usage": reply.outcome.usage()}


async def _sse(pieces, reply: Reply, include_usage: bool, ticket) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, then (if asked) the usage, then [DONE]. A client that
    disconnects cancels the generator here, and with it the request."""
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data)}\n\n"
    try:
        first = True
        async for piece, tokens, finish in pieces:
            if piece or tokens or finish or (first and reply.chat):
                chunk = reply.envelope([reply.choice(piece, tokens, finish, stream=True, first=first)], stream=True)
                yield event(chunk | ({"usage": None} if include_usage else {}))
                first = False
        if include_usage:
            yield event(reply.envelope([], stream=True) | {"usage": reply.outcome.usage()})
        yield "data: [DONE]\n\n"
    except APIError as e:
        yield event(e.body())
    finally:
        ticket.cancel()


def load_service(model: str | None, preset: str | None, device: str, determinism: str,
                 overrides: dict[str, str] | None, verify: bool | None, max_batch: int | None, max_queue: int,
                 kv_cache_memory: int | None, prefix_cache_dir: str | None, prefix_cache_size: int,
                 prefix_cache: bool, speculate: int, warn: Callable[[str], None]) -> Service:
    """Open the model and build its scheduler, prefix cache and chat template."""
    from dsv4.api import checkpoint_path, load
    from dsv4.manifest import MANIFEST_FILE
    from dsv4.serve.chat import load_template
    from dsv4.serve.prefix import model_key
    from dsv4.serve.scheduler import cache_blocks_for_memory
    from dsv4.serve.store import PrefixStore

    pipe = load(model, preset, device=device, determinism=determinism, overrides=overrides, verify=verify,
                notice=warn)
    path = checkpoint_path(model, preset)
    store = None
    if prefix_cache and prefix_cache_dir is not None:
        manifest = path / MANIFEST_FILE
        if manifest.is_file():
            ops = pipe.model.ops
            exact = ops.level.label == "exact"
            key = model_key(manifest.read_bytes(), dataclasses.asdict(pipe.config), ops.level.label,
                            None if exact else ops.describe() | {"device": pipe.device.type})
            store = PrefixStore(Path(prefix_cache_dir), key, prefix_cache_size, warn)
        else:
            warn(f"{path} has no {MANIFEST_FILE} to key prefix-cache files by its weights (`dsv4 checkpoint "
                 f"manifest {path}` writes one); prefixes are kept in memory only")
    blocks = None if kv_cache_memory is None else cache_blocks_for_memory(pipe.config, kv_cache_memory)
    scheduler = Scheduler(pipe, max_batch=max_batch, cache_blocks=blocks, max_queue=max_queue, prefix=prefix_cache,
                          store=store, speculate=speculate)
    name = preset or ("default" if model is None else Path(str(model)).name)
    return Service(name, pipe, scheduler, load_template(path))


def run(service: Service, host: str, port: int, say: Callable[[str], None]) -> None:
    """Serve until interrupted (uvicorn, quiet: warnings only, no access log)."""
    import uvicorn

    app = create_app(service, lambda: say(f"dsv4 serve: model {service.name!r} at http://{host}:{port}/v1"))
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
