"""The HTTP side of ``tunelab serve``: a FastAPI app speaking the OpenAI API over a :class:`ModelPool`.

Every error leaves as OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``), including unknown
routes and unexpected exceptions (logged server-side, answered as a 500 without a traceback). Order of checks per
request: API key (401) -> body size (413) -> JSON and fields (400) -> model id (404) -> ``max_tokens`` and context
length (400) -> ``n`` against ``--max-batch-size`` (400) -> a generation slot (429 when the line is full). A client
that disconnects -- while waiting for a slot, during a non-streaming generation or mid-stream -- cancels its
generation.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations (``Request``)
# at run time, and the routes are defined inside build_app, where string annotations cannot be resolved.
import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from tunelab.data.tokenize import encode_prompt
from tunelab.serve.engine import Job, ModelPool, QueueFull, build_engine
from tunelab.serve.generation import SamplingOptions
from tunelab.serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseIds,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    models_list,
    parse_request,
    usage_chunk,
)

logger = logging.getLogger("tunelab.serve")
_T = TypeVar("_T")
OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class ServeLimits:
    max_concurrency: int = 8
    max_queue: int = 64
    max_batch_size: int = 8
    """Rows decoded together (a request with ``n`` choices is ``n`` rows); 1 runs each request in its own thread."""
    max_tokens_limit: int = 2048
    max_request_bytes: int = 1 << 20
    api_key: str | None = None


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=status, content=body, headers=headers)


class Guard:
    """ASGI middleware: the API key (every path but /health) and the declared body size, before any route runs.

    Plain ASGI rather than ``BaseHTTPMiddleware``, which would wrap streaming responses and hide disconnects.
    """

    def __init__(self, app: Any, limits: ServeLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            error = self._check(scope["path"], headers)
            if error is not None:
                await _json_response(error.status, error.body(), _error_headers(error))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, path: str, headers: dict[str, str]) -> ApiError | None:
        key = self.limits.api_key
        if key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_request_bytes:
            return _too_large(self.limits.max_request_bytes)
        return None


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


def _error_headers(error: ApiError) -> dict[str, str] | None:
    if error.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if error.status == 429:
        return {"Retry-After": "1"}
    return None


async def _read_body(request: Any, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes even when no Content-Length was sent (chunked uploads)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(request: Any, awaitable: Awaitable[_T]) -> _T:
    """Await ``awaitable`` unless the client disconnects first (then cancel it and raise :class:`ClientGone`).

    The body has been read by now, so the next ASGI message can only be the disconnect.
    """
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone
    return task.result()


async def _disconnected(request: Any) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _choices(request: ChatCompletionRequest | CompletionRequest) -> int:
    return 1 if request.n is None else request.n


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIServer:
    """Request handling, independent of the framework's routing (see :func:`build_app`)."""

    def __init__(self, pool: ModelPool, limits: ServeLimits) -> None:
        self.pool = pool
        self.limits = limits
        self.engine, self.scheduler = build_engine(pool, max_concurrency=limits.max_concurrency,
                                                   max_queue=limits.max_queue, max_batch_size=limits.max_batch_size)
        self.created = int(time.time())
        self.jobs: set[Job] = set()

    def health(self) -> dict[str, Any]:
        s = self.scheduler
        return {"status": "ok", "models": self.pool.ids, "running": s.running, "running_rows": s.running_rows,
                "queued": s.queued, "completed": s.stats.completed, "cancelled": s.stats.cancelled,
                "left_queue": s.stats.left_queue, "rejected": s.stats.rejected, "failed": s.stats.failed,
                "max_batch_size": self.limits.max_batch_size, "peak_batch_rows": s.stats.peak_batch_rows}

    def models(self) -> dict[str, Any]:
        return models_list(self.pool.ids, self.created)

    def _prepare(self, request: ChatCompletionRequest | CompletionRequest) -> tuple[Any, list[int], SamplingOptions]:
        loaded = self.pool.column(request.model)
        if loaded is None:
            raise ApiError(404, f"the model {request.model!r} does not exist; this server has "
                                f"{', '.join(map(repr, self.pool.ids))}", param="model", code="model_not_found")
        if isinstance(request, ChatCompletionRequest):
            system, turns = request.conversation()
            prompt = encode_prompt(loaded.template, loaded.tokenizer, system, turns)
        else:
            prompt = loaded.tokenizer.encode(request.prompt_text, add_special_tokens=True)
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        limit = self.limits.max_tokens_limit
        asked = request.requested_max_tokens()
        if asked is not None and asked > limit:
            raise ApiError(400, f"max_tokens is {asked}; this server allows at most {limit}", param="max_tokens",
                           code="max_tokens_too_large")
        context = self.pool.context_length
        max_tokens = asked if asked is not None else limit
        if context is not None and asked is None:
            max_tokens = min(max_tokens, context - len(prompt))
        if context is not None and (max_tokens < 1 or len(prompt) + max_tokens > context):
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {len(prompt)} and "
                                f"max_tokens is {max_tokens}", param="messages", code="context_length_exceeded")
        if request.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({request.min_tokens}) is above max_tokens ({max_tokens})",
                           param="min_tokens")
        rows = self.limits.max_batch_size
        if _choices(request) > rows:
            raise ApiError(400, f"n is {request.n}; this server decodes at most {rows} answer(s) at once "
                                f"(--max-batch-size {rows})", param="n")
        temperature = 1.0 if request.temperature is None else request.temperature
        options = SamplingOptions(max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=1.0 if request.top_p is None else request.top_p,
                                  min_new_tokens=request.min_tokens, stop=request.stop_strings, seed=request.seed)
        return loaded, prompt, options

    async def _admit(self, http: Any, request: Any, chat: bool) -> Job:
        loaded, prompt, options = self._prepare(request)
        n = _choices(request)
        try:
            await _until_disconnect(http, self.scheduler.acquire(request.model, rows=n))
        except QueueFull:
            raise ApiError(429, f"the server is busy: {self.scheduler.running} requests running and "
                                f"{self.scheduler.queued} waiting (--max-concurrency {self.limits.max_concurrency}, "
                                f"--max-queue {self.limits.max_queue}); retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        # Chat answers end at the template's end of turn; raw completions only at end of sequence or `stop`.
        stops = (*loaded.template.stop_strings, *options.stop) if chat else options.stop
        stops = (*stops, loaded.tokenizer.pad_token or "")
        job = Job(asyncio.get_running_loop(), self.scheduler, request.model, loaded, prompt, options, n=n,
                  stops=stops, extra_eos=options.stop)
        self.jobs.add(job)
        self.engine.start(job)
        return job

    async def complete(self, http: Any, body: bytes, chat: bool) -> Any:
        kind = ChatCompletionRequest if chat else CompletionRequest
        request = parse_request(kind, body)
        job = await self._admit(http, request, chat)
        ids = ResponseIds("chatcmpl" if chat else "cmpl", request.model)
        if request.stream:
            return _cancellable_stream(self._stream(job, ids, chat, request), on_close=lambda: self._abandon(job))
        try:
            completions = await _until_disconnect(http, job.wait())
        except ClientGone:
            job.cancel.set()
            raise
        finally:
            self._forget(job)
        build = chat_response if chat else completion_response
        answers = [(c.text, c.finish_reason) for c in completions]
        return _json_response(200, build(ids, answers, len(job.prompt_ids),
                                         sum(c.completion_tokens for c in completions)))

    async def _stream(self, job: Job, ids: ResponseIds, chat: bool, request: Any) -> AsyncIterator[str]:
        """Chunks of every choice as they come (each with its ``index``), each choice's ``finish_reason`` when it
        ends, then usage (when asked for) and ``[DONE]``."""
        usage = bool(request.stream_options and request.stream_options.include_usage)
        try:
            if chat:
                for index in range(job.n):
                    yield _sse(chat_chunk(ids, {"role": "assistant", "content": ""}, None, usage, index))
            async for index, piece in job.events():
                completion = job.completions[index]
                if piece is not None:
                    yield _sse(chat_chunk(ids, {"content": piece}, None, usage, index) if chat
                               else completion_chunk(ids, piece, None, usage, index))
                elif completion is None:
                    logger.error("generation failed", exc_info=job.error)
                    yield _sse(ApiError(500, "generation failed; see the server log", type="server_error",
                                        code="internal_error").body())
                    return
                else:
                    yield _sse(chat_chunk(ids, {}, completion.finish_reason, usage, index) if chat
                               else completion_chunk(ids, "", completion.finish_reason, usage, index))
            if usage:
                done = [c for c in job.completions if c is not None]
                yield _sse(usage_chunk(ids, "chat.completion.chunk" if chat else "text_completion",
                                       len(job.prompt_ids), sum(c.completion_tokens for c in done)))
            yield _sse("[DONE]")
        finally:
            self._abandon(job)

    def _abandon(self, job: Job) -> None:
        """The response is over: a generation still running has no reader any more, so stop it."""
        if not job.finished.is_set():
            job.cancel.set()
        self._forget(job)

    def _forget(self, job: Job) -> None:
        self.jobs.discard(job)

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel.set()


def _cancellable_stream(body: AsyncIterator[str], on_close: Any) -> Any:
    """A server-sent-event response that always watches for the client's disconnect, stops the body at once, and
    calls ``on_close`` when it is over however it ended (even when the body never started).

    Starlette watches for disconnects itself only for ASGI spec versions before 2.4; later it waits for a failed
    write, which may not come while the generator waits for the next token.
    """
    import anyio
    from starlette.responses import StreamingResponse

    class CancellableStream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                async with anyio.create_task_group() as group:

                    async def stream() -> None:
                        with suppress(OSError):
                            await self.stream_response(send)
                        group.cancel_scope.cancel()

                    group.start_soon(stream)
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()
            finally:
                on_close()

    return CancellableStream(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def build_app(pool: ModelPool, limits: ServeLimits) -> Any:
    """The ASGI app: routes, OpenAI-style errors everywhere, and the :class:`Guard` in front."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    server = OpenAIServer(pool, limits)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        server.cancel_all()

    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Any:
        return _json_response(exc.status, exc.body(), _error_headers(exc))

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Any:
        return _json_response(499, ApiError(499, "client closed the request", code="client_closed").body())

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Any:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _json_response(exc.status_code, ApiError(exc.status_code, str(exc.detail), code=code).body())

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"])
        message = str(first["msg"])
        return _json_response(400, ApiError(400, f"{where}: {message}" if where else message).body())

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Any:
        logger.error("unexpected error", exc_info=exc)
        return _json_response(500, ApiError(500, "internal server error; see the server log", type="server_error",
                                            code="internal_error").body())

    @app.get("/health")
    async def health() -> Any:
        return server.health()

    @app.get("/v1/models")
    async def models() -> Any:
        return server.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await server.complete(request, await _read_body(request, limits.max_request_bytes), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await server.complete(request, await _read_body(request, limits.max_request_bytes), chat=False)

    return Guard(app, limits)
