"""Decode speed of the leanlm runtime (float32, bfloat16, int8, int4) next to transformers' generate and
llama.cpp on SmolLM2-135M, interleaved in one run (PROTOCOL.md), plus the bandwidth-limit fraction,
resident memory, and held-out perplexity of the packed models vs the fake-quantized models they came from.

    python bench/decode.py                       # full run (llama-cpp-python built from PyPI source once)
    python bench/decode.py --llama-wheels /work/wheels --runs 5
    python bench/decode.py --compile             # also the torch.compile'd decode steps (minutes of compile)
    python bench/decode.py --models gemma3-270m,llama-1b --batches 1 --ppl-windows 0 --no-rss --name decode_models

`--models` adds models beyond SmolLM2-135M, each timed as the default int4 path (fused kernels, int8 head),
the same packing on PyTorch's kernels, and llama.cpp on a Q4_1 GGUF that leanlm exports of the same float
weights: `gemma3-270m` (built-in) and `llama-1b`, a randomly initialised Llama of ~1.1B parameters made here
(bandwidth dominates its decode step). Every batch-1 leanlm row also reports the step's time split
(torch.profiler: weight-matmul kernels, attention, everything else = overhead).

llama.cpp runs in its own virtualenv (bench/.venvs/llamacpp, created here with llama-cpp-python==0.3.36)
as a worker process that streams one line per generated token; the parent ticks the speed harness on
each line, so its runs interleave with the others' and are timed by the same code. llama.cpp's
high-level API decodes one sequence, so it appears at batch 1 only.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("LEANLM_KERNELS", "1")  # the fused float kernels (the default), timed next to PyTorch's
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, setup_threads, step_clocks, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "bench" / ".venvs" / "llamacpp"
LLAMA_PIN = "llama-cpp-python==0.3.36"
DEFAULT = "leanlm int4 + int8 head (default: fused float kernels, one-call step)"
REFERENCE = "leanlm int4 + int8 head, PyTorch kernels (reference)"
PER_OP = "leanlm int4 + int8 head, fused float kernels, per-op Python step"
Q8 = "leanlm int4 + int8 head, int8-activation kernels (LEANLM_KERNELS=q8)"


def q8_engine(model, **kw):
    """An engine on the opt-in int8-activation kernels (the layouts read the mode when they are built)."""
    from leanlm.runtime import Engine

    old = os.environ.get("LEANLM_KERNELS")
    os.environ["LEANLM_KERNELS"] = "q8"
    try:
        return Engine(model, "int4" if not _quantized(model) else None, **kw)
    finally:
        os.environ["LEANLM_KERNELS"] = old if old is not None else "1"


def _quantized(model) -> bool:
    return any(getattr(m, "weight_quantizer", None) is not None for m in model.modules())


def per_op_engine(model, **kw):
    """The default packing and kernels with the per-op Python step (no one-call C++ step): what the step saves."""
    from leanlm.runtime import Engine

    e = Engine(model, "int4" if not _quantized(model) else None, **kw)
    e.model.step = None
    return e


# ------------------------------------------------------------------------------------ llama.cpp
def llamacpp_python(wheels: str | None) -> Path:
    ok = subprocess.run([sys.executable, "-c", f"import llama_cpp; assert llama_cpp.__version__ == '{LLAMA_PIN.split('==')[1]}'"],
                        capture_output=True).returncode == 0
    if ok:   # this interpreter already has the pinned llama-cpp-python
        return Path(sys.executable)
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode != 0:
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["numpy", "typing-extensions", "diskcache", "jinja2"], check=True)
        if wheels:
            subprocess.run(pip + ["--no-index", "--find-links", wheels, LLAMA_PIN], check=True)
        else:
            print(f"building {LLAMA_PIN} from source (about 5 minutes; pip caches the wheel)", flush=True)
            subprocess.run(pip + [LLAMA_PIN], check=True)
    return py


class LlamaCpp:
    def __init__(self, py: Path, gguf: str, threads: int, n_ctx: int):
        self.p = subprocess.Popen([str(py), str(ROOT / "bench" / "llamacpp_worker.py")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, bufsize=1)
        self.version = self._ask({"cmd": "load", "path": gguf, "threads": threads, "n_ctx": n_ctx})["version"]

    def _ask(self, msg):
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def generator(self):
        def gen(input_ids, new_tokens, on_token):
            if input_ids.shape[0] != 1:
                raise ValueError("llama.cpp worker decodes batch 1 only")
            self.p.stdin.write(json.dumps({"cmd": "run", "prompt": input_ids[0].tolist(), "new_tokens": new_tokens}) + "\n")
            self.p.stdin.flush()
            toks = []
            while True:
                msg = json.loads(self.p.stdout.readline())
                if "done" in msg:
                    break
                on_token()
                toks.append(msg["tok"])
            return torch.cat([input_ids, torch.tensor([toks])], dim=1)

        return gen

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=30)


# ------------------------------------------------------------------------------------ checks and splits
KERNEL_OPS = ("leanlm::int4_gemv", "leanlm::int8_gemv", "leanlm::int4_gemv_q8", "leanlm::int8_gemv_q8", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm",
              "aten::mm", "aten::addmm", "aten::_int_mm")
ATTENTION_OPS = ("aten::bmm", "aten::baddbmm", "aten::_softmax")


@torch.inference_mode()
def step_split(eng, prompt: torch.Tensor, steps: int = 10) -> dict:
    """One batch-1 decode step's time (ms, unprofiled) and its split measured by torch.profiler: weight-matmul
    kernels, attention, and the rest (norms, RoPE, cache writes, casts, dispatch and Python: the overhead)."""
    from torch.profiler import profile

    eng.reset()
    eng.forward(prompt[:1], last_only=True)
    one = prompt[:1, -1:]
    for _ in range(3):
        eng.forward(one)
    n0 = eng.length
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.forward(one)
    wall = (time.perf_counter() - t0) / steps * 1e3
    eng.rewind(n0)
    step = getattr(eng.model, "step", None)
    if step is not None:   # one C++ call per step: its own clocks (torch.profiler sees one opaque call)
        wall_s, g, att, inside = step_clocks(eng, one, steps)
        eng.reset()
        return {"step_ms": wall, "profiled_ms": wall_s / steps * 1e3, "kernel_share": g / wall_s, "attention_share": att / wall_s,
                "overhead_share": 1 - (g + att) / wall_s, "python_share": 1 - inside / wall_s, "timer": "the step's own clocks"}
    with profile() as p:
        for _ in range(steps):
            eng.forward(one)
    ev = p.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / steps / 1e3
    kern = sum(e.self_cpu_time_total for e in ev if e.key in KERNEL_OPS) / steps / 1e3
    att = sum(e.self_cpu_time_total for e in ev if e.key in ATTENTION_OPS) / steps / 1e3
    eng.reset()
    return {"step_ms": wall, "profiled_ms": total, "kernel_share": kern / total, "attention_share": att / total,
            "overhead_share": 1 - (kern + att) / total}


@torch.inference_mode()
def divergence(ref, other, prompt: torch.Tensor, n: int = 64) -> dict:
    """Where `other`'s greedy tokens first leave `ref`'s (None: all n equal) and the reference's top-two logit
    margin at that step (0 or ~1e-2 of a bfloat16 logit: a tie)."""
    a = ref.generate(prompt, n)[0, prompt.shape[1]:]
    b = other.generate(prompt, n)[0, prompt.shape[1]:]
    diff = (a != b).nonzero()
    if not len(diff):
        return {"first": None, "margin": None}
    i = int(diff[0])
    ref.reset()
    logits = ref.forward(torch.cat([prompt, a[None, :i]], dim=1), last_only=True)[0]
    ref.reset()
    top = logits.topk(2).values
    return {"first": i, "margin": float(top[0] - top[1])}


def random_llama_1b(layers: int = 22):
    """A randomly initialised Llama of ~1.1B parameters (bfloat16, SmolLM2's vocabulary), for a decode step
    that bandwidth dominates. Returns (model, tokenizer)."""
    import leanlm
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = leanlm.load("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model, tok


def extra_model(name: str, a, llama_py, bw, context) -> dict:
    """Default int4 path vs the same packing on PyTorch's kernels vs llama.cpp Q4_1 of the same weights."""
    import tempfile

    import leanlm
    from leanlm.evaluation.speed import compare_speed, protocol_prompts
    from leanlm.export.gguf import export_gguf
    from leanlm.runtime import Engine

    model, tok = random_llama_1b(a.llama_layers) if name == "llama-1b" else leanlm.load(name)
    nparams = sum(p.numel() for p in model.parameters()) / 1e9
    mk = dict(max_seq_len=max(a.prompt_tokens + a.new_tokens, 512))
    engines = {f"{name}: {DEFAULT}": Engine(model, "int4", **mk), f"{name}: {REFERENCE}": Engine(model, "int4", kernels=False, **mk)}
    if a.all_paths:
        engines[f"{name}: {PER_OP}"] = per_op_engine(model, **mk)
        engines[f"{name}: {Q8}"] = q8_engine(model, **mk)
    tmp = Path(tempfile.mkdtemp(prefix="leanlm-bench-"))
    # the llama.cpp worker is fed token ids, never text: Gemma's tokenizer (no llama.cpp pre-tokenizer name leanlm maps)
    # is written under gpt-2's, which only matters for text llama.cpp would tokenize itself
    gguf = export_gguf(model, tmp / f"{name}-q4_1.gguf", tokenizer=tok, quant="Q4_1", overwrite=True,
                       pretokenizer="gpt-2" if name == "gemma3-270m" else None)
    del model
    gc.collect()
    out = {"params_b": nparams, "limits": {}, "weight_mb": {}, "split": {}, "speed": {}}
    for k, e in engines.items():
        out["limits"][k] = bw / e.model.bytes_per_token(context)
        out["weight_mb"][k] = e.weight_bytes() / 1e6
    sp = engines[f"{name}: {DEFAULT}"].model.spec
    kv_f16 = 2 * sp.n_layers * sp.kv_heads * sp.head_dim * context * 2
    lk = f"{name}: llama.cpp Q4_1"
    out["limits"][lk] = bw / (os.path.getsize(gguf) + kv_f16)
    out["weight_mb"][lk] = os.path.getsize(gguf) / 1e6
    prompts = protocol_prompts(tok, 1, a.prompt_tokens)
    ks = list(engines)
    out["divergence"] = divergence(engines[ks[1]], engines[ks[0]], prompts)
    out["split"] = {k: step_split(e, prompts) for k, e in engines.items()}
    gens = {k: e.generator() for k, e in engines.items()}
    llama = None
    if llama_py is not None:
        llama = LlamaCpp(llama_py, str(gguf), torch.get_num_threads(), 512)
        gens[lk] = llama.generator()
    print(f"{name}: timing {len(gens)} generators x {a.runs} interleaved runs", flush=True)
    res = compare_speed(gens, prompts, a.new_tokens, a.runs, warmup=1)
    out["speed"] = {k: r.to_dict() for k, r in res.items()}
    if llama is not None:
        llama.close()
    gguf.unlink()
    return out


# ------------------------------------------------------------------------------------ helpers
def rss_child(fmt: str) -> None:
    """Print the resident memory (MB) of a process holding only the packed model (run in a fresh process)."""
    import leanlm
    from leanlm.runtime import Engine

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6

    if fmt == "none":  # imports only: the floor every other figure sits on
        import transformers.models.llama.modeling_llama  # noqa: F401

        print(json.dumps({"rss_mb": rss()}))
        return
    model, tok = leanlm.load("smollm2-135m", dtype="bfloat16" if fmt == "hf-bf16" else "float32")
    if fmt.startswith("hf"):
        eng = None
    else:
        kind, _, head = fmt.partition("+")
        if kind in ("int8", "int4"):
            leanlm.quantize(model, "w8a16" if kind == "int8" else "w4a16-rtn", progress=False)
            kind = None
        eng = Engine(model, kind, head=head or "dense", max_seq_len=256)
        del model
    gc.collect()
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed float32 pages back, so RSS shows what is still held
    print(json.dumps({"rss_mb": rss()}))


def measure_rss(fmt: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-child", fmt], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd decode steps of the int8/int4 engines")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--llama-wheels", default=None, help="install llama-cpp-python from this wheel folder instead of building it")
    ap.add_argument("--ppl-windows", type=int, default=40, help="perplexity windows of 512 tokens (0: skip perplexity)")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores, PROTOCOL.md)")
    ap.add_argument("--only", default=None, help="comma-separated name parts: time only the matching generators (llama.cpp always)")
    ap.add_argument("--name", default="decode", help="results file name under bench/results/")
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,llama-1b",
                    help="smollm2-135m (the full comparison), gemma3-270m, llama-1b (random ~1.1B Llama): comma-separated")
    ap.add_argument("--all-paths", action="store_true", help="--models rows also time the per-op Python step and the int8-activation kernels")
    ap.add_argument("--llama-layers", type=int, default=22, help="layers of the random llama-1b (22: ~1.1B parameters)")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    setup_threads()
    if a.threads:
        torch.set_num_threads(a.threads)  # a departure from PROTOCOL.md, recorded in the results
    if a.rss_child:
        return rss_child(a.rss_child)

    import leanlm
    from leanlm.core.models import builtin_gguf
    from leanlm.evaluation import perplexity
    from leanlm.evaluation.profile import machine_info, measure_bandwidth, roofline
    from leanlm.evaluation.speed import compare_speed, hf_generator, protocol_prompts
    from leanlm.runtime import Engine

    models = [m for m in a.models.split(",") if m]
    unknown = set(models) - {"smollm2-135m", "gemma3-270m", "llama-1b"}
    if unknown:
        raise SystemExit(f"unknown --models {sorted(unknown)}; choose from smollm2-135m, gemma3-270m, llama-1b")
    batches = [int(b) for b in a.batches.split(",") if b] if "smollm2-135m" in models else []
    extras = [m for m in models if m != "smollm2-135m"]
    total = a.prompt_tokens + a.new_tokens
    context = a.prompt_tokens + a.new_tokens // 2
    if "smollm2-135m" not in models:   # only the added models: default int4 path vs PyTorch kernels vs llama.cpp
        bw = measure_bandwidth()
        extra = {}
        for m in extras:
            extra[m] = extra_model(m, a, None if a.no_llamacpp else llamacpp_python(a.llama_wheels), bw, context)
            report(a, {}, {}, {}, {}, {}, bw, None, None, context, extra=extra)
        return
    model, tok = leanlm.load("smollm2-135m")
    model_bf16, _ = leanlm.load("smollm2-135m", dtype="bfloat16")
    fq = {"int8": leanlm.quantize(copy.deepcopy(model), "w8a16", progress=False),
          "int4": leanlm.quantize(copy.deepcopy(model), "w4a16-rtn", progress=False)}
    mk = dict(max_seq_len=max(total, 512), max_batch=max(batches + [4]))
    engines = {
        "leanlm fp32": Engine(model, "fp32", **mk),
        "leanlm bf16": Engine(model, "bf16", **mk),
        "leanlm int8 (w8a16)": Engine(fq["int8"], **mk),
        "leanlm int4 (w4a16-rtn g64)": Engine(fq["int4"], head="dense", **mk),
        DEFAULT: Engine(fq["int4"], **mk),
        REFERENCE: Engine(fq["int4"], kernels=False, **mk),
        PER_OP: per_op_engine(fq["int4"], **mk),
        Q8: q8_engine(fq["int4"], **mk),
        "leanlm int4 + int4 head": Engine(fq["int4"], head="int4", **mk),
    }
    if a.compile:
        for name, src, head in [("leanlm int8 (w8a16) compiled", fq["int8"], None), (DEFAULT + " compiled", fq["int4"], "int8"),
                                ("leanlm int4 + int4 head compiled", fq["int4"], "int4")]:
            engines[name] = Engine(src, head=head, compile=True, **mk)
    keep = (lambda k: True) if not a.only else (lambda k: any(p in k for p in a.only.split(",")))
    engines = {k: e for k, e in engines.items() if keep(k) or k == "leanlm fp32"}
    bw = measure_bandwidth()
    gguf = str(builtin_gguf("smollm2-135m"))
    llama = None
    if not a.no_llamacpp:
        llama = LlamaCpp(llamacpp_python(a.llama_wheels), gguf, torch.get_num_threads(), 512)

    # ---- bandwidth limits (same measured bandwidth for all)
    limits = {
        "transformers fp32": roofline(model, None, context=context, bandwidth=bw, flops=1e12).memory_limit_tps,
        "transformers bf16": roofline(model_bf16, None, context=context, bandwidth=bw, flops=1e12).memory_limit_tps,
    }
    for k, e in engines.items():
        limits[k] = bw / e.model.bytes_per_token(context)
    f = model.config
    kv_f16 = 2 * f.num_hidden_layers * f.num_key_value_heads * (f.hidden_size // f.num_attention_heads) * context * 2
    limits["llama.cpp Q4_1"] = bw / (os.path.getsize(gguf) + kv_f16)
    weight_mb = {k: e.weight_bytes() / 1e6 for k, e in engines.items()}
    from leanlm.evaluation.memory import tensor_bytes

    weight_mb["transformers fp32"] = tensor_bytes(model) / 1e6
    weight_mb["transformers bf16"] = tensor_bytes(model_bf16) / 1e6
    weight_mb["llama.cpp Q4_1"] = os.path.getsize(gguf) / 1e6

    # ---- same-run correctness: leanlm fp32 greedy tokens vs transformers' generate of the same weights
    p1 = protocol_prompts(tok, 1, a.prompt_tokens)
    hf_out = hf_generator(model, tok)(p1, 32, lambda: None)
    ll_out = engines["leanlm fp32"].generate(p1, 32)
    same_tokens = bool(torch.equal(hf_out, ll_out))
    # compiled steps reorder float operations (inductor fuses them): report where their greedy tokens first
    # leave the eager engine's (None: all 64 equal); a divergence should sit on a near-tie of the top logits
    agreement = {}
    for k in [k for k in engines if k.endswith(" compiled")]:
        if k.removesuffix(" compiled") not in engines:
            continue
        eager_out = engines[k.removesuffix(" compiled")].generate(p1, 64)[0, p1.shape[1]:]
        comp_out = engines[k].generate(p1, 64)[0, p1.shape[1]:]
        diff = (eager_out != comp_out).nonzero()
        agreement[k] = int(diff[0]) if len(diff) else None
    fused_vs_ref = divergence(engines[REFERENCE], engines[DEFAULT], p1) if DEFAULT in engines and REFERENCE in engines else None
    split = {k: step_split(e, p1) for k, e in engines.items() if k in (DEFAULT, REFERENCE, PER_OP, Q8, DEFAULT + " compiled")}

    speed: dict[str, dict] = {}
    for b in batches:
        prompts = protocol_prompts(tok, b, a.prompt_tokens)
        gens = {"transformers fp32": hf_generator(model, tok), "transformers bf16": hf_generator(model_bf16, tok)}
        gens.update({k: e.generator() for k, e in engines.items()})
        gens = {k: g for k, g in gens.items() if keep(k)}
        if llama is not None and b == 1:
            gens["llama.cpp Q4_1"] = llama.generator()
        print(f"batch {b}: timing {len(gens)} generators x {a.runs} interleaved runs", flush=True)
        res = compare_speed(gens, prompts, a.new_tokens, a.runs, warmup=1)
        speed[str(b)] = {k: r.to_dict() for k, r in res.items()}
        report(a, speed, limits, weight_mb, {}, {}, bw, llama, same_tokens, context, agreement, fused_vs_ref, split)
    if llama is not None:
        llama.close()
    extra = {}
    for m in extras:
        extra[m] = extra_model(m, a, None if a.no_llamacpp else llamacpp_python(a.llama_wheels), bw, context)
        report(a, speed, limits, weight_mb, {}, {}, bw, llama, same_tokens, context, agreement, fused_vs_ref, split, extra)

    # ---- held-out perplexity: packed vs the fake-quantized model it came from
    ppl = {}
    if a.ppl_windows:
        kw = dict(max_windows=a.ppl_windows, progress=True)
        ppl["float32 (transformers)"] = perplexity(model, tok, **kw).perplexity
        for kind in ("int8", "int4"):
            ppl[f"{kind} fake-quantized (transformers)"] = perplexity(fq[kind], tok, **kw).perplexity
        for k in [k for k in ("leanlm fp32", "leanlm bf16", "leanlm int8 (w8a16)", "leanlm int4 (w4a16-rtn g64)", DEFAULT,
                                "leanlm int4 + int4 head") if k in engines]:
            ppl[k + " packed"] = perplexity(engines[k].as_lm(), tok, **kw).perplexity

    rss = {}
    if not a.no_rss:
        for fmt in ("none", "hf-fp32", "hf-bf16", "fp32", "bf16", "int8", "int4", "int4+int8"):
            rss[fmt] = measure_rss(fmt)

    report(a, speed, limits, weight_mb, ppl, rss, bw, llama, same_tokens, context, agreement, fused_vs_ref, split, extra)


def report(a, speed, limits, weight_mb, ppl, rss, bw, llama, same_tokens, context, agreement=None, fused_vs_ref=None, split=None,
           extra=None) -> None:
    from leanlm.evaluation.profile import machine_info

    def ratio(x, ref):
        return f"{x / ref:.2f}x" if x and ref else "-"

    b1 = speed.get("1", {})
    ref_llama = b1.get("llama.cpp Q4_1", {}).get("decode_tps")
    ref_bf16 = {b: s["transformers bf16"]["decode_tps"] for b, s in speed.items() if "transformers bf16" in s}
    rows = []
    for b, s in speed.items():
        for k, r in s.items():
            lim = limits.get(k) if b == "1" else None
            rows.append([k, b, f"{r['decode_tps']:.1f}", ratio(r["decode_tps"], ref_bf16.get(b)),
                         ratio(r["decode_tps"], ref_llama) if b == "1" else "-", f"{r['prefill_tps']:.0f}",
                         f"{weight_mb[k]:.0f}" if k in weight_mb else "-",
                         f"{lim:.0f}" if lim else "-", f"{r['decode_tps'] / lim:.0%}" if lim else "-"])
    targets = {}
    if DEFAULT in b1:
        d = b1[DEFAULT]["decode_tps"]
        targets["smollm2-135m"] = {"engine": DEFAULT, "decode_tps": d, "vs_llamacpp": d / ref_llama if ref_llama else None,
                                   "fraction_of_limit": d / limits[DEFAULT] if DEFAULT in limits else None,
                                   "vs_transformers_bf16": d / ref_bf16["1"] if "1" in ref_bf16 else None}
    for m, e in (extra or {}).items():
        sp = e["speed"]
        ll = sp.get(f"{m}: llama.cpp Q4_1", {}).get("decode_tps")
        for k, r in sp.items():
            lim = e["limits"].get(k)
            rows.append([k, "1", f"{r['decode_tps']:.1f}", "-", ratio(r["decode_tps"], ll), f"{r['prefill_tps']:.0f}",
                         f"{e['weight_mb'][k]:.0f}", f"{lim:.0f}" if lim else "-", f"{r['decode_tps'] / lim:.0%}" if lim else "-"])
        k = f"{m}: {DEFAULT}"
        if k in sp:
            targets[m] = {"engine": k, "decode_tps": sp[k]["decode_tps"], "vs_llamacpp": sp[k]["decode_tps"] / ll if ll else None,
                          "fraction_of_limit": sp[k]["decode_tps"] / e["limits"][k]}
    mi = machine_info()
    load = os.getloadavg()
    md = ["# Decode speed: leanlm runtime vs transformers vs llama.cpp\n",
          f"Machine: {mi['cpu']}, {mi['cores']} cores, {mi['torch_threads']} torch threads (llama.cpp: same thread count), torch {mi['torch']}"
          + (f", llama-cpp-python {llama.version}" if llama else "") + f"; measured read bandwidth {bw / 1e9:.1f} GB/s; "
          f"load average at the end {load[0]:.1f} (other jobs on the machine: compare ratios measured side by side, not absolute figures).",
          f"Protocol: greedy, first {a.prompt_tokens} tokens of evaluation articles as prompts, {a.new_tokens} new tokens, no early stop; "
          f"all generators interleaved (A B C ... A B C ...), median of {a.runs} runs after a warm-up. Decode tok/s counts all rows. "
          "Bandwidth limit = read bandwidth / bytes read per batch-1 decode step (weights + KV cache at the mean context of "
          f"{context} tokens; llama.cpp: GGUF size + f16 KV). Rows prefixed with a model name compare that model's engines "
          "(vs llama.cpp = its own Q4_1 GGUF of the same weights); unprefixed rows are SmolLM2-135M.\n",
          md_table(["engine", "batch", "decode tok/s", "vs transformers bf16", "vs llama.cpp", "prefill tok/s", "weights MB",
                    "bandwidth limit tok/s", "fraction of limit"], rows), ""]
    for m, t in targets.items():
        md.append(f"Fused int4 path, {m}: **{t['decode_tps']:.1f} tok/s**"
                  + (f" = **{t['vs_llamacpp']:.2f}x llama.cpp Q4_1**" if t.get("vs_llamacpp") else "")
                  + (f", {t['fraction_of_limit']:.0%} of the bandwidth limit" if t.get("fraction_of_limit") else "")
                  + (f", {t['vs_transformers_bf16']:.2f}x transformers bf16" if t.get("vs_transformers_bf16") else "")
                  + " (targets: >= 1.5x llama.cpp, >= 50% of the limit).\n")
    splits = dict(split or {})
    for m, e in (extra or {}).items():
        splits.update(e["split"])
    if splits:
        md.append("## Decode step time split (batch 1; torch.profiler self CPU time, or the one-call step's own clocks)\n")
        md.append(md_table(["engine", "step ms (unprofiled)", "weight kernels", "attention", "overhead (everything else)", "measured by"],
                           [[k, f"{v['step_ms']:.2f}", f"{v['kernel_share']:.0%}", f"{v['attention_share']:.0%}",
                             f"{v['overhead_share']:.0%}" + (f" (Python {v['python_share']:.0%})" if "python_share" in v else ""),
                             v.get("timer", "torch.profiler")] for k, v in splits.items()]) + "\n")
    if same_tokens is not None:
        md.append(f"Same-run check: leanlm fp32 greedy tokens {'==' if same_tokens else '!='} transformers fp32 generate "
                  "(protocol prompt, 32 new tokens).\n")
    checks = {"smollm2-135m": fused_vs_ref} if fused_vs_ref else {}
    checks.update({m: e["divergence"] for m, e in (extra or {}).items()})
    for m, dv in checks.items():
        md.append(f"Same-run check, {m}: the fused kernels' greedy tokens "
                  + ("== PyTorch kernels' (64 new tokens).\n" if dv["first"] is None else
                     f"leave PyTorch kernels' at new token {dv['first']} of 64, where the reference's top two logits differ by "
                     f"{dv['margin']:.3f} ({'a tie at bfloat16 rounding' if dv['margin'] < 0.05 else 'NOT a tie'}).\n"))
    for k, first in (agreement or {}).items():
        md.append(f"Same-run check: {k} greedy tokens " + ("== its eager engine's (64 new tokens).\n" if first is None else
                  f"leave its eager engine's at new token {first} of 64 (float operations reordered by inductor).\n"))
    if ppl:
        md.append(f"## Held-out perplexity ({a.ppl_windows} windows x 512 tokens)\n")
        md.append(md_table(["model", "perplexity"], [[k, f"{v:.4f}"] for k, v in ppl.items()]) + "\n")
    if rss:
        md.append("## Resident memory of a process holding only the model (MB, after load + pack, HF model freed; "
                  "`none` = imports only)\n")
        md.append(md_table(["format", "RSS MB"], [[k, f"{v:.0f}"] for k, v in rss.items()]) + "\n")
    data = {"machine": mi, "load_average": load, "bandwidth_gbs": bw / 1e9, "speed": speed, "bandwidth_limit_tps": limits,
            "weights_mb": weight_mb, "perplexity": ppl, "rss_mb": rss, "targets": targets, "same_greedy_tokens_fp32": same_tokens,
            "fused_vs_reference": checks, "step_split": splits, "compiled_first_divergence_from_eager": agreement,
            "extra_models": extra, "llamacpp": llama.version if llama else None, "settings": vars(a)}
    print("\n".join(md))
    print("wrote", write_results(a.name, data, "\n".join(md)))


if __name__ == "__main__":
    main()
