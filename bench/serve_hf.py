"""Baseline servers for bench/serve.py: transformers `generate` behind the same OpenAI-style HTTP interface.

    python bench/serve_hf.py smollm2-135m --mode naive  --port 8101            # one request at a time
    python bench/serve_hf.py smollm2-135m --mode static --port 8102 --max-batch 64

naive: what a user without a serving engine gets: a queue, and one `generate` per request (bfloat16).
static: static batching: when the model is free, take every waiting request (up to --max-batch), left-pad
them into one batch and run one `generate` until the longest is done; requests arriving meanwhile wait for
the next batch (no joining mid-batch: that is what continuous batching adds).

Only what the benchmark uses: POST /v1/completions (string prompt, max_tokens, stream, ignore_eos; greedy),
GET /health, GET /v1/models, GET /metrics (vllm:num_requests_running / _waiting). A client that disconnects is cancelled:
a waiting request is skipped, a running one stops at the next step (a StoppingCriteria).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class Req:
    ids: list[int]
    max_tokens: int
    ignore_eos: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: bool = False
    n: int = 0
    tokens: list[int] = field(default_factory=list)


class _Streamer:
    """transformers streamer: `put` gets the prompt once, then each step's next tokens [B]."""

    def __init__(self, reqs: list[Req], tok):
        self.reqs, self.tok, self.first = reqs, tok, True

    def put(self, value: torch.Tensor) -> None:
        if self.first:          # the prompt
            self.first = False
            return
        for r, t in zip(self.reqs, value.reshape(-1).tolist()):
            if r.cancelled or r.n >= r.max_tokens:
                continue
            r.n += 1
            r.tokens.append(t)
            r.loop.call_soon_threadsafe(r.out.put_nowait, ("tok", t))

    def end(self) -> None:
        for r in self.reqs:
            r.loop.call_soon_threadsafe(r.out.put_nowait, ("end", None))


class _Cancelled:
    """Stops the rows whose client left (all of them: generate returns)."""

    def __init__(self, reqs: list[Req]):
        self.reqs = reqs

    def __call__(self, input_ids, scores, **kw):
        return torch.tensor([r.cancelled for r in self.reqs], dtype=torch.bool)


def worker(model, tok, q: "queue.Queue[Req]", mode: str, max_batch: int, state: dict) -> None:
    from transformers import StoppingCriteriaList

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    while True:
        r = q.get()
        batch = [r]
        if mode == "static":
            while len(batch) < max_batch:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
        batch = [b for b in batch if not b.cancelled]   # a client that left while waiting is skipped
        if not batch:
            continue
        state["running"] = len(batch)
        L = max(len(b.ids) for b in batch)
        ids = torch.tensor([[pad] * (L - len(b.ids)) + b.ids for b in batch])
        mask = torch.tensor([[0] * (L - len(b.ids)) + [1] * len(b.ids) for b in batch])
        new = max(b.max_tokens for b in batch)
        eos_free = all(b.ignore_eos for b in batch)
        try:
            with torch.inference_mode():
                model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new if eos_free else 0,
                               do_sample=False, pad_token_id=pad, streamer=_Streamer(batch, tok),
                               stopping_criteria=StoppingCriteriaList([_Cancelled(batch)]))
        except Exception as e:   # never leave a client hanging
            for b in batch:
                b.loop.call_soon_threadsafe(b.out.put_nowait, ("error", str(e)))
        state["running"] = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--mode", choices=["naive", "static"], default="naive")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    import uvicorn

    from leanlm.core.models import load

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load(a.model, dtype=a.dtype)
    model.generation_config.do_sample = False
    for k in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, k, None)
    q: queue.Queue[Req] = queue.Queue()
    state = {"running": 0}
    threading.Thread(target=worker, args=(model, tok, q, a.mode, a.max_batch if a.mode == "static" else 1, state),
                     daemon=True).start()
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": a.model, "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(f"vllm:num_requests_running {state['running']}\nvllm:num_requests_waiting {q.qsize()}\n")

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body = await request.json()
            prompt, max_tokens = body["prompt"], int(body.get("max_tokens", 16))
            assert isinstance(prompt, str) and prompt and max_tokens >= 1
        except Exception:
            return JSONResponse({"error": {"message": "bad request", "type": "invalid_request_error"}}, status_code=400)
        r = Req(tok(prompt)["input_ids"], max_tokens, bool(body.get("ignore_eos")), asyncio.get_running_loop(), asyncio.Queue())
        q.put(r)
        rid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())

        async def events():
            try:
                while True:
                    kind, v = await r.out.get()
                    if kind == "error":
                        raise RuntimeError(v)
                    if kind == "end":
                        return
                    yield v
            finally:
                r.cancelled = True

        if not body.get("stream"):
            toks = [t async for t in events()]
            return {"id": rid, "object": "text_completion", "created": created, "model": body.get("model"),
                    "choices": [{"index": 0, "text": tok.decode(toks), "finish_reason": "length"}],
                    "usage": {"prompt_tokens": len(r.ids), "completion_tokens": len(toks)}}

        async def sse():
            async for t in events():
                chunk = {"id": rid, "object": "text_completion", "created": created,
                         "choices": [{"index": 0, "text": tok.decode([t]), "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                if await request.is_disconnected():
                    return
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
