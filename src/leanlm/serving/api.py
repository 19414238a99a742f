"""OpenAI-compatible HTTP server (FastAPI on uvicorn) over an `LLMEngine`.

`create_app(engine, name)` returns the ASGI app: /v1/completions, /v1/chat/completions (the tokenizer's chat
template), /v1/models, server-sent-event streaming, /health and /metrics (Prometheus text, vLLM's names).
The engine steps in ONE background thread (`AsyncLLM`) while requests exist; each request waits on its own
asyncio queue. A client that disconnects (or closes its stream) aborts its sequence, which frees its blocks.
uvicorn's SIGTERM handling stops accepting connections and waits for open requests (drain) before the
app's shutdown stops the engine thread.
"""

from __future__ import annotations

import asyncio
import collections
import json
from functools import partial
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import LeanLMError

dumps = partial(json.dumps, separators=(",", ":"))   # compact JSON: fewer bytes per streamed token
from .engine import LLMEngine, RequestOutput
from .metrics import render
from .scheduler import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


class _APIKey:
    """`--api-key`: /v1 routes need `Authorization: Bearer KEY`. A plain ASGI middleware: Starlette's
    `@app.middleware("http")` would route every streamed chunk through an extra task and memory stream."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1") and dict(scope["headers"]).get(b"authorization") != self.want:
            msg = "missing or wrong API key (send 'Authorization: Bearer KEY')"
            return await _error(401, msg, None, "authentication_error")(scope, receive, send)
        await self.app(scope, receive, send)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)   # None: greedy (leanlm's default)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: Literal[1] = 1
    user: str | None = None
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[int]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict]
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AsyncLLM:
    """The engine loop (in the main thread under `serve`, else a background thread); requests talk to it through
    per-request asyncio queues.

    Only the engine thread touches the engine's state: the event loop hands it new requests and aborts through
    an inbox it drains before each step. (A lock held across each step made a new request wait for the engine
    thread to let go of it, which Python's locks do not promise, and froze the event loop, every other stream
    included, while it waited.)"""

    def __init__(self, engine: LLMEngine, max_waiting: int = 64):
        self.engine, self.max_waiting = engine, max_waiting
        self.inbox: collections.deque = collections.deque()   # ("add", id, prompt, params, arrival) | ("abort", id)
        self.queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}   # open requests
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self.run, name="leanlm-engine", daemon=True)

    def start(self) -> None:
        """Step the engine in a background thread (for an app served by someone else's event loop)."""
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> asyncio.Queue:
        if len(self.queues) >= self.engine.scheduler.max_num_seqs + self.max_waiting:
            raise APIError(429, "the server's request queue is full; retry later", None, "rate_limit_exceeded")
        self.engine.check_request(prompt, params)   # a request the engine can never serve fails here, as a 400
        q: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = (asyncio.get_running_loop(), q)
        self.inbox.append(("add", request_id, prompt, params, time.perf_counter()))
        self.wake.set()
        return q

    def abort(self, request_id: str) -> None:
        if self.queues.pop(request_id, None) is not None:
            self.inbox.append(("abort", request_id))
            self.wake.set()

    def _take_inbox(self) -> list:
        """Hand the queued requests and aborts to the engine; returns (id, error) for adds it refused."""
        failed = []
        while self.inbox:
            msg = self.inbox.popleft()
            if msg[0] == "abort":
                self.engine.abort(msg[1])
            elif msg[1] in self.queues:   # not aborted while queued
                try:
                    self.engine.add_request(msg[1], msg[2], msg[3], arrival=msg[4])
                except Exception as e:
                    failed.append((msg[1], e))
        return failed

    def run(self, until=None) -> None:
        """The engine loop: until `stop()` (or `until()` is true), take the inbox, step, hand out the outputs."""
        while not self.stopping and not (until is not None and until()):
            outs = self._take_inbox()
            busy = self.engine.has_unfinished()
            try:
                outs += [(o.request_id, o) for o in self.engine.step()] if busy else []
            except Exception as e:   # a bug must not hang every client: fail them all, keep serving
                outs += [(rid, e) for rid in list(self.queues)]
                for rid, _ in outs:
                    self.engine.abort(rid)
            sends: dict = {}   # event loop -> [(queue, output)]: one thread-safe wake-up per loop and step
            for rid, o in outs:
                entry = self.queues.get(rid)
                if entry is not None:
                    sends.setdefault(entry[0], []).append((entry[1], o))
                if not isinstance(o, RequestOutput) or o.finished:
                    self.queues.pop(rid, None)
            for loop, items in sends.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:   # that event loop is closed: nobody reads these requests any more
                    for rid in [r for r, (lp, _) in list(self.queues.items()) if lp is loop]:
                        self.abort(rid)
            if not busy and not self.inbox:
                self.wake.wait(0.5)
                self.wake.clear()


def _deliver(items: list) -> None:
    for q, o in items:
        q.put_nowait(o)


def create_app(engine: LLMEngine, model_name: str, *, api_key: str | None = None, max_waiting: int = 64,
               engine_thread: bool = True) -> FastAPI:
    """The ASGI app. ``engine_thread``: step the engine in a thread the app starts (else the caller runs
    ``app.state.llm.run``, as ``serve`` does in the main thread)."""
    llm = AsyncLLM(engine, max_waiting)
    tok = engine.tokenizer

    @asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            llm.start()
        yield
        llm.stop()

    app = FastAPI(title="leanlm", lifespan=lifespan)
    app.state.llm = llm

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        e = exc.errors()[0]
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return _error(400, f"malformed JSON body: {e.get('msg')}", "body")
        param = ".".join(loc) or "body"
        if e.get("type") == "extra_forbidden":
            return _error(400, f"unsupported parameter '{param}'", param)
        return _error(400, f"'{param}': {e.get('msg')}", param)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.kind)

    if api_key is not None:
        app.add_middleware(_APIKey, key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        text = render(engine, model_name)   # read while the engine thread steps: counters may be one step apart
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "leanlm",
                                            "max_model_len": engine.max_model_len}]}

    def params(r: _Sampling, max_tokens: int | None, prompt: list[int]) -> SamplingParams:
        if r.model != model_name:
            raise APIError(400, f"unknown model '{r.model}'; this server serves '{model_name}'", "model")
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt" if isinstance(r, CompletionRequest) else "messages")
        if len(prompt) >= engine.max_model_len:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context holds {engine.max_model_len}",
                           "prompt" if isinstance(r, CompletionRequest) else "messages")
        room = engine.max_model_len - len(prompt)
        if max_tokens is None:
            max_tokens = min(16, room) if isinstance(r, CompletionRequest) else room
        if max_tokens > room:
            raise APIError(400, f"max_tokens {max_tokens} + {len(prompt)} prompt tokens exceed the context of "
                                f"{engine.max_model_len} tokens", "max_tokens")
        if r.top_k is not None and r.top_k > engine.model.spec.vocab:
            raise APIError(400, f"top_k must be <= the vocabulary size {engine.model.spec.vocab}", "top_k")
        stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", "stop")
        return SamplingParams(max_tokens, r.temperature or 0.0, r.top_k, r.top_p, r.seed, stop, r.ignore_eos)

    async def results(request: Request, rid: str, prompt: list[int], sp: SamplingParams):
        """Yield the request's outputs in batches (every output already queued: a client that reads slower than
        the engine steps gets several tokens per write); abort it (freeing its blocks) if the client leaves first."""
        try:
            q = llm.add(rid, prompt, sp)
        except LeanLMError as e:
            raise APIError(400, str(e), None) from e
        done = False
        try:
            while not done:
                if q.empty():   # wait_for costs a task and a timer: only when nothing is queued yet
                    try:
                        batch = [await asyncio.wait_for(q.get(), timeout=0.5)]
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                else:
                    batch = [q.get_nowait()]
                while not q.empty():
                    batch.append(q.get_nowait())
                for out in batch:
                    if isinstance(out, Exception):
                        raise APIError(500, f"engine error: {out}", None, "server_error")
                done = batch[-1].finished
                yield batch
        finally:
            if not done:
                llm.abort(rid)

    def usage(out: RequestOutput) -> dict:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    async def respond(request: Request, r: _Sampling, prompt: list[int], max_tokens: int | None, chat: bool):
        sp = params(r, max_tokens, prompt)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created, "model": model_name}
        gen = results(request, rid, prompt, sp)
        if not r.stream:
            text, last = [], None
            async for batch in gen:
                text.extend(out.text for out in batch)
                last = batch[-1]
            if last is None:   # the client left
                return _error(499, "client closed the request", None)
            body = "".join(text)
            choice = ({"index": 0, "message": {"role": "assistant", "content": body}} if chat
                      else {"index": 0, "text": body, "logprobs": None})
            choice["finish_reason"] = last.finish_reason
            return {**head, "choices": [choice], "usage": usage(last)}
        try:   # errors (queue full, bad prompt) still become a JSON error, not a broken stream
            first = await anext(gen)
        except StopAsyncIteration:   # the client left before the first token
            return _error(499, "client closed the request", None)
        include_usage = bool((r.stream_options or {}).get("include_usage"))

        async def sse():
            obj = "chat.completion.chunk" if chat else "text_completion"
            batch, started = first, False
            pre = "data: " + dumps({**head, "object": obj})[:-1] + ',"choices":['   # the per-token constant part, serialized once
            while True:
                events = []   # one event per token, written together (one send for the tokens of a batch)
                for out in batch:
                    if chat:
                        delta = {"content": out.text}
                        if not started:
                            delta["role"] = "assistant"
                        choice = {"index": 0, "delta": delta, "finish_reason": out.finish_reason}
                    else:
                        choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
                    started = True
                    events.append(pre + dumps(choice) + "]}\n\n")
                out = batch[-1]
                if out.finished:
                    if include_usage:
                        events.append(f"data: {dumps({**head, 'object': obj, 'choices': [], 'usage': usage(out)})}\n\n")
                    events.append("data: [DONE]\n\n")
                    yield "".join(events)
                    break
                yield "".join(events)
                batch = await anext(gen)

        async def stream():
            try:
                async for chunk in sse():
                    yield chunk
            finally:
                await gen.aclose()   # a closed stream aborts the sequence

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(r: CompletionRequest, request: Request):
        if isinstance(r.prompt, str):
            prompt = tok(r.prompt)["input_ids"] if r.prompt else []
        else:
            prompt = r.prompt
            if any(not 0 <= t < engine.model.spec.vocab for t in prompt):
                raise APIError(400, f"prompt token ids must lie in [0, {engine.model.spec.vocab})", "prompt")
        return await respond(request, r, prompt, r.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(r: ChatRequest, request: Request):
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model '{model_name}' has no chat template; use /v1/completions", "messages")
        msgs = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else "".join(p.get("text", "") for p in m.content if p.get("type") == "text")} for m in r.messages]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        return await respond(request, r, prompt, r.max_completion_tokens or r.max_tokens, chat=True)

    return app


def serve(engine: LLMEngine, model_name: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_waiting: int = 64) -> None:
    """Run the server until SIGINT/SIGTERM (which drains open requests first).

    The engine steps in the calling (main) thread and uvicorn's event loop runs in a second thread, not the other
    way round: the model was loaded and packed in the main thread, so its OpenMP thread pool lives there, and a
    second thread running torch's parallel regions adds a second pool; with more pool threads than cores libgomp
    stops spinning between regions, and each of a decode step's ~150 small regions then waits for a futex
    wake-up (measured: one-sequence steps took 10 ms from a second thread against 4-5 ms from the main one).
    """
    import signal

    import uvicorn

    app = create_app(engine, model_name, api_key=api_key, max_waiting=max_waiting, engine_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    http = threading.Thread(target=server.run, name="leanlm-http", daemon=True)
    # uvicorn listens to signals only from the main thread: here they ask it to drain and stop (twice: at once)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        app.state.llm.run(until=lambda: not http.is_alive())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        app.state.llm.stop()
    if not server.started:
        raise LeanLMError(f"the server did not start on {host}:{port} (the port may be in use, see the log above); "
                          "choose another --port")
