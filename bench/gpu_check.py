"""The GPU path, checked in one short run on a lent CUDA machine (the project builds and tests without one).

    python bench/gpu_check.py --assets .gpu --out bench/results [--only tests,qad,serve,decode]

`--assets` holds what the GPU machine cannot fetch: SmolLM2-135M's config.json and tokenizer files (the model is
built from its config with random weights: the checks are about the engine's paths and speed, not quality) and the
protocol's Wikipedia calibration text as a .txt file. Sections, each written to gpu_check.json as soon as it ends:

- tests: `pytest tests/test_cuda.py` (every weight format on CUDA against the CPU reference; continuous batching).
- qad: `leanlm qat ... --teacher self` (QAD) on the GPU, under torchrun with NCCL (1 process: one GPU) and as a plain
  process.
- serve: the serving engine (`LLMEngine`, in-process) at 1, 16 and 64 concurrent requests of 128 tokens, against
  naive transformers `generate` (bfloat16, one request at a time) and static batching (one padded `generate`).
- qad_cpu: the same QAD on this machine's CPU cores (CUDA hidden), for the training speed ratio.
- decode: batch-1 decode of the runtime `Engine` on the GPU against transformers `generate` (bfloat16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

RESULTS: dict = {}
DEV = "cuda"   # --device cpu: a dry run of the script itself on a machine without a GPU
QUICK = False


def save(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def section(name, fn, out):
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        RESULTS[name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - a failing section is reported, the others still run
        import traceback

        traceback.print_exc()
        RESULTS[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    RESULTS[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(RESULTS[name], default=str)[:3000], flush=True)
    save(out)


def sync():
    if DEV != "cpu":
        torch.cuda.synchronize()


def random_model(assets: Path, dtype=torch.float32, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(assets / "smollm2")
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tests(assets):
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}"}
    p = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda.py"), "-q", "-p", "no:cacheprovider", "-rs"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
    tail = (p.stdout + p.stderr).strip().splitlines()
    print("\n".join(tail[-40:]))
    return {"returncode": p.returncode, "summary": tail[-1] if tail else "", "failures": [l for l in tail if l.startswith("FAILED")]}


def qad(assets, cpu=False):
    folder = Path("/tmp/gpu_smollm2_random")
    if not folder.exists():
        from transformers import AutoTokenizer

        random_model(assets).save_pretrained(folder)
        AutoTokenizer.from_pretrained(assets / "smollm2").save_pretrained(folder)
    text = assets / "wiki_calib.txt"
    base = ["qat", str(folder), "--scheme", "w4a16-rtn", "--teacher", "self", "--budget", "8k" if QUICK else "32k", "--text", str(text),
            "--samples", "8", "--eval-windows", "0", "--batch-size", "2", "--seq-len", "512", "--grad-accum", "2", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    runs = {}
    cases = [
        ("cuda_torchrun_nccl_1proc", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "leanlm"], {}),
        ("cuda_plain", [sys.executable, "-m", "leanlm"], {}),
        ("cpu_plain", [sys.executable, "-m", "leanlm"], {"CUDA_VISIBLE_DEVICES": ""}),
    ]
    for name, pre, extra_env in cases[2:] if cpu else cases[1:2] if QUICK else cases[:2]:
        if cpu:   # the CPU comparison: a quarter of the budget (the same tokens per step), compared per token
            base[base.index("--budget") + 1] = "8k"
        out = f"/tmp/gpu_qad_{name}"
        subprocess.run(["rm", "-rf", out])
        t0 = time.perf_counter()
        p = subprocess.run(pre + base + ["--out", out], capture_output=True, text=True, env={**env, **extra_env}, timeout=300)
        wall = time.perf_counter() - t0
        r = {"returncode": p.returncode, "wall_s": round(wall, 1)}
        try:
            j = json.loads(p.stdout[p.stdout.index("{"):])
            steps = j.get("steps") or j.get("result", {}).get("steps")
            r.update({k: j.get(k) for k in ("steps", "tokens", "seconds", "ptq_seconds", "loss_first", "loss_last")})
            if r["seconds"]:
                r["train_tok_per_s"] = round(r["tokens"] / r["seconds"], 1)
            del steps
        except Exception:  # noqa: BLE001
            r["stdout_tail"] = p.stdout[-1500:]
        if p.returncode:
            r["stderr_tail"] = p.stderr[-2500:]
        runs[name] = r
        print(name, r, flush=True)
    a, b = (runs.get(k, {}) for k in ("cuda_torchrun_nccl_1proc", "cuda_plain"))
    res = {"runs": runs, "command": "leanlm " + " ".join(base[:1] + ["MODEL"] + base[2:])}
    if a.get("loss_last") is not None and b.get("loss_last") is not None:
        res["torchrun_vs_plain_loss_last_abs_diff"] = abs(a["loss_last"] - b["loss_last"])
    if cpu and RESULTS.get("qad", {}).get("runs", {}).get("cuda_plain", {}).get("train_tok_per_s") and runs["cpu_plain"].get("train_tok_per_s"):
        res["cuda_vs_cpu_training_tok_per_s"] = round(RESULTS["qad"]["runs"]["cuda_plain"]["train_tok_per_s"] / runs["cpu_plain"]["train_tok_per_s"], 1)
    return res


def _prompts(n, vocab, lo=40, hi=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def serve(assets):
    from leanlm.serving import LLMEngine, SamplingParams

    model = random_model(assets)
    V, new = model.config.vocab_size, 16 if QUICK else 128
    rows = []

    def engine_row(weights, clients):
        eng = LLMEngine(model, None, weights, kv_cache_mb=2048, max_num_seqs=max(clients, 1), max_model_len=512,
                        max_num_batched_tokens=2048, device=DEV)
        warm = _prompts(2, V, seed=9)
        for i, p in enumerate(warm):
            eng.add_request(f"w{i}", p, SamplingParams(max_tokens=8, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
        sync()
        prompts = _prompts(clients, V)
        t0 = time.perf_counter()
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, SamplingParams(max_tokens=new, ignore_eos=True))
        n, steps = 0, 0
        while eng.has_unfinished():
            n += sum(len(o.token_ids) for o in eng.step())
            steps += 1
        dt = time.perf_counter() - t0
        assert n == clients * new, (n, clients * new)
        return {"config": f"leanlm-{weights}", "clients": clients, "tokens": n, "seconds": round(dt, 3), "tok_per_s": round(n / dt, 1),
                "steps": steps, "ms_per_step": round(1e3 * dt / steps, 2)}

    for w in ("bf16", "int4"):
        for c in ((1, 4) if QUICK else (1, 16, 64)):
            rows.append(engine_row(w, c))
            print(rows[-1], flush=True)
    hf = model.to(DEV, torch.bfloat16)
    # naive: one request at a time (4 requests measured)
    prompts = _prompts(4, V)
    hf.generate(torch.tensor([prompts[0]], device=DEV), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    sync()
    t0 = time.perf_counter()
    for p in prompts:
        hf.generate(torch.tensor([p], device=DEV), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    sync()
    dt = time.perf_counter() - t0
    naive = 4 * new / dt
    rows.append({"config": "naive-hf-bf16", "clients": 1, "tokens": 4 * new, "seconds": round(dt, 3), "tok_per_s": round(naive, 1)})
    for c in ((4,) if QUICK else (16, 64)):   # static batching: every request in one left-padded generate
        ps = _prompts(c, V)
        L = max(map(len, ps))
        ids = torch.tensor([[0] * (L - len(p)) + p for p in ps], device=DEV)
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps], device=DEV)
        sync()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        dt = time.perf_counter() - t0
        rows.append({"config": "static-hf-bf16", "clients": c, "tokens": c * new, "seconds": round(dt, 3), "tok_per_s": round(c * new / dt, 1)})
    for r in rows:
        r["vs_naive_hf"] = round(r["tok_per_s"] / naive, 2)
    return {"rows": rows, "model": "SmolLM2-135M architecture, random weights", "new_tokens": new,
            "prompts": "random token ids, 40-159 tokens"}


def decode(assets):
    from leanlm.runtime import Engine

    model = random_model(assets)
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    new, rows = (16 if QUICK else 128), []
    for w in ("fp32", "bf16", "int8", "int4"):
        eng = Engine(model, w, max_seq_len=256, device=DEV)
        eng.generate(ids, 8)
        ticks = []
        eng.generate(ids, new, on_token=lambda: ticks.append(time.perf_counter()))
        rows.append({"engine": f"leanlm-{w}", "tok_per_s": round((len(ticks) - 1) / (ticks[-1] - ticks[0]), 1),
                     "weight_bytes": eng.weight_bytes()})
        print(rows[-1], flush=True)
        del eng
    hf = model.to(DEV, torch.bfloat16)
    x = ids.to(DEV)
    hf.generate(x, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    sync()
    t0 = time.perf_counter()
    hf.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    sync()
    rows.append({"engine": "transformers-bf16 generate", "tok_per_s": round(new / (time.perf_counter() - t0), 1)})
    return {"rows": rows, "prompt_tokens": 64, "new_tokens": new}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=".gpu", help="config + tokenizer files and the calibration text (see the docstring)")
    ap.add_argument("--out", default="bench/results", help="folder for gpu_check.json")
    ap.add_argument("--only", default="tests,qad,serve,decode,qad_cpu", help="comma-separated sections")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only for a quick dry run of this script (with --quick)")
    ap.add_argument("--quick", action="store_true", help="a few small cells (a dry run)")
    a = ap.parse_args()
    global DEV, QUICK
    DEV, QUICK = a.device, a.quick
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU is visible to PyTorch here; run it on a GPU machine")
    os.environ.setdefault("LEANLM_KERNELS", "0")   # the fused kernels are CPU code: do not build them on the GPU machine
    assets, out = Path(a.assets), Path(a.out)
    RESULTS["machine"] = {"gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "none (dry run)", "torch": torch.__version__, "python": platform.python_version(),
                          "cpus": os.cpu_count(), "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import transformers

        RESULTS["machine"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    fns = {"tests": tests, "qad": qad, "serve": serve, "decode": decode, "qad_cpu": lambda assets: qad(assets, cpu=True)}
    for name in a.only.split(","):
        section(name, lambda f=fns[name]: f(assets), out)


if __name__ == "__main__":
    main()
