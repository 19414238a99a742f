"""Closed-loop load generator for bench/serve.py, run as its own process (PROTOCOL.md: clients in a separate
process over loopback).

    python bench/serve_load.py --url http://127.0.0.1:8100 --model M --prompts prompts.json \
        --concurrency 16 --duration 30 --max-tokens 128 [--malformed 0.1] [--extra '{"ignore_eos": true}']

Each of `concurrency` clients sends a streaming /v1/completions request, reads it to the end, and sends the
next one at once, for `duration` seconds (with --steady, counted from the first request that finishes, so
the admission transient of every client's first request arriving at once is left out); then every open request is cut (its connection closed, which
cancels it on the server) and one JSON summary is printed on stdout. Tokens are counted as streamed chunks
with text choices, timestamped on arrival: tokens/s counts those inside the window. A closing chunk (every
choice's text empty and a finish_reason set, as llama.cpp's servers send after the last token) is not a token. TTFT is measured from
sending the request to its first token; inter-token latency is every gap between two tokens of a request.
A request still waiting for its first token when the window closes counts with its wait so far (a lower
bound), so an overloaded server is not flattered by leaving its slowest requests out.

With --finish-timeout T, requests open when the window closes may finish (up to T seconds; no new ones
start), so every valid request can be checked for its token count. With --malformed F, a fraction F of requests (every 1/F-th, deterministic) is one of several malformed
bodies; the summary counts their status codes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx2

MALFORMED = [  # (name, raw body): each must be refused with a 4xx
    ("bad_json", b'{"model": "M", "prompt": "Hello", "max_tokens": 8'),
    ("wrong_type", {"prompt": "Hello", "max_tokens": "many"}),
    ("unknown_model", {"model": "no-such-model", "prompt": "Hello", "max_tokens": 8}),
    ("empty_prompt", {"prompt": "", "max_tokens": 8}),
    ("unsupported_param", {"prompt": "Hello", "max_tokens": 8, "logit_bias": {"1": 5}}),
    ("max_tokens_over_context", {"prompt": "Hello", "max_tokens": 10**7}),
    ("negative_max_tokens", {"prompt": "Hello", "max_tokens": -3}),
]


def pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


async def run(a) -> dict:
    prompts = json.load(open(a.prompts))
    extra = json.loads(a.extra) if a.extra else {}
    every = round(1 / a.malformed) if a.malformed else 0
    recs: list[dict] = []
    counter = {"n": 0}
    limits = httpx2.Limits(max_connections=a.concurrency + 4, max_keepalive_connections=a.concurrency + 4)
    timeout = httpx2.Timeout(a.request_timeout, connect=10.0)
    async with httpx2.AsyncClient(base_url=a.url, limits=limits, timeout=timeout) as client:
        t_start = time.perf_counter()
        # --steady: the window opens when the first request finishes (the batch is full and turning over), so an
        # admission transient (every client's first request arriving at once) is not measured; else at the start
        state = {"open": None if a.steady else 0.0}
        deadline = t_start + (a.max_ramp if a.steady else 0.0) + a.duration

        async def one(i: int, k: int) -> None:
            n = counter["n"]
            counter["n"] += 1
            rec = {"client": i, "sent": time.perf_counter() - t_start, "times": [], "status": None, "malformed": None}
            recs.append(rec)
            try:
                await send(rec, n, i, k)
            except asyncio.CancelledError:
                raise
            except Exception as e:   # connection refused / reset, a timeout: a failed request
                rec["error"] = f"{type(e).__name__}: {e}"[:300]

        async def send(rec: dict, n: int, i: int, k: int) -> None:
            if every and n % every == every - 1:
                name, body = MALFORMED[(n // every) % len(MALFORMED)]
                rec["malformed"] = name
                if isinstance(body, dict):
                    body = {"model": a.model, **body} if "model" not in body else body
                    body = json.dumps(body).encode()
                r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
                rec["status"] = r.status_code
                return
            prompt = prompts[(i * 7919 + k) % len(prompts)]
            body = {"model": a.model, "prompt": prompt, "max_tokens": a.max_tokens, "temperature": 0, "stream": True, **extra}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["error"] = (await r.aread()).decode(errors="replace")[:300]
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data.strip() == "[DONE]":
                        rec["done"] = True
                        if state["open"] is None:
                            state["open"] = time.perf_counter() - t_start
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        rec["error"] = str(chunk["error"])[:300]
                        break
                    choices = chunk.get("choices") or []
                    closing = choices and all(not c.get("text") and c.get("finish_reason") for c in choices)
                    if choices and not closing:
                        rec["times"].append(time.perf_counter() - t_start)
                    if chunk.get("usage"):
                        rec["usage"] = chunk["usage"].get("completion_tokens")

        def end() -> float:
            return deadline if state["open"] is None else t_start + state["open"] + a.duration

        async def loop_client(i: int) -> None:
            k = 0
            while time.perf_counter() < end():
                await one(i, k)
                k += 1

        tasks = [asyncio.create_task(loop_client(i)) for i in range(a.concurrency)]
        while time.perf_counter() < end():
            await asyncio.sleep(min(0.2, max(0.0, end() - time.perf_counter())))
        if state["open"] is None:   # nothing finished within --max-ramp: measure the last `duration` seconds
            state["open"] = a.max_ramp
        if a.finish_timeout:   # no new request after the window; let the open ones finish (bounded)
            await asyncio.wait(tasks, timeout=a.finish_timeout)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        window = time.perf_counter() - t_start
    return summarize(recs, a, window, state["open"])


def summarize(recs: list[dict], a, window: float, start: float = 0.0) -> dict:
    """Figures over the window [start, start + duration] (seconds from the first request): tokens streamed in it,
    TTFT of the requests sent in it, gaps ending in it, requests finished in it."""
    end = start + a.duration
    valid = [r for r in recs if r["malformed"] is None]
    done = [r for r in valid if r.get("done")]
    tokens_in_window = sum(1 for r in valid for t in r["times"] if start <= t <= end)
    sent_in = [r for r in valid if start <= r["sent"] <= end]
    ttft = [r["times"][0] - r["sent"] for r in sent_in if r["times"] and r["times"][0] <= end]
    ttft += [end - r["sent"] for r in sent_in if not (r["times"] and r["times"][0] <= end) and r["status"] in (None, 200)
             and not r.get("error")]
    itl = [b - a_ for r in valid for a_, b in zip(r["times"], r["times"][1:]) if start <= b <= end]
    wrong_count = [len(r["times"]) for r in done if len(r["times"]) != a.max_tokens]
    usage_mismatch = sum(1 for r in done if r.get("usage") is not None and r["usage"] != a.max_tokens)
    failed = [r for r in valid if (r["status"] not in (None, 200)) or r.get("error")]
    mal = [r for r in recs if r["malformed"]]
    status = {}
    for r in mal:
        status[str(r["status"])] = status.get(str(r["status"]), 0) + 1
    ms = lambda x: None if x is None else round(1000 * x, 1)
    return {
        "concurrency": a.concurrency, "window_s": round(a.duration, 2), "window_open_s": round(start, 2), "requests_sent": len(valid),
        "requests_done": len(done), "requests_cut": len(valid) - len(done) - len(failed),
        "tokens": tokens_in_window, "tok_per_s": round(tokens_in_window / a.duration, 2),
        "req_per_s": round(sum(1 for r in done if r["times"] and start <= r["times"][-1] <= end) / a.duration, 3),   # inside the window
        "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
        "itl_p50_ms": ms(pct(itl, 50)), "itl_p99_ms": ms(pct(itl, 99)),
        "failed": len(failed), "failed_examples": [r.get("error") or r["status"] for r in failed[:3]],
        "done_with_wrong_token_count": len(wrong_count), "usage_mismatch": usage_mismatch,
        "malformed_sent": len(mal), "malformed_status": status,
        "malformed_not_4xx": sum(1 for r in mal if r["status"] is not None and not 400 <= r["status"] < 500),
        "malformed_cut": sum(1 for r in mal if r["status"] is None),
        "status_5xx": sum(1 for r in recs if isinstance(r["status"], int) and r["status"] >= 500),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of prompt strings")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--steady", action="store_true",
                    help="open the measured window when the first request finishes (steady state), not at the start")
    ap.add_argument("--max-ramp", type=float, default=300.0, help="with --steady: open the window after this long at the latest")
    ap.add_argument("--malformed", type=float, default=0.0)
    ap.add_argument("--extra", default="", help="JSON merged into every valid request body")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--finish-timeout", type=float, default=0.0,
                    help="after the window, wait up to this long for open requests to finish instead of cutting them")
    a = ap.parse_args()
    print(json.dumps(asyncio.run(run(a))), flush=True)


if __name__ == "__main__":
    main()
