"""Calibration beyond RAM: a ~1.5B-parameter Llama quantized within --max-memory (docs/scale.md).

    python bench/scale.py [--budget 1.5GB] [--schemes w4a16-gptq,w4a16-awq] [--samples 4] [--seq-len 128]
                          [--threads N] [--parallel] [--big DIR]

Writes a randomly initialised Llama-architecture model (hidden 2048, intermediate 3072, 50 layers, SmolLM2's tokenizer and
vocabulary, tied embeddings: ~1.51B parameters, ~6.0 GB of float32) as one safetensors shard per block
into a temporary folder, without ever holding it whole; then runs ``leanlm quantize --max-memory`` on it
in a subprocess per scheme and records that child's peak resident memory as the kernel counts it (its VmHWM,
and ``os.wait4``'s ru_maxrss, /usr/bin/time's "Maximum resident set size"), with its wall time. A ~100M
twin of the same shape family is quantized both in memory and offloaded (same calibration), and the
two output folders are compared tensor by tensor. Everything written is deleted at the end (``--big DIR``
reuses a 1.5B model written before with ``--write DIR``, and keeps it). ``--threads N`` runs the children with N
torch/OpenMP threads (recorded); ``--parallel`` runs the 1.5B schemes and the twins side by side (peak memory is
each child's own; wall times then share the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import md_table, write_results  # noqa: E402

# intermediate 1.5x hidden: GPTQ's float64 Cholesky of the down_proj Hessian (intermediate^2) must fit the budget
BIG = dict(hidden_size=2048, intermediate_size=3072, num_hidden_layers=50, num_attention_heads=32, num_key_value_heads=4)
TWIN = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=12, num_key_value_heads=4)


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, torch {torch.__version__}"


def tokenizer_folder() -> Path:
    from leanlm.core.models import _gguf_cache_folder, builtin_gguf, convert_gguf

    folder = _gguf_cache_folder(builtin_gguf("smollm2-135m"))
    return folder if (folder / "tokenizer.json").is_file() else convert_gguf(builtin_gguf("smollm2-135m"))


def write_random_llama(folder: Path, shape: dict, seed: int = 0) -> int:
    """A random Llama (std 0.02 weights, unit norms) as one shard per decoder block plus one for the rest; returns
    its parameter count. At most one block is in memory at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    tok = tokenizer_folder()
    vocab = json.loads((tok / "config.json").read_text())["vocab_size"]
    cfg = LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=True, **shape)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tok / f, folder / f)
    g = torch.Generator().manual_seed(seed)
    h, inter, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
              "mlp.down_proj.weight": (h, inter)}
    total, weight_map = 0, {}
    files = n + 1
    for i in range(files):
        name = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        if i < n:
            t = {f"model.layers.{i}.{k}": torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
            t.update({f"model.layers.{i}.input_layernorm.weight": torch.ones(h), f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(h)})
        else:
            t = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g) * 0.02, "model.norm.weight": torch.ones(h)}
        save_file(t, str(folder / name), metadata={"format": "pt"})
        total += sum(v.numel() for v in t.values())
        weight_map.update({k: name for k in t})
        del t
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total * 4}, "weight_map": weight_map}))
    return total


THREADS: dict = {}   # OMP_NUM_THREADS for the children (--threads), empty: torch's default


