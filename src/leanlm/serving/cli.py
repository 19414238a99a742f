"""`leanlm serve`: the options and the command body (leanlm/cli.py wires them in)."""

from __future__ import annotations

import sys

from ..cli_args import COUNT, COUNT0, PORT, POSITIVE, SEQ_LEN, device
from ..core.errors import LeanLMError


def serve_args(sp) -> None:
    sp.add_argument("--weights", default=None, help="packed weight format: fp32, bf16 (default), int8, int4, w8a8, or auto for a leanlm-quantized model")
    sp.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=64, help="int4 group size")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=PORT, default=8000, help="TCP port")
    sp.add_argument("--max-num-seqs", type=COUNT, default=16, help="most sequences in the running batch")
    sp.add_argument("--max-waiting", type=COUNT0, default=64, help="most requests queued beyond the batch; more get 429")
    sp.add_argument("--max-num-batched-tokens", type=COUNT, default=512, help="tokens per engine step (prefill chunk budget)")
    sp.add_argument("--max-model-len", type=SEQ_LEN, default=None,
                    help="most tokens (prompt + output) of one request (default: the model's context, at most 2048)")
    sp.add_argument("--kv-cache-mb", type=POSITIVE, default=256, help="memory of the paged KV cache in MB")
    sp.add_argument("--kv-dtype", choices=["auto", "float32", "bfloat16", "int8"], default="auto",
                    help="KV block storage: auto (float32 for float32 weights, else bfloat16), float32, bfloat16 (2x the tokens "
                         "per MB), or int8 with a scale per token and head (about 3.5x)")
    sp.add_argument("--block-size", type=COUNT, default=16, help="tokens per KV block")
    sp.add_argument("--no-prefix-caching", action="store_true", help="do not share the KV blocks of common prompt prefixes")
    sp.add_argument("--speculative", choices=["none", "prompt-lookup", "draft"], default="none",
                    help="speculation inside the batch: prompt-lookup or --draft-model drafts for greedy requests, verified in the "
                         "batch's forward")
    sp.add_argument("--draft-model", default=None, help="with --speculative draft: a smaller model with the same tokenizer "
                    "(a built-in name, folder or file, as MODEL)")
    sp.add_argument("--num-draft", type=COUNT, default=4, help="tokens drafted per sequence and step with --speculative")
    sp.add_argument("--spec-max-batch", type=COUNT, default=2,
                    help="with --speculative: draft only while at most this many sequences run (speculation pays at a small batch)")
    sp.add_argument("--dense-rows", type=COUNT0, default=16,
                    help="int4/int8 layers run from bfloat16 copies in steps of at least this many token rows (faster at a large "
                         "batch; 2 bytes per weight more memory); 0: never")
    sp.add_argument("--device", type=device, default="cpu", help="cpu (default) or cuda[:N]: the engine, its weights and its KV "
                    "cache on a GPU (PyTorch's CUDA kernels for each weight format)")
    sp.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    sp.add_argument("--served-model-name", default=None, help="model name in the API (default: MODEL)")


def run_serve(a, load) -> dict:
    from .api import serve
    from .engine import LLMEngine

    model, tok = load(a.model, "float32", a.trust_remote_code)
    if tok is None:
        raise LeanLMError(f"{a.model} has no tokenizer; the server needs one to read prompts")
    draft = load(a.draft_model, "float32", a.trust_remote_code)[0] if a.draft_model else None
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    max_len = a.max_model_len or (min(2048, ctx) if isinstance(ctx, int) and ctx > 1 else 2048)
    engine = LLMEngine(model, tok, a.weights, group_size=a.group_size, kv_cache_mb=a.kv_cache_mb, block_size=a.block_size,
                       kv_dtype=a.kv_dtype, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                       max_model_len=max_len, prefix_caching=not a.no_prefix_caching,
                       speculative=None if a.speculative == "none" else a.speculative, num_draft=a.num_draft,
                       spec_max_batch=a.spec_max_batch, dense_rows=a.dense_rows, device=a.device, draft_model=draft)
    del model
    name = a.served_model_name or a.model
    b = engine.blocks
    print(f"leanlm serve: {name} ({engine.model.weights} weights on {engine.device}), KV cache {b.num_blocks} blocks x {b.block_size} tokens ({engine.kv_dtype}), "
          f"http://{a.host}:{a.port}/v1"
          + (f"; bfloat16 copies for steps of >= {a.dense_rows} rows: {engine.dense_copy_bytes / 2**20:.0f} MB"
             if engine.dense_copy_bytes else ""), file=sys.stderr)
    serve(engine, name, host=a.host, port=a.port, api_key=a.api_key, max_waiting=a.max_waiting)
    return {"model": name, "stopped": True}


def show_serve(r: dict, console) -> None:
    console.print(f"leanlm serve {r['model']}: stopped")
