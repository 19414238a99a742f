"""Serving benchmark (PROTOCOL.md "Serving"): `leanlm serve` under 1, 4, 16 and 64 closed-loop clients,
side by side in one run with naive transformers serving (bfloat16, one request at a time), static batching
with transformers, and llama.cpp's C++ `llama-server` (continuous batching, parallel slots = clients) on the
same model as its Q4_1 GGUF; llama-cpp-python's Python server (one request at a time) is a second, labelled row.

    python bench/serve.py                 # the full run (~40 min; 60 s steady-state windows): bench/results/serve.md and serve.json
    python bench/serve.py --quick         # a smoke run (5 s windows, 1 and 16 clients)
    python bench/serve.py --only leanlm-int4,llamacpp-server --resume   # some configs; reuse finished cells

`llama-server` is built once by bench/peers/setup_llama_server.sh (run here automatically when the binary is
missing; from the llama.cpp sources in the llama-cpp-python sdist on PyPI) into ~/.cache/leanlm/peers/llama-server
(or $LLAMA_SERVER_DIR). It is started once per concurrency with `-np` = that concurrency.

Each configuration starts its server as a subprocess (killed in `finally`), warms it up, then for each
concurrency runs bench/serve_load.py (a separate process, async HTTP over 127.0.0.1) for a fixed window
(opened when the cell's first request finishes, unless --no-steady), cuts the open requests, and waits for the
server to drain (a 1-token probe request, and /metrics where the server has it) before the next level. Peak RSS of the server process and its children is sampled from the
OS (psutil) during each window. Every finished cell is kept in bench/results/serve.partial.json, so an
interrupted run restarts where it stopped with --resume.

Extra rows: the prefix cache on and off with a shared system prompt, prompt-lookup speculation inside the
batch (`--speculative prompt-lookup`, drafting while at most 2 sequences run), int4 kernels at every batch size
(`--dense-rows 0`, no bfloat16 copies), and 64 clients with 10% malformed
requests (every valid one must finish with 128 tokens, every malformed one get a 4xx, no 5xx, and /metrics
must show no KV block in use afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

from common import RESULTS, md_table, write_results  # noqa: E402

MODEL = "smollm2-135m"
PARTIAL = RESULTS / "serve.partial.json"
LLAMA_SERVER_DIR = Path(os.environ.get("LLAMA_SERVER_DIR", Path.home() / ".cache" / "leanlm" / "peers" / "llama-server"))
PER_LEVEL = ("llamacpp-server",)   # server kinds restarted for each concurrency (their slot count is the concurrency)


# ---------------------------------------------------------------------------------------------- prompts
def make_prompts(tok, n: int, max_prompt: int) -> tuple[list[str], dict]:
    """Paragraphs (>= 200 characters) of the evaluation text in dump order, each cut at `max_prompt` tokens."""
    from leanlm.core.data import evaluation_texts

    paras = [p.strip() for art in evaluation_texts() for p in art.split("\n") if len(p.strip()) >= 200]
    out, lens = [], []
    for p in paras[:n]:
        ids = tok(p, add_special_tokens=False)["input_ids"][:max_prompt]
        out.append(tok.decode(ids))
        lens.append(len(ids))
    s = sorted(lens)
    dist = {"count": len(s), "min": s[0], "p25": s[len(s) // 4], "median": s[len(s) // 2], "p75": s[3 * len(s) // 4],
            "max": s[-1], "mean": round(sum(s) / len(s), 1),
            "source": f"paragraphs >= 200 characters of the evaluation text, first {n}, cut at {max_prompt} tokens"}
    return out, dist


# ---------------------------------------------------------------------------------------------- servers
_BUILD_FAILED: list[str] = []   # one build attempt per run, not one per concurrency


def llama_server() -> tuple[str, str]:
    """Path and version line of the C++ llama-server, building it first if missing; raises with the reason."""
    binary, version = LLAMA_SERVER_DIR / "bin" / "llama-server", LLAMA_SERVER_DIR / "VERSION"
    if _BUILD_FAILED:
        raise RuntimeError(_BUILD_FAILED[0])
    if not (binary.is_file() and version.is_file()):
        script = ROOT / "bench" / "peers" / "setup_llama_server.sh"
        log = Path(tempfile.mktemp(prefix="setup-llama-server-", suffix=".log"))
        print(f"building llama-server ({script.relative_to(ROOT)}, log {log})", file=sys.stderr)
        pip = Path(sys.executable).with_name("pip")
        env = {**os.environ, "LLAMA_SERVER_DIR": str(LLAMA_SERVER_DIR), **({"PIP": str(pip)} if pip.is_file() else {})}
        with open(log, "w") as f:
            r = subprocess.run(["bash", str(script)], stdout=f, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0 or not binary.is_file():
            tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
            _BUILD_FAILED.append(f"llama-server build failed (exit {r.returncode}): {tail[0][:200]} (log {log})")
            raise RuntimeError(_BUILD_FAILED[0])
    return str(binary), version.read_text().strip()


def server_command(kind: str, port: int, a, gguf: str, slots: int) -> list[str]:
    py = sys.executable
    if kind.startswith("leanlm"):
        weights = "int4" if "int4" in kind else "fp32"
        cmd = [py, "-m", "leanlm", "serve", MODEL, "--weights", weights, "--port", str(port), "--max-num-seqs",
               str(max(a.concurrency)), "--max-waiting", "256", "--kv-cache-mb", str(a.kv_cache_mb),
               "--max-model-len", "1024"]
        if "noprefix" in kind:
            cmd.append("--no-prefix-caching")
        if "spec" in kind:
            cmd += ["--speculative", "prompt-lookup", "--num-draft", "4", "--spec-max-batch", "2"]
        if "packed" in kind:   # int4 kernels at every batch size (no bfloat16 copies for large steps)
            cmd += ["--dense-rows", "0"]
        return cmd
    if kind in ("naive-bf16", "static-bf16"):
        mode = kind.split("-")[0]
        return [py, str(ROOT / "bench" / "serve_hf.py"), MODEL, "--mode", mode, "--port", str(port),
                "--max-batch", str(max(a.concurrency)), "--threads", str(a.threads)]
    if kind == "llamacpp-server":
        # context = slots x (longest prompt + output + 16 tokens of slack for re-tokenisation); -c is split
        # evenly over the slots (no unified KV cache with an explicit -np). Continuous batching and prompt
        # caching (per slot, plus the 8 GiB host-RAM prompt cache) are the server's defaults and stay on.
        return [llama_server()[0], "-m", gguf, "-a", MODEL, "--host", "127.0.0.1", "--port", str(port),
                "-t", str(a.threads), "-tb", str(a.threads), "-np", str(slots),
                "-c", str(slots * (a.max_prompt + a.max_tokens + 16)), "--metrics", "--no-webui"]
    if kind == "llamacpp-python":
        return [py, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", MODEL, "--host", "127.0.0.1",
                "--port", str(port), "--n_threads", str(a.threads), "--n_threads_batch", str(a.threads),
                "--n_ctx", "1024", "--interrupt_requests", "False", "--verbose", "False"]
    raise ValueError(kind)


def extra_body(kind: str, max_tokens: int) -> dict:
    """No early stop: leanlm, llama-server and the transformers servers take `ignore_eos`, llama-cpp-python
    `min_tokens`; repeat penalties are off (llama-cpp-python's default is 1.1) so every server decodes plain greedy."""
    if kind == "llamacpp-server":
        return {"ignore_eos": True, "repeat_penalty": 1.0}
    if kind == "llamacpp-python":
        return {"min_tokens": max_tokens, "repeat_penalty": 1.0}
    return {"ignore_eos": True}


class RSS:
    """Peak resident memory of a process and its children, sampled every second (a server's memory is the model plus
    its KV budget, steady under load; sampling every 0.2 s, which walks every process of the machine, took 8% of a core
    from the two the servers share)."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        import psutil

        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.peak = max(self.peak, self.now())
            except Exception:
                return

    def __enter__(self):
        self.peak = self.now()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join(2)


def http(method: str, url: str, body: dict | None = None, timeout: float = 10.0):
    import httpx2

    with httpx2.Client(timeout=timeout) as c:
        return c.request(method, url, json=body)


def wait_ready(proc, url: str, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        try:
            if http("GET", url + "/v1/models", timeout=2).status_code == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s")


def metrics(url: str) -> dict[str, float]:
    try:
        r = http("GET", url + "/metrics", timeout=5)
    except Exception:
        return {}
    if r.status_code != 200:
        return {}
    out = {}
    for line in r.text.splitlines():
        if line.startswith(("vllm:", "llamacpp:")) and "_bucket" not in line:
            name, _, v = line.rpartition(" ")
            out[name.split("{")[0]] = float(v)
    return out


def drain(url: str, kind: str, timeout: float = 300) -> dict:
    """Wait until the server finished (or cancelled) every request of the last window."""
    t0 = time.time()
    try:   # FIFO servers answer this only after the queue ahead of it is gone
        http("POST", url + "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 1},
             timeout=timeout)
    except Exception as e:
        print(f"  drain probe failed: {e}", file=sys.stderr)
    while time.time() - t0 < timeout:
        m = metrics(url)
        busy = (m.get("vllm:num_requests_running", 0) + m.get("vllm:num_requests_waiting", 0)
                + m.get("llamacpp:requests_processing", 0) + m.get("llamacpp:requests_deferred", 0))
        if not m or busy == 0:
            return m
        time.sleep(0.5)
    return metrics(url)


def load_run(url: str, kind: str, prompts: Path, concurrency: int, duration: float, max_tokens: int,
             malformed: float = 0.0, finish: float = 0.0, ramp: float = 0.0) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "serve_load.py"), "--url", url, "--model", MODEL, "--prompts", str(prompts),
           "--concurrency", str(concurrency), "--duration", str(duration), "--max-tokens", str(max_tokens),
           "--malformed", str(malformed), "--finish-timeout", str(finish), "--extra", json.dumps(extra_body(kind, max_tokens))]
    if ramp:
        cmd += ["--steady", "--max-ramp", str(ramp)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + finish + ramp + 120)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed: {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_config(name: str, kind: str, levels: list[int], a, gguf: str, prompts: Path, port: int, done: dict,
               malformed: float = 0.0) -> None:
    todo = [c for c in levels if f"{name}@{c}" not in done]
    if not todo:
        return
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT / "src")}
    log = open(tempfile.mktemp(prefix=f"serve-{name}-", suffix=".log"), "w")
    proc = None
    try:
        cmd = server_command(kind, port, a, gguf, max(todo))
        print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.time()
        wait_ready(proc, url, a.start_timeout)
        load_s = round(time.time() - t0, 1)
        rss = RSS(proc.pid)
        idle = rss.now()
        load_run(url, kind, prompts, 2, a.warmup, 16)   # warm-up, not recorded
        drain(url, kind)
        for c in todo:
            before = metrics(url) if kind.startswith("leanlm") else {}
            with RSS(proc.pid) as r:
                # the malformed row lets open requests finish, so every valid one is checked for its token count
                res = load_run(url, kind, prompts, c, a.window, a.max_tokens, malformed, a.finish_timeout if malformed else 0.0,
                               0.0 if malformed or not a.steady else a.max_ramp)
                after = drain(url, kind)
            res.update(config=name, server=kind, startup_s=load_s, rss_idle_mb=round(idle / 2**20),
                       rss_peak_mb=round(r.peak / 2**20), command=cmd[1:])
            if "vllm:num_preemptions_total" in after:   # this cell's preemptions (the counter spans the server's life)
                res["preemptions"] = int(after["vllm:num_preemptions_total"] - before.get("vllm:num_preemptions_total", 0))
            if after:
                res["after_drain"] = {k: after[k] for k in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                                            "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
                                                            "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                                                            "vllm:spec_decode_num_draft_tokens_total",
                                                            "vllm:spec_decode_num_accepted_tokens_total",
                                                            "llamacpp:requests_processing", "llamacpp:requests_deferred")
                                      if k in after}
            if proc.poll() is not None:
                res["server_died"] = proc.returncode
            done[f"{name}@{c}"] = res
            save_partial(done)
            print(f"[{name}] {c:>3} clients: {res['tok_per_s']:8.1f} tok/s  {res['req_per_s']:.2f} req/s  TTFT p50/p99 "
                  f"{res['ttft_p50_ms']}/{res['ttft_p99_ms']} ms  ITL p50/p99 {res['itl_p50_ms']}/{res['itl_p99_ms']} ms  "
                  f"RSS {res['rss_peak_mb']} MB  failed {res['failed']}", file=sys.stderr)
    except Exception as e:
        done[f"{name}@error"] = str(e)[:500]
        print(f"[{name}] FAILED: {e} (server log: {log.name})", file=sys.stderr)
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(20)
            except Exception:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except Exception:
                    pass
        log.close()


def save_partial(done: dict) -> None:
    from leanlm.core.io import atomic_file

    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_file(PARTIAL) as tmp:
        tmp.write_text(json.dumps(done, indent=1))


# ---------------------------------------------------------------------------------------------- report
def machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "python": platform.python_version()}


def report(done: dict, a, dist: dict, mach: dict, sys_tokens: int) -> None:
    usd = lambda tps: round(a.price_per_hour / (tps * 3600) * 1e6, 3) if tps else None
    cols = ["config", "clients", "tok/s", "req/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
            "peak RSS MB", "failed", "preemptions", "window open s", "$ / 1M tok"]
    rows = []
    for key, r in done.items():
        if key.endswith("@error"):
            rows.append([key[:-6], "-", "FAILED: " + r[:200]] + [""] * (len(cols) - 3))
            continue
        rows.append([r["config"], r["concurrency"], r["tok_per_s"], r["req_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"],
                     r["itl_p50_ms"], r["itl_p99_ms"], r["rss_peak_mb"], r["failed"],
                     r.get("preemptions", "-"), r.get("window_open_s", 0),
                     usd(r["tok_per_s"])])
    # ratios at each concurrency (same run)
    ratio_rows = []
    for c in a.concurrency:
        g = lambda n: done.get(f"{n}@{c}")
        for ours in ("leanlm-int4", "leanlm-int4-spec", "leanlm-int4-packed", "leanlm-fp32"):
            o = g(ours)
            if not o:
                continue
            row = [ours, c]
            for base in ("naive-bf16", "static-bf16", "llamacpp-server", "llamacpp-python-1slot"):
                b = g(base)
                row.append(f"{o['tok_per_s'] / b['tok_per_s']:.2f}x" if b and b["tok_per_s"] else "-")
            l = g("llamacpp-server")
            row.append(f"{o['ttft_p99_ms']} vs {l['ttft_p99_ms']}" if l else "-")
            ratio_rows.append(row)
    checks = []
    m = done.get(f"leanlm-int4-malformed@{a.malformed_clients}")
    if m:
        after = m.get("after_drain", {})
        checks = [
            ["valid requests sent / finished", f"{m['requests_sent']} / {m['requests_done']}",
             f"{m.get('usage_mismatch', '?')} with a `usage` completion count other than {a.max_tokens}; "
             f"{m['done_with_wrong_token_count']} streamed a different number of chunks (a token that ends inside a UTF-8 "
             f"character is sent with the next one); open requests were let finish after the window (up to {a.finish_timeout:g} s)"],
            ["valid requests failed", m["failed"], ""],
            ["malformed requests sent", m["malformed_sent"], json.dumps(m["malformed_status"])],
            ["malformed answered other than 4xx", m["malformed_not_4xx"], ""],
            ["5xx answers", m["status_5xx"], ""],
            ["KV usage after drain", after.get("vllm:kv_cache_usage_perc"), "0.0 = no block leaked"],
            ["running / waiting after drain", f"{after.get('vllm:num_requests_running')} / {after.get('vllm:num_requests_waiting')}", ""],
            ["peak RSS MB", m["rss_peak_mb"], f"idle after load {m['rss_idle_mb']} MB, KV budget {a.kv_cache_mb} MB"],
        ]
    md = [f"# Serving benchmark (SmolLM2-135M-Instruct, {a.max_tokens} output tokens, greedy, no early stop)\n",
          f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['ram_gb']} GB, torch {mach['torch']}. "
          + ("**Measured on a loaded machine (other jobs shared the 2 cores): compare ratios, not absolute figures.** "
             if a.loaded else "")
          + f"Window {a.window:g} s per cell after a {a.warmup:g} s warm-up"
          + (", opened when the cell's first request finishes (steady state: the admission transient of every client's "
             "first request arriving at once is left out; `window open s` says when)" if a.steady else "")
          + f"; clients in a separate process over 127.0.0.1, "
          f"closed loop. Threads: {a.threads} for every server. Price: ${a.price_per_hour}/h ({a.price_note}).\n",
          f"Prompts: {dist['source']}; tokens min {dist['min']}, p25 {dist['p25']}, median {dist['median']}, "
          f"p75 {dist['p75']}, max {dist['max']}, mean {dist['mean']}. Prefix rows prepend a shared system prompt "
          f"of {sys_tokens} tokens.\n",
          "Servers: `leanlm serve` (float32 and int4 weights, `--max-num-seqs` = the largest concurrency, "
          f"`--kv-cache-mb {a.kv_cache_mb}`); naive = transformers `generate` in bfloat16, one request at a time "
          "(bench/serve_hf.py); static = transformers, every waiting request (up to 64) padded into one `generate`; "
          f"llamacpp-server = llama.cpp's C++ `llama-server` ({a.llama_server_version}, built by "
          "bench/peers/setup_llama_server.sh) on the Q4_1 GGUF the float model is dequantized from, restarted for each "
          "concurrency with `-np` = clients, `-c` = clients x (max prompt + output + 16), continuous batching and its "
          "default prompt caching on, `ignore_eos` and no repeat penalty; "
          "llamacpp-python-1slot = `python -m llama_cpp.server` (llama-cpp-python) on the same GGUF, kept as a second "
          "row: it has no parallel slots (one `Llama` object behind a lock, one request at a time, "
          "`--interrupt_requests False` so a new request waits instead of cutting the running one). "
          "Ratios against llama.cpp use the llamacpp-server row.\n",
          "TTFT counts, for a request still waiting for its first token when the window closed, its wait so far "
          "(a lower bound). ITL is every gap between two streamed tokens. tok/s counts tokens streamed inside the window.\n",
          md_table(cols, rows)]
    if ratio_rows:
        md += ["\n## leanlm vs the baselines, total tok/s in the same run\n",
               md_table(["leanlm", "clients", "vs naive bf16", "vs static batching", "vs llama-server (C++)",
                         "vs llama-cpp-python server (1 slot)", "TTFT p99 ms (leanlm vs llama-server)"], ratio_rows)]
    if checks:
        md += [f"\n## {a.malformed_clients} clients with 10% malformed requests (leanlm int4, batch of "
               f"{max(a.concurrency)}, the rest queued)\n",
               md_table(["check", "value", "note"], checks)]
    data = {"machine": mach, "loaded_machine": a.loaded, "llama_server": a.llama_server_version, "window_s": a.window, "warmup_s": a.warmup,
            "max_tokens": a.max_tokens, "price_per_hour": a.price_per_hour, "price_note": a.price_note,
            "prompts": dist, "system_prompt_tokens": sys_tokens, "results": done}
    path = write_results(a.name, data, "\n".join(md))
    print(f"wrote {path}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 s windows, 1 and 16 clients")
    ap.add_argument("--window", type=float, default=60.0, help="seconds measured per configuration and concurrency")
    ap.add_argument("--no-steady", dest="steady", action="store_false",
                    help="open each window at the first request (default: when the first request finishes)")
    ap.add_argument("--max-ramp", type=float, default=300.0, help="open a steady window after this long at the latest")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--only", default="", help="comma-separated configs to run (default: all)")
    ap.add_argument("--resume", action="store_true", help=f"keep the cells already in {PARTIAL.name}")
    ap.add_argument("--malformed-clients", type=int, default=64, help="clients of the malformed-request row")
    ap.add_argument("--finish-timeout", type=float, default=600.0,
                    help="malformed row: seconds the requests open at the window's end may take to finish")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=256, help="prompt paragraphs are cut at this many tokens")
    ap.add_argument("--kv-cache-mb", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--price-per-hour", type=float, default=0.085)
    ap.add_argument("--price-note", default="on-demand list price of a 2-vCPU x86 cloud VM (AWS c6i.large, us-east-1); "
                                            "pass --price-per-hour for yours")
    ap.add_argument("--port", type=int, default=8150)
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--loaded", action="store_true", help="say in the result that the machine was shared")
    ap.add_argument("--name", default="serve", help="result file name under bench/results/")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the `finally` that stops the server under test
    if a.quick:
        a.window, a.warmup, a.concurrency = min(a.window, 5.0), 2.0, "1,16"
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    top = max(a.concurrency)
    mid = 16 if 16 in a.concurrency else top

    from leanlm.core.models import builtin_gguf, convert_gguf, load_tokenizer

    gguf = str(builtin_gguf(MODEL))
    tok = load_tokenizer(convert_gguf(Path(gguf)))
    prompts, dist = make_prompts(tok, 256, a.max_prompt)
    background = make_prompts(tok, 300, 160)[0][-1]   # a paragraph not among the prompts
    system = "You are a helpful assistant. Background for every answer:\n\n" + background
    sys_tokens = len(tok(system, add_special_tokens=False)["input_ids"])
    tmp = Path(tempfile.mkdtemp(prefix="leanlm-serve-bench-"))
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    (tmp / "shared.json").write_text(json.dumps([system + "\n\n" + p for p in prompts]))

    done = json.loads(PARTIAL.read_text()) if a.resume and PARTIAL.is_file() else {}
    done = {k: v for k, v in done.items() if not k.endswith("@error")}
    plan = [  # (name, server kind, levels, prompts, malformed fraction)
        ("leanlm-int4", "leanlm-int4", a.concurrency, "prompts", 0.0),
        ("leanlm-fp32", "leanlm-fp32", a.concurrency, "prompts", 0.0),
        ("llamacpp-server", "llamacpp-server", a.concurrency, "prompts", 0.0),
        ("llamacpp-python-1slot", "llamacpp-python", a.concurrency, "prompts", 0.0),
        ("static-bf16", "static-bf16", a.concurrency, "prompts", 0.0),
        ("naive-bf16", "naive-bf16", a.concurrency, "prompts", 0.0),
        ("leanlm-int4-shared-prefix", "leanlm-int4", [mid], "shared", 0.0),
        ("leanlm-int4-shared-noprefix", "leanlm-int4-noprefix", [mid], "shared", 0.0),
        ("leanlm-int4-spec", "leanlm-int4-spec", sorted({a.concurrency[0], *(c for c in a.concurrency if c <= mid)}), "prompts", 0.0),
        ("leanlm-int4-packed", "leanlm-int4-packed", sorted({mid, top}), "prompts", 0.0),
        ("leanlm-int4-malformed", "leanlm-int4", [a.malformed_clients], "prompts", 0.1),
    ]
    only = set(filter(None, a.only.split(",")))
    port = a.port
    t0 = time.time()
    for name, kind, levels, which, mal in plan:
        if only and name not in only:
            continue
        for group in ([[c] for c in levels] if kind in PER_LEVEL else [levels]):
            run_config(name, kind, group, a, gguf, tmp / f"{which}.json", port, done, mal)
            port += 1
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)
    version = LLAMA_SERVER_DIR / "VERSION"
    a.llama_server_version = version.read_text().strip() if version.is_file() else "not built"
    report(done, a, dist, machine(), sys_tokens)
    if not only and not any(k.endswith("@error") for k in done):
        PARTIAL.unlink(missing_ok=True)   # complete: nothing to resume


if __name__ == "__main__":
    main()