def run_child(argv: list[str]) -> dict:
    """Run `python -m leanlm ARGV --json` as a child: its JSON answer, wall seconds and peak RSS from the OS (wait4)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), **THREADS}
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "leanlm", *argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    # wait4 gives this child's own rusage; read its pipes on threads so it never blocks on a full pipe
    import threading

    bufs = {"out": b"", "err": b""}

    def drain(stream, key):
        bufs[key] = stream.read()

    threads = [threading.Thread(target=drain, args=(p.stdout, "out")), threading.Thread(target=drain, args=(p.stderr, "err"))]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(p.pid, 0)
    for t in threads:
        t.join()
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"leanlm {' '.join(argv)} failed ({code}): {bufs['err'].decode()[-2000:]}")
    text = bufs["out"].decode()
    answer = json.loads(text[text.index("{"):])
    # the child's own VmHWM (kernel high-water mark of its address space), which leanlm reports; wait4's ru_maxrss
    # also counts the parent's peak at spawn (Linux carries it across exec), so the parent here stays small
    return {"answer": answer, "wall_seconds": wall, "peak_rss_bytes": answer.get("peak_rss_bytes", usage.ru_maxrss * 1024),
            "wait4_maxrss_bytes": usage.ru_maxrss * 1024}   # an in-memory run reports no peak of its own: wait4's


def write_in_child(folder: Path, shape: str, seed: int) -> int:
    """Write a random model in a child process, so this process never holds its tensors (see run_child)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, __file__, "--write", str(folder), "--shape", shape, "--seed", str(seed)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def same_folders(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    def tensors(f):
        out = {}
        for p in sorted(f.glob("*.safetensors")):
            out.update(load_file(str(p)))
        return out

    ta, tb = tensors(a), tensors(b)
    qa, qb = (json.loads((f / "leanlm.json").read_text())["quantization"]["quantizers"] for f in (a, b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta) and qa == qb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="1.5GB")
    ap.add_argument("--schemes", default="w4a16-gptq,w4a16-awq")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--twin-budget", default="1GB")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary models are written")
    ap.add_argument("--skip-big", action="store_true", help="only the twin (equality) runs")
    ap.add_argument("--big", help="a 1.5B model folder written before (python bench/scale.py --write DIR); kept")
    ap.add_argument("--threads", type=int, help="torch/OpenMP threads of the leanlm children (default: torch's)")
    ap.add_argument("--parallel", action="store_true", help="run the 1.5B schemes and the twins side by side")
    ap.add_argument("--name", default="scale", help="results name: bench/results/NAME.md and NAME.json")
    ap.add_argument("--write", help=argparse.SUPPRESS)   # internal: write a random model there and print its size
    ap.add_argument("--shape", choices=["big", "twin"], default="big", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--load", default="quiet machine (nothing else running)",
                    help="how loaded the machine was, stated in the results (wall times depend on it)")
    a = ap.parse_args()
    if a.write:
        print(write_random_llama(Path(a.write), BIG if a.shape == "big" else TWIN, seed=a.seed))
        return
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from leanlm.core.offload import parse_bytes

    if a.threads:
        THREADS["OMP_NUM_THREADS"] = str(a.threads)
    lock = threading.Lock()
    schemes = a.schemes.split(",")
    calib = ["--samples", str(a.samples), "--seq-len", str(a.seq_len)]
    work = Path(tempfile.mkdtemp(prefix="leanlm-scale-", dir=a.dir))
    data = {"machine": machine(), "load": a.load,
            "calibration": f"{a.samples} x {a.seq_len} tokens of the protocol's Wikipedia calibration text", "budget": a.budget,
            "threads": a.threads or f"torch default ({torch.get_num_threads()})", "parallel": a.parallel, "big": {}, "twin": {}}

    def report():
        rows = []
        b = data["big"]
        for s, r in b.get("runs", {}).items():
            rows.append([f"{b['params'] / 1e9:.2f}B ({b['float_bytes'] / 1e9:.2f} GB float32)", s, "offloaded", a.budget,
                         f"{r['estimated_bytes'] / 1e9:.2f} GB", f"{r['peak_rss_bytes'] / 1e9:.2f} GB",
                         f"{r['peak_rss_bytes'] / b['float_bytes']:.3f}", f"{r['wall_seconds'] / 60:.1f} min", "-"])
        t = data["twin"]
        for s, r in t.get("runs", {}).items():
            for mode in ("in_memory", "offloaded"):
                x = r[mode]
                est = x.get("estimated_bytes")
                rows.append([f"{t['params'] / 1e6:.0f}M twin ({t['float_bytes'] / 1e9:.2f} GB)", s, mode.replace("_", " "),
                             a.twin_budget if mode == "offloaded" else "-", f"{est / 1e9:.2f} GB" if est else "-",
                             f"{x['peak_rss_bytes'] / 1e9:.2f} GB",
                             f"{x['peak_rss_bytes'] / t['float_bytes']:.3f}", f"{x['wall_seconds']:.0f} s",
                             "bit-identical" if r["identical"] else "DIFFERENT"])
        md = (f"# Calibration beyond RAM (bench/scale.py)\n\nMachine: {data['machine']}. **{data['load']}.** Threads per "
              f"leanlm process: {data['threads']}{'; the runs ran side by side' if a.parallel else ''}.\n\n"
              f"Calibration: {data['calibration']}. Peak RSS is the `leanlm quantize` child's own high-water mark of resident memory as the "
              f"kernel keeps it (VmHWM in /proc/PID/status, which leanlm reports), interpreter and libraries included; "
              f"wait4's ru_maxrss for the same child, kept in the JSON, agrees once the parent stays small (Linux carries a "
              f"parent's peak into its child's ru_maxrss at exec, so this script writes the models in children too).\n\n"
              + md_table(["model", "scheme", "path", "--max-memory", "estimate", "peak RSS", "peak RSS / float bytes", "wall time",
                          "output vs in-memory"], rows))
        with lock:
            write_results(a.name, data, md)

    try:
        free = shutil.disk_usage(work).free
        if not a.skip_big and not a.big:
            need = 4 * 1.6e9 * 1.25
            if free < need:
                raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, the 1.5B model needs ~{need / 1e9:.1f} GB; pass --dir")
        budget = parse_bytes(a.budget)

        def big_run(s):
            r = run_child(["quantize", str(big), "--scheme", s, "--out", str(work / f"big-{s}"), *calib, "--max-memory", a.budget])
            ans = r["answer"]
            data["big"]["runs"][s] = {"threads": a.threads, "wall_seconds": r["wall_seconds"], "peak_rss_bytes": r["peak_rss_bytes"],
                                      "wait4_maxrss_bytes": r["wait4_maxrss_bytes"],
                                      "self_reported_peak_rss_bytes": ans.get("peak_rss_bytes"), "estimated_bytes": ans.get("estimated_bytes"),
                                      "calib_seconds": ans.get("calib_seconds"), "checkpoint_bytes": ans.get("checkpoint_bytes"),
                                      "within_budget": max(r["peak_rss_bytes"], r["wait4_maxrss_bytes"]) <= budget}
            print(f"1.5B {s}: peak RSS {r['peak_rss_bytes'] / 1e9:.3f} GB (budget {a.budget}), {r['wall_seconds'] / 60:.1f} min", flush=True)
            shutil.rmtree(work / f"big-{s}")
            report()

        twin = work / "twin"

        def twin_run(s):
            mem = run_child(["quantize", str(twin), "--scheme", s, "--out", str(work / f"twin-{s}-mem"), *calib])
            offl = run_child(["quantize", str(twin), "--scheme", s, "--out", str(work / f"twin-{s}-off"), *calib, "--max-memory", a.twin_budget])
            ident = same_folders(work / f"twin-{s}-mem", work / f"twin-{s}-off")
            data["twin"]["runs"][s] = {"in_memory": {k: mem[k] for k in ("wall_seconds", "peak_rss_bytes", "wait4_maxrss_bytes")},
                                       "offloaded": {**{k: offl[k] for k in ("wall_seconds", "peak_rss_bytes", "wait4_maxrss_bytes")},
                                                     "estimated_bytes": offl["answer"].get("estimated_bytes")}, "identical": ident}
            print(f"twin {s}: identical={ident}, peak RSS in memory {mem['peak_rss_bytes'] / 1e9:.2f} GB, "
                  f"offloaded {offl['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
            report()

        # order: the 1.5B model with the first scheme, the twins, then the 1.5B with the other schemes (--parallel: all at once)
        big = Path(a.big) if a.big else work / "big"
        if not a.skip_big:
            t0 = time.perf_counter()
            n = (json.loads((big / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 4
                 if a.big else write_in_child(big, "big", 0))
            data["big"] = {"params": n, "float_bytes": 4 * n, "shape": BIG, "write_seconds": None if a.big else time.perf_counter() - t0,
                           "runs": {}}
            print(f"{'reused' if a.big else 'wrote'} {n / 1e9:.2f}B parameters ({4 * n / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s; "
                  f"budget {a.budget} = {budget / (4 * n):.3f} of the float bytes", flush=True)

        def twins():
            n = write_in_child(twin, "twin", 1)
            data["twin"] = {"params": n, "float_bytes": 4 * n, "shape": TWIN, "runs": {}}
            for s in schemes:
                twin_run(s)
            shutil.rmtree(twin)

        if a.parallel:
            with ThreadPoolExecutor(len(schemes) + 1) as pool:
                jobs = [] if a.skip_big else [pool.submit(big_run, s) for s in schemes]
                jobs.append(pool.submit(twins))
                for j in jobs:
                    j.result()
        else:
            if not a.skip_big:
                big_run(schemes[0])
            twins()
            if not a.skip_big:
                for s in schemes[1:]:
                    big_run(s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {Path(__file__).resolve().parent / 'results' / f'{a.name}.md'}")


if __name__ == "__main__":
    main()
