"""Command line: a thin skin over the Python API
(`leanlm info | eval | profile | quantize | export | generate | draft | prune | distill | sparsify | qat | serve | run | optimize`).

Each command that changes or exports a model parses its options into a step config (leanlm/recipe.py)
and runs it through the same step runner as `leanlm run RECIPE`: a command is a one-step recipe."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_args import BITS, COUNT, COUNT0, FRACTION, NONNEG, POSITIVE, PROBABILITY, SEED, SEQ_LEN, device, memory, size, state_ranges
from .core.errors import LeanLMError


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3f} GB"


def _table(title: str, columns: list[str], rows: list[list]):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[escape(str(x)) for x in r])
    return t


_ARGS: argparse.Namespace | None = None   # the parsed command line, set by main() for the context check


def _load(spec: str, dtype: str, trust_remote_code: bool):
    from .cli_args import check_context
    from .state import load

    model, tok = load(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if _ARGS is not None:
        check_context(_ARGS, model, tok)
    return model, tok


def _one_step(a, step, out: str | None = None):
    """Run one step config the way a recipe does: validate, check it can follow the model's state, load,
    run, then save the model (steps that change it) to --out. Returns (ModelState, StepResult)."""
    import shutil
    from pathlib import Path

    from .cli_args import check_context
    from .core import dist
    from .core.io import check_output
    from .recipe import Context, open_state, run_step, source_facts
    from .state import save

    step.validate()
    out = Path(out or a.out)
    check_output(out, a.overwrite)
    step.check(source_facts(a.model))
    if getattr(step, "max_memory", None):   # block by block from disk: the model is never loaded whole
        import time

        from .recipe import StepResult, check_lengths

        if a.dtype not in ("float32", "fp32", "f32"):
            raise LeanLMError("--max-memory calibrates in float32, block by block; drop --dtype")

        check_lengths(step, source_facts(a.model))
        t0 = time.perf_counter()
        figures = step.run_offloaded(a.model, out, Context(progress=not a.json), a.overwrite, a.trust_remote_code)
        return None, StepResult(step.name, step.to_dict(), figures, time.perf_counter() - t0)
    s = open_state(a.model, a.dtype, a.trust_remote_code)
    check_context(a, s.model, s.tokenizer)
    scratch = Path(f"{str(out).rstrip('/')}.checkpoints")
    main = dist.world().main   # under torchrun / --nproc only rank 0 shows progress and writes
    res = run_step(step, s, Context(out=out, scratch=scratch, progress=not a.json and main))
    if step.changes_model and main:
        save(s.model, out, tokenizer=s.tokenizer, overwrite=a.overwrite)
    dist.barrier()
    if main:
        shutil.rmtree(scratch, ignore_errors=True)
    return s, res


def cmd_info(a) -> dict:
    from .core.modules import facts
    from .evaluation.memory import checkpoint_bytes, model_folder, tensor_bytes

    model, tok = _load(a.model, a.dtype, a.trust_remote_code)
    folder = model_folder(model)
    return {
        "model": a.model,
        "facts": facts(model).to_dict(),
        "weights_in_memory_bytes": tensor_bytes(model),
        "checkpoint": str(folder) if folder else None,
        "checkpoint_bytes": checkpoint_bytes(folder) if folder else None,
        "tokenizer": type(tok).__name__ if tok is not None else None,
        "vocab": len(tok) if tok is not None else None,
    }


def show_info(r: dict, console) -> None:
    f = r["facts"]
    rows = [[k, v] for k, v in f.items()]
    rows += [["weights in memory", _gb(r["weights_in_memory_bytes"])], ["checkpoint", r["checkpoint"] or "-"],
             ["checkpoint on disk", _gb(r["checkpoint_bytes"])], ["tokenizer", f"{r['tokenizer']} ({r['vocab']} tokens)"]]
    console.print(_table(f"leanlm info {r['model']}", ["property", "value"], rows))


def cmd_eval(a) -> dict:
    from .evaluation.harness import EvalSettings, evaluate

    if not a.ppl and not a.speed:
        a.ppl = a.speed = True
    models = {f"{a.model} ({a.dtype})": _load(a.model, a.dtype, a.trust_remote_code)}
    if a.compare or a.compare_dtype:
        other = a.compare or a.model
        odt = a.compare_dtype or a.dtype
        label = f"{other} ({odt})"
        if label in models:
            raise LeanLMError("--compare names the same model and dtype as the baseline; change --compare or --compare-dtype")
        models[label] = _load(other, odt, a.trust_remote_code)
    generators = None
    if a.engine in ("leanlm", "both") and not a.speed:
        raise LeanLMError("--engine applies to --speed; add --speed")
    if a.engine != "hf" and a.speed:
        from .runtime import Engine

        engines = {}
        try:
            for label in models:
                engines[label] = Engine(models[label][0], a.weights, head=a.head, max_seq_len=a.prompt_tokens + a.new_tokens,
                                        max_batch=a.batch, compile=a.compile, allow_fallback=a.allow_fallback)
        except LeanLMError as e:
            if a.engine != "auto":
                raise
            # auto: time transformers when the runtime cannot run a model (an unknown family, a format without a kernel)
            print(f"leanlm: note: timing transformers' generate, since the leanlm runtime cannot run {label}: {e}", file=sys.stderr)
            engines = {}
        generators = {} if engines else None
        for label, eng in engines.items():
            name = f"{label} leanlm {eng.model.weights} (head {eng.model.head_format})"
            if a.engine == "both":
                models[name] = models[label]
            else:
                models[name] = models.pop(label)
            generators[name] = eng.generator()
    s = EvalSettings(
        ppl=a.ppl, speed=a.speed, source=a.source, window=a.window, max_windows=a.windows or None, batch=a.batch,
        prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, runs=a.runs, warmup=a.warmup,
        price_per_hour=a.price_per_hour, progress=not a.json,
    )
    return evaluate(models, s, generators)


def show_eval(r: dict, console) -> None:
    m = r["machine"]
    console.print(f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}")
    models = r["models"]
    if any("perplexity" in v for v in models.values()):
        p0 = next(iter(models.values()))["perplexity"]
        rows = [[k, f"{v['perplexity']['perplexity']:.4f}", f"{v['perplexity']['increase_vs_baseline']:+.2%}"] for k, v in models.items()]
        console.print(_table(f"perplexity ({r['settings']['source']}, {p0['windows']} windows x {p0['window']} tokens, {p0['tokens']} predicted tokens)",
                             ["model", "perplexity", "vs baseline"], rows))
    if any("speed" in v for v in models.values()):
        s0 = next(iter(models.values()))["speed"]
        cols = ["model", "prefill tok/s", "TTFT ms", "decode tok/s", "end-to-end tok/s", "decode ratio"]
        has_cost = "usd_per_million_tokens" in s0
        if has_cost:
            cols.append("$ / 1M tokens")
        rows = []
        for k, v in models.items():
            s = v["speed"]
            row = [k, f"{s['prefill_tps']:.1f}", f"{s['ttft_s'] * 1e3:.1f}", f"{s['decode_tps']:.2f}", f"{s['e2e_tps']:.2f}", f"{s['decode_ratio_vs_baseline']:.2f}x"]
            if has_cost:
                row.append(f"{s['usd_per_million_tokens']:.3f}")
            rows.append(row)
        console.print(_table(f"generation speed (batch {s0['batch']}, {s0['prompt_tokens']} prompt + {s0['new_tokens']} new tokens, greedy, "
                             f"median of {s0['runs']} interleaved runs after warm-up)", cols, rows))
    rows = [[k, _gb(v["weights_in_memory_bytes"]), _gb(v["checkpoint_bytes"])] for k, v in models.items()]
    console.print(_table(f"memory (process peak RSS {_gb(r['peak_rss_bytes'])})", ["model", "weights in memory", "checkpoint on disk"], rows))


def cmd_profile(a) -> dict:
    from .evaluation.profile import roofline
    from .evaluation.speed import hf_generator, measure_speed, protocol_prompts

    model, tok = _load(a.model, a.dtype, a.trust_remote_code)
    prompts = protocol_prompts(tok, 1, a.prompt_tokens)
    sp = measure_speed(hf_generator(model, tok), prompts, a.new_tokens, a.runs, progress=not a.json)
    rep = roofline(model, sp.decode_tps, context=a.prompt_tokens + a.new_tokens // 2)
    return {"model": a.model, **rep.to_dict(), "speed": sp.to_dict()}


def show_profile(r: dict, console) -> None:
    m = r["machine"]
    rows = [
        ["machine", f"{m['cpu']}, {m['cores']} cores, {m['torch_threads']} threads, torch {m['torch']}"],
        ["memory read bandwidth", f"{r['bandwidth_gbs']:.1f} GB/s"],
        [f"matmul throughput ({r['dtype']})", f"{r['matmul_gflops']:.1f} GFLOP/s"],
        ["weight bytes read per token", _gb(r["weight_bytes"])],
        ["KV-cache bytes read per token", f"{r['kv_bytes'] / 1e6:.2f} MB"],
        ["FLOPs per token", f"{r['flops_per_token'] / 1e9:.3f} GFLOP"],
        ["arithmetic intensity", f"{r['arithmetic_intensity']:.2f} FLOP/byte (machine balance {r['machine_balance']:.1f})"],
        ["memory-bandwidth limit", f"{r['memory_limit_tps']:.1f} tok/s"],
        ["compute limit", f"{r['compute_limit_tps']:.1f} tok/s"],
        ["measured decode (batch 1, transformers generate)", f"{r['measured_decode_tps']:.2f} tok/s"],
        ["fraction of bandwidth limit", f"{r['fraction_of_bandwidth_limit']:.1%}"],
        ["verdict", r["verdict"]],
    ]
    console.print(_table(f"leanlm profile {r['model']} (batch-1 decode roofline)", ["quantity", "value"], rows))


def _cmd_quantize_onnx(a) -> dict:
    """`leanlm quantize MODEL.onnx --scheme int8-dynamic|int8-static|int4-weight --out OUT.onnx` (onnxruntime)."""
    from .export.onnx_in import quantize_onnx

    from .evaluation.memory import checkpoint_bytes

    if a.rotate:
        raise LeanLMError("--rotate folds a rotation into a PyTorch model's weights; quantize the Hugging Face model (then export "
                          "to onnx) instead of an .onnx file")
    tok = None
    if a.scheme == "int8-static" and a.tokenizer:
        tok = _load(a.tokenizer, "float32", a.trust_remote_code)[1]
    out = quantize_onnx(a.model, a.out, scheme=a.scheme, tokenizer=tok, samples=a.samples, seq_len=a.seq_len,
                        overwrite=a.overwrite, progress=not a.json)
    return {"model": a.model, "scheme": a.scheme, "out": str(out), "onnx": True, "bytes": checkpoint_bytes(out)}


def cmd_quantize(a) -> dict:
    if a.model.endswith(".onnx"):
        return _cmd_quantize_onnx(a)
    from .evaluation.memory import checkpoint_bytes
    from .quantization import summary
    from .recipe import QuantizeStep

    step = QuantizeStep(scheme=a.scheme, config=a.config, mixed=a.mixed, menu=a.menu, cost=a.cost, mixed_algorithm=a.mixed_algorithm, kv_cache=a.kv_cache, samples=a.samples,
                        seq_len=a.seq_len, calib=a.calib, gptq_bf16=a.gptq_bf16, eval=a.eval, max_memory=a.max_memory,
                        rotate=a.rotate)
    s, res = _one_step(a, step)
    f = res.figures
    r = {"model": a.model, "scheme": a.scheme or a.config or f"mixed {a.mixed} bits", "out": a.out, "mixed": f.get("mixed"),
         "calib_seconds": f["calib_seconds"], "average_bits": f["average_bits"], "layers": summary(s.model) if s else [],
         **{k: f[k] for k in ("max_memory_bytes", "peak_rss_bytes", "estimated_bytes") if k in f}}
    if a.eval:
        q, base = f["perplexity_quantized"], f["perplexity_float"]
        r["perplexity"] = {"float": base, "quantized": q, "increase": q / base - 1}
    r["checkpoint_bytes"] = checkpoint_bytes(a.out)
    return r


def show_quantize(r: dict, console) -> None:
    from collections import Counter

    if r.get("onnx"):
        return console.print(f"leanlm quantize {r['model']} --scheme {r['scheme']} -> {r['out']} ({_gb(r['bytes'])}, onnxruntime)")

    groups = Counter((row["role"], row["format"], row["mode"]) for row in r["layers"])
    rows = [[role, fmt, mode, n] for (role, fmt, mode), n in sorted(groups.items())]
    if rows:   # an offloaded run reports figures only (its model was never whole in memory)
        console.print(_table(f"leanlm quantize {r['model']} --scheme {r['scheme']} -> {r['out']}", ["tensor", "format", "mode", "quantizers"], rows))
    if r.get("mixed"):
        m = r["mixed"]
        t = m.get("search_seconds", {})
        console.print(f"mixed precision ({m.get('cost', 'bits')} cost, {m.get('algorithm', 'gptq')}): budget {m['budget']} -> "
                      f"{m['average_bits']:.3f} bits/weight; search {sum(t.values()):.1f} s; "
                      + ", ".join(f"{f}: {n} layers" for f, n in sorted(Counter(m["choice"].values()).items())))
    console.print(f"calibration {r['calib_seconds']:.1f} s; average {r['average_bits']:.2f} bits per linear weight; "
                  f"checkpoint {_gb(r['checkpoint_bytes'])}; per-layer details: --json")
    _show_memory(r, console)
    if "perplexity" in r:
        p = r["perplexity"]
        console.print(f"perplexity: float {p['float']:.4f} -> quantized {p['quantized']:.4f} ({p['increase']:+.2%})")


def _show_memory(r: dict, console) -> None:
    if "peak_rss_bytes" in r:
        console.print(f"offloaded, block by block: peak resident memory {_gb(r['peak_rss_bytes'])} (measured by the OS) "
                      f"of the --max-memory budget {_gb(r['max_memory_bytes'])} (estimated need {_gb(r['estimated_bytes'])})")


def cmd_export(a) -> dict:
    from .recipe import ExportStep

    _, res = _one_step(a, ExportStep(to=a.to, quant=a.quant))
    return {"model": a.model, "format": a.to, **res.figures, "out": a.out}


def show_export(r: dict, console) -> None:
    line = f"leanlm export {r['model']} --to {r['format']} -> {r['out']} ({_gb(r['bytes'])})"
    if r["format"] == "gguf":
        types = ", ".join(f"{k}: {v}" for k, v in sorted(r["tensor_types"].items()))
        line += "".join(f"\n{x}" for x in [f"{r['quant']}: tensors {types}"] + r["notes"])
    console.print(line)


def _cmd_sparsify(a) -> dict:
    """`leanlm sparsify MODEL --method wanda --sparsity 0.5 [--pattern 2:4] --out DIR`: thin over leanlm.sparsity."""
    from .recipe import SparsifyStep
    from .sparsity import sparsity_report

    rules = []
    for r in a.rule or []:
        pat, sep, val = r.rpartition("=")
        if not sep or not pat:
            raise LeanLMError(f"--rule {r!r} is not GLOB=VALUE; e.g. --rule '*down_proj=0.3', '*.layers.0.*=dense', '*mlp*=2:4'")
        if val.strip().lower() == "dense":
            rules.append((pat, None))
        else:
            try:
                rules.append((pat, float(val)))
            except ValueError:
                rules.append((pat, val))
    step = SparsifyStep(a.method, sparsity=a.sparsity, pattern=a.pattern, rules=rules, samples=a.samples, seq_len=a.seq_len,
                        calib=a.calib, eval=a.eval, max_memory=a.max_memory)
    s, res = _one_step(a, step)
    f = res.figures
    r = {"model": a.model, "method": a.method, "pattern": f["pattern"], "out": a.out, "seconds": f["seconds"],
         "overall": f["overall"], "layers": sparsity_report(s.model) if s else [],
         **{k: f[k] for k in ("max_memory_bytes", "peak_rss_bytes", "estimated_bytes", "masked_linears") if k in f}}
    if a.eval:
        p, base = f["perplexity_sparse"], f["perplexity_dense"]
        r["perplexity"] = {"dense": base, "sparse": p, "increase": p / base - 1}
    return r


def _show_sparsify(r: dict, console) -> None:
    masked = [x for x in r["layers"] if x["masked"]]
    rows = [[x["name"], "x".join(map(str, x["shape"])), f"{x['mask_sparsity']:.1%}", f"{x['zeros']:.1%}", x["nm"] or "-"]
            for x in masked[:14]]
    if len(masked) > 14:
        rows.append([f"... {len(masked) - 14} more (--json)", "", "", "", ""])
    console.print(_table(f"leanlm sparsify {r['model']} --method {r['method']} ({r['pattern']}) -> {r['out']}",
                         ["linear", "shape", "mask sparsity", "zeros", "n:m"], rows))
    o = r["overall"]
    console.print(f"{r.get('masked_linears', len(masked))} Linears sparsified in {r['seconds']:.1f} s: {o['masked_zero_fraction']:.1%} zeros in them, "
                  f"{o['linear_zero_fraction']:.1%} of all Linear weights (the head stays dense). Weights stay dense "
                  "tensors with zeros: no CPU sparse kernel beats dense matmul (docs/sparsity.md).")
    _show_memory(r, console)
    if "perplexity" in r:
        p = r["perplexity"]
        console.print(f"perplexity: dense {p['dense']:.4f} -> sparse {p['sparse']:.4f} ({p['increase']:+.2%})")


def cmd_draft(a) -> dict:
    from .recipe import DraftStep

    head = a.method in ("eagle", "medusa")
    budget = a.budget or ("30m" if head else "5m")
    batch = a.batch or (8 if head else 4)
    _, res = _one_step(a, DraftStep(layers=a.layers, budget=budget, tokens=a.tokens, seq_len=a.seq_len, batch=batch, lr=a.lr,
                                    calib=a.calib, method=a.method, draft_vocab=a.draft_vocab, samples=a.samples,
                                    corpus_share=a.corpus_share, heads=a.heads))
    return {"model": a.model, **res.figures, "out": a.out, "layers": a.layers}


def cmd_qat(a) -> dict:
    from .evaluation.memory import checkpoint_bytes
    from .recipe import QATStep

    if a.model.endswith(".onnx"):
        raise LeanLMError("QAT trains PyTorch models through fake quantization; an ONNX graph has no such path. "
                          "Pass the Hugging Face model (or a folder written by leanlm quantize) instead")
    step = QATStep(budget=a.budget, scheme=a.scheme, teacher=a.teacher, learn_scales=a.learn_scales, scale_lr_mult=a.scale_lr_mult,
                   train=a.train, compile=a.compile, lm_weight=a.lm_weight, kl_weight=a.kl_weight, temperature=a.temperature,
                   hidden_layers=a.hidden_layers, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum,
                   bf16=a.bf16, text=a.text, samples=a.samples, calib_seq_len=a.calib_seq_len, eval_every=a.eval_every,
                   eval_windows=a.eval_windows, checkpoint_dir=a.checkpoint_dir, resume=not a.no_resume, seed=a.seed)
    _, res = _one_step(a, step)
    return {"model": a.model, "scheme": a.scheme, "teacher": a.teacher, "out": a.out, **res.figures,
            "checkpoint_bytes": checkpoint_bytes(a.out)}


def show_qat(r: dict, console) -> None:
    from .qat.cli import show_qat as show

    show(r, console)


def cmd_serve(a) -> dict:
    from .serving.cli import run_serve

    return run_serve(a, _load)


def _show_serve(r: dict, console) -> None:
    from .serving.cli import show_serve

    show_serve(r, console)


def _show_speculative(name):
    def show(r, console):
        from .speculative import cli as spec_cli

        getattr(spec_cli, name)(r, console)

    return show


def _generate_runtime(a) -> dict:
    import time

    import torch

    from .runtime import Engine

    model, tok = _load(a.model, "float32", a.trust_remote_code)
    if tok is None:
        raise LeanLMError("this model has no tokenizer; generate needs one to read --prompt")
    ids = torch.tensor([tok(a.prompt, return_attention_mask=False)["input_ids"]], dtype=torch.long)
    if ids.shape[1] == 0:
        raise LeanLMError("--prompt is empty after tokenization; give some text")
    eng = Engine(model, a.weights, group_size=a.group_size, head=a.head, max_seq_len=a.max_seq_len or ids.shape[1] + a.max_new_tokens,
                 compile=a.compile, allow_fallback=a.allow_fallback, device=a.device)
    # compile (and build the kernels) before the clock starts: compile time is reported on its own
    compile_s = eng.warmup(ids.shape[1], a.max_new_tokens) if a.compile else None
    ticks: list[float] = []
    t0 = time.perf_counter()
    out = eng.generate(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                       eos_token_id=None if a.no_stop else tok.eos_token_id, on_token=lambda: ticks.append(time.perf_counter()))
    new = out[0, ids.shape[1]:]
    dec = (len(ticks) - 1) / (ticks[-1] - ticks[0]) if len(ticks) > 1 else None
    return {"model": a.model, "weights": eng.model.weights, "head": eng.model.head_format, "compiled": a.compile, "compile_s": compile_s, "kernels": eng.kernels,
            "weight_bytes": eng.weight_bytes(), "fallbacks": eng.fallbacks, "prompt_tokens": ids.shape[1],
            "new_tokens": int(new.numel()), "ttft_s": ticks[0] - t0 if ticks else None, "decode_tps": dec,
            "text": tok.decode(new, skip_special_tokens=True)}


def _show_runtime(r: dict, console) -> None:
    print(r["text"])
    dec = f"{r['decode_tps']:.1f} tok/s decode" if r["decode_tps"] else "-"
    fb = f"; FALLBACK: {'; '.join(sorted(set(r['fallbacks'])))}" if r["fallbacks"] else ""
    comp = f"; compiled in {r['compile_s']:.1f} s (not counted)" if r.get("compile_s") is not None else ""
    print(f"[{r['weights']} weights, head {r['head']}, {_gb(r['weight_bytes'])} packed, kernels {r['kernels']}; {r['new_tokens']} tokens, "
          f"first after {r['ttft_s'] * 1e3:.0f} ms, {dec}{comp}{fb}]", file=sys.stderr)


def cmd_generate(a) -> dict:
    """Runtime engine decoding; with --draft / --prompt-lookup, lossless speculative decoding with the
    same engine as the target (the draft model, if any, runs through transformers)."""
    if a.draft is None and not a.prompt_lookup:
        if a.num_draft is not None or a.adaptive or a.chat or a.tree is not None:
            raise LeanLMError("--num-draft, --adaptive, --tree and --chat go with --draft DRAFT or --prompt-lookup")
        return _generate_runtime(a)
    if a.device != "cpu":
        raise LeanLMError("speculative decoding runs on the CPU; drop --device or drop --draft / --prompt-lookup")
    from .runtime import Engine
    from .speculative.cli import run_generate

    a.dtype, a.no_eos_stop = "float32", a.no_stop
    a.top_k, a.top_p, a.seed = a.top_k or 0, 1.0 if a.top_p is None else a.top_p, a.seed or 0
    return run_generate(a, _load, make_target=lambda m: Engine(m, a.weights, group_size=a.group_size, head=a.head,
                                                               max_seq_len=a.max_seq_len or 4096, allow_fallback=a.allow_fallback))


def show_generate(r: dict, console) -> None:
    if "mode" in r:
        from .speculative.cli import show_generate as show

        return show(r, console)
    _show_runtime(r, console)


def _train_options(a) -> dict:
    return dict(lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum, bf16=a.bf16, temperature=a.temperature,
                lm_weight=a.lm_weight, hidden_pairs=a.hidden_pairs, text=a.text, eval_windows=a.eval_windows,
                eval_every=a.eval_every, checkpoint_dir=a.checkpoint_dir)


def cmd_prune(a) -> dict:
    from .evaluation.memory import checkpoint_bytes
    from .recipe import PruneStep

    step = PruneStep(target_params=a.target_params, hidden=a.hidden, intermediate=a.intermediate, heads=a.heads, kv_heads=a.kv_heads,
                     layers=a.layers, axes=a.axes, samples=a.samples, depth_metric=a.depth_metric, multiple_of=a.multiple_of, distill_minutes=a.distill_minutes,
                     distill_tokens=a.distill_tokens, eval=a.eval, **_train_options(a))
    _, res = _one_step(a, step)
    f = res.figures
    r = {"model": a.model, "out": a.out, "prune": {k: f[k] for k in ("from", "to", "params_before", "params_after")},
         **{k: v for k, v in f.items() if k.startswith("perplexity_") or k == "distill"}}
    r["checkpoint_bytes"] = checkpoint_bytes(a.out)
    return r


def show_prune(r: dict, console) -> None:
    p = r["prune"]
    rows = [[k, p["from"][k], p["to"][k]] for k in p["from"]]
    rows.append(["parameters", f"{p['params_before']:,}", f"{p['params_after']:,}"])
    console.print(_table(f"leanlm prune {r['model']} -> {r['out']} ({_gb(r['checkpoint_bytes'])})", ["dimension", "before", "after"], rows))
    if "distill" in r and r["distill"]:
        d = r["distill"]
        console.print(f"distilled {d['steps']} steps, {d['tokens']:,} tokens, {d['seconds'] / 60:.1f} min")
    ppl = [(k, r[f"perplexity_{k}"]) for k in ("original", "pruned", "distilled") if f"perplexity_{k}" in r]
    if ppl:
        console.print("held-out perplexity (40 x 512): " + ", ".join(f"{k} {v:.3f}" for k, v in ppl))


def cmd_distill(a) -> dict:
    from .recipe import DistillStep

    _, res = _one_step(a, DistillStep(teacher=a.teacher, minutes=a.minutes, tokens=a.tokens, **_train_options(a)))
    return {"model": a.model, "teacher": a.teacher, "out": a.out, "distill": res.figures}


def cmd_run(a) -> dict:
    """`leanlm run RECIPE.yaml --out DIR`: the steps of a recipe, validated first, resumable."""
    from rich.console import Console

    from .recipe import Recipe

    recipe = Recipe.from_file(a.recipe)
    if a.model:
        recipe.model = a.model
    results = recipe.run(a.out, overwrite=a.overwrite, progress=not a.json, console=None if a.json else Console(stderr=True))
    return {"recipe": a.recipe, "model": recipe.model, "out": a.out, "steps": [vars(r) for r in results]}


def show_run(r: dict, console) -> None:
    from .recipe import brief_figures

    rows = [[f"{i}. {x['step']}", f"{x['seconds']:.1f}", brief_figures(x["figures"])] for i, x in enumerate(r["steps"], 1)]
    console.print(_table(f"leanlm run {r['recipe']} ({r['model']}) -> {r['out']}", ["step", "seconds", "figures"], rows))


def show_distill(r: dict, console) -> None:
    d = r["distill"]
    console.print(f"leanlm distill {r['model']} (teacher {r['teacher']}) -> {r['out']}: {d['steps']} steps, {d['tokens']:,} tokens, "
                  f"{d['seconds'] / 60:.1f} min; loss {d['loss_first']:.4f} -> {d['loss_last']:.4f}; held-out perplexity "
                  f"({d['eval_windows']} x 512) {d['perplexity_start']:.3f} -> {d['perplexity_end']:.3f}")


def _calibration_args(sp, samples_help: str) -> None:
    """The calibration options `quantize` and `sparsify` share."""
    sp.add_argument("--samples", type=COUNT, default=128, help=samples_help)
    sp.add_argument("--seq-len", type=SEQ_LEN, default=512, help="tokens per calibration sequence")
    sp.add_argument("--calib", default="wiki", help="calibration text: wiki (default), news or a .txt/.jsonl file")
    sp.add_argument("--eval", action="store_true", help="report held-out perplexity before and after")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--max-memory", type=memory, metavar="SIZE", help="calibrate block by block from the checkpoint on disk "
                    "within this budget, e.g. 2GB (the whole float model is never loaded; docs/scale.md)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanlm", description="Make language models smaller, faster and cheaper to run.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("model", help="built-in name (smollm2-135m, gemma3-270m), Hugging Face folder or .gguf file")
        sp.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
        sp.add_argument("--json", action="store_true", help="print JSON instead of tables")
        sp.add_argument("--threads", type=COUNT, default=None, help="torch threads (default: all cores)")
        sp.add_argument("--trust-remote-code", action="store_true", help="allow a local folder's own model code to run")

    sp = sub.add_parser("info", help="architecture, size and dtype of a model")
    common(sp)
    sp = sub.add_parser("eval", help="perplexity and generation speed (PROTOCOL.md)")
    common(sp)
    sp.add_argument("--ppl", action="store_true", help="held-out perplexity")
    sp.add_argument("--speed", action="store_true", help="generation speed (default: both)")
    sp.add_argument("--compare", help="a second model to measure side by side (ratios vs the first)")
    sp.add_argument("--compare-dtype", help="dtype of the second model (default: --dtype)")
    sp.add_argument("--source", default="wiki", help="wiki (default), news, or a .txt/.jsonl file")
    sp.add_argument("--window", type=SEQ_LEN, default=512, help="tokens per perplexity window")
    sp.add_argument("--windows", type=COUNT0, default=40, help="number of windows (0 = all)")
    sp.add_argument("--batch", type=COUNT, default=1, help="sequences generated at once")
    sp.add_argument("--prompt-tokens", type=COUNT, default=128, help="prompt length of the speed test")
    sp.add_argument("--new-tokens", type=COUNT, default=128, help="tokens generated per run")
    sp.add_argument("--runs", type=COUNT, default=5, help="timed runs (the median is reported)")
    sp.add_argument("--warmup", type=COUNT0, default=1, help="untimed warm-up runs")
    sp.add_argument("--price-per-hour", type=POSITIVE, default=None, help="machine price in $/hour, for cost per 1M tokens")
    sp.add_argument("--engine", choices=["auto", "hf", "leanlm", "both"], default="auto",
                    help="what --speed times: auto (default: the leanlm runtime for the families it runs, else transformers, "
                         "with a note), hf (transformers' generate), leanlm, or both side by side")
    sp.add_argument("--weights", default=None, help="leanlm engine weights: fp32, bf16 (default), int8, int4, w8a8")
    sp.add_argument("--compile", action="store_true", help="leanlm engine: torch.compile the decode step")
    sp.add_argument("--head", default=None, choices=("auto", "dense", "bf16", "fp32", "int8", "int4"),
                    help="leanlm engine output head: auto (default: int8 under int8/int4 weights, else the compute dtype), dense, bf16, fp32, int8, int4")
    sp.add_argument("--allow-fallback", action="store_true", help="leanlm engine: run formats without a fast kernel as dense weights")
    from .speculative.cli import speculation_args

    sp = sub.add_parser("generate", help="generate text with the leanlm runtime (packed low-bit weights); --draft or "
                        "--prompt-lookup for lossless speculative decoding")
    sp.add_argument("model", help="built-in name, Hugging Face folder, .gguf file, or a folder written by leanlm quantize")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=COUNT, default=64, help="tokens to generate")
    sp.add_argument("--weights", default=None, help="fp32, bf16 (default), int8, int4 or w8a8; a leanlm-quantized model packs its own formats")
    sp.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=64, help="int4 group size")
    sp.add_argument("--head", default=None, choices=("auto", "dense", "bf16", "fp32", "int8", "int4"),
                    help="output head format: auto (default: int8 under int8/int4 weights, else the compute dtype), dense, bf16, fp32, int8, int4")
    sp.add_argument("--max-seq-len", type=COUNT, default=None, help="KV-cache size (default: prompt + new tokens)")
    sp.add_argument("--temperature", type=NONNEG, default=0.0, help="0 = greedy (default)")
    sp.add_argument("--top-k", type=COUNT, default=None, help="sample from the k most likely tokens")
    sp.add_argument("--top-p", type=PROBABILITY, default=None, help="sample from the smallest set of tokens with this probability")
    sp.add_argument("--seed", type=SEED, default=None, help="sampling seed")
    sp.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    sp.add_argument("--allow-fallback", action="store_true", help="run formats without a fast kernel as dense weights (reported)")
    sp.add_argument("--device", type=device, default="cpu", help="cpu (default) or cuda[:N]: run the packed model on a GPU "
                    "(PyTorch's CUDA kernels; not with --draft or --prompt-lookup)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.add_argument("--threads", type=COUNT, default=None, help="torch threads (default: all cores)")
    sp.add_argument("--trust-remote-code", action="store_true")
    speculation_args(sp)
    sp = sub.add_parser("quantize", help="post-training quantization with a preset or a JSON config")
    common(sp)
    sp.add_argument("--scheme", help="preset name, e.g. w4a16 (the best measured int4 weight-only algorithm), w4a16-gptq, w8a8-smoothquant, fp8, nvfp4; for a .onnx model: int8-dynamic, int8-static or int4-weight")
    sp.add_argument("--config", help="a JSON QuantConfig (rules + algorithms) instead of --scheme")
    sp.add_argument("--mixed", type=BITS, metavar="BITS", help="mixed precision: average bits per weight budget (then --mixed-algorithm)")
    sp.add_argument("--menu", help="comma-separated formats the mixed-precision search chooses from "
                    "(default: leanlm.quantization.mixed.MENU, listed in docs/quantization.md)")
    sp.add_argument("--cost", choices=["bits", "bytes", "latency"], default="bits", help="mixed precision's cost model: bits per weight "
                    "(default), bytes as the runtime stores them, or measured matmul latency on this machine (docs/quantization.md)")
    sp.add_argument("--mixed-algorithm", choices=["awq", "gptq", "rtn"], default="awq", help="mixed precision: the algorithm that "
                    "calibrates the chosen formats (default awq)")
    sp.add_argument("--out", required=True, help="output folder (written atomically)")
    sp.add_argument("--kv-cache", choices=["int8", "fp8"], help="also quantize the KV cache")
    sp.add_argument("--gptq-bf16", action="store_true", help="GPTQ: run the calibration forwards in bfloat16 (faster on CPUs "
                    "with AVX512-BF16/AMX, slightly worse result; see docs/quantization.md)")
    sp.add_argument("--rotate", choices=["hadamard", "hadamard-fold"], help="fold a Hadamard rotation into the model first "
                    "(QuaRot; hadamard adds an online one before down_proj, which GGUF / compressed-tensors / hf cannot carry)")
    _calibration_args(sp, "calibration sequences")
    sp.add_argument("--tokenizer", help="ONNX input, int8-static: model whose tokenizer cuts the calibration text (default: the .onnx file's folder)")
    _nproc_args(sp)
    sp = sub.add_parser("profile", help="roofline analysis of batch-1 decode on this machine")
    common(sp)
    sp.add_argument("--prompt-tokens", type=COUNT, default=128, help="prompt length of the speed test")
    sp.add_argument("--new-tokens", type=COUNT, default=128, help="tokens generated per run")
    sp.add_argument("--runs", type=COUNT, default=5, help="timed runs (the median is reported)")
    sp = sub.add_parser("export", help="export to a deployment format: compressed-tensors, gguf, hf, onnx")
    common(sp)
    sp.add_argument("--to", required=True, help="compressed-tensors | gguf | hf | onnx")
    sp.add_argument("--out", required=True, help="output folder (file for gguf), written atomically")
    sp.add_argument("--quant", help="GGUF type: F16, BF16, F32, Q8_0, Q5_0, Q4_0, Q4_1, Q4_K_M (default: the one that holds "
                    "leanlm's codes exactly, F16 for float models)")
    sp.add_argument("--overwrite", action="store_true")
    sp = sub.add_parser("sparsify", help="prune weights in place: unstructured or n:m (2:4) with magnitude, wanda or sparsegpt")
    common(sp)
    sp.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    sp.add_argument("--sparsity", type=FRACTION, default=None, help="fraction of weights to zero (unstructured; default 0.5)")
    sp.add_argument("--pattern", default="unstructured", help="unstructured (default) or n:m, e.g. 2:4 (n kept of every m)")
    sp.add_argument("--rule", action="append", metavar="GLOB=VALUE",
                    help="per-layer override, later wins: a fraction, a pattern (2:4) or dense, e.g. '*.layers.0.*=dense'")
    sp.add_argument("--out", required=True, help="output folder: a Hugging Face folder plus masks and recipe (written atomically)")
    _calibration_args(sp, "calibration sequences (wanda, sparsegpt)")
    from .speculative.cli import draft_args

    sp = sub.add_parser("draft", help="build a draft for speculative decoding: a shallow distilled model (first N layers) or "
                        "an EAGLE or Medusa head (--method eagle|medusa)")
    common(sp)
    draft_args(sp)
    from .serving.cli import serve_args

    sp = sub.add_parser("serve", help="OpenAI-compatible server: continuous batching on a paged KV cache")
    common(sp)
    serve_args(sp)
    from .qat.cli import qat_args

    sp = sub.add_parser("qat", help="quantization-aware training (QAT) or distillation (QAD, --teacher) after PTQ")
    common(sp)
    qat_args(sp)
    _nproc_args(sp)

    def training(sp):
        sp.add_argument("--lr", type=POSITIVE, default=1e-4, help="learning rate")
        sp.add_argument("--batch-size", type=COUNT, default=4, help="sequences per batch")
        sp.add_argument("--seq-len", type=SEQ_LEN, default=512, help="tokens per training sequence")
        sp.add_argument("--grad-accum", type=COUNT, default=1, help="batches per optimizer step")
        sp.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast for training (default: on where the CPU/GPU has bf16 matmuls); see docs/pruning.md")
        sp.add_argument("--temperature", type=POSITIVE, default=1.0, help="distillation temperature")
        sp.add_argument("--lm-weight", type=NONNEG, default=0.0, help="weight of cross-entropy on the text (KL weight is 1)")
        sp.add_argument("--hidden-pairs", type=COUNT0, default=0,
                        help="also match N evenly spaced hidden states to the teacher's (a pruned student: the layers it was "
                             "cut from); default 0: logits only")
        sp.add_argument("--text", default="wiki", help="calibration/training text: wiki (default), news or a .txt/.jsonl file; "
                        "perplexity uses its evaluation split")
        sp.add_argument("--eval-windows", type=COUNT0, default=10, help="held-out perplexity windows at start/end of training")
        sp.add_argument("--eval-every", type=COUNT0, default=0, help="also evaluate every N steps")
        sp.add_argument("--checkpoint-dir", help="keep resumable checkpoints here (default: OUT.checkpoints, removed after success)")
        sp.add_argument("--overwrite", action="store_true")
        _nproc_args(sp)

    sp = sub.add_parser("prune", help="structured pruning to a smaller Hugging Face model (Minitron-style), optionally distilled")
    common(sp)
    sp.add_argument("--out", required=True, help="output folder (a plain transformers checkpoint, written atomically)")
    sp.add_argument("--target-params", type=size, help="parameter budget")
    sp.add_argument("--multiple-of", type=COUNT, default=64, help="chosen hidden/intermediate sizes are multiples of this, so "
                    "quantization groups and kernels fit (default 64; the hidden size also a multiple of the heads)")
    sp.add_argument("--axes", choices=["width", "depth", "both"], default="width", help="what --target-params may shrink")
    sp.add_argument("--layers", type=COUNT, help="decoder layers to keep")
    sp.add_argument("--hidden", type=COUNT, help="hidden size")
    sp.add_argument("--intermediate", type=COUNT, help="MLP intermediate size")
    sp.add_argument("--heads", type=COUNT, help="attention heads")
    sp.add_argument("--kv-heads", type=COUNT, help="key/value heads")
    sp.add_argument("--samples", type=COUNT, default=32, help="calibration sequences (of --seq-len tokens) for the importance")
    sp.add_argument("--depth-metric", choices=["ppl", "cosine"], default="ppl")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--distill-minutes", type=POSITIVE, help="then distill from the original model for this many minutes")
    g.add_argument("--distill-tokens", type=COUNT, help="then distill from the original model for this many tokens")
    sp.add_argument("--eval", action="store_true", help="held-out perplexity (40 x 512) of the original, pruned and distilled model")
    training(sp)
    sp = sub.add_parser("distill", help="distill a student model from a teacher (logit KL)")
    common(sp)
    sp.add_argument("--teacher", required=True, help="teacher model (same tokenizer)")
    sp.add_argument("--out", required=True, help="output folder (written atomically)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=POSITIVE, help="training budget in minutes")
    g.add_argument("--tokens", type=COUNT, help="training budget in tokens")
    training(sp)
    sp = sub.add_parser("run", help="run a recipe (YAML or JSON): steps chained on one model state, resumable")
    sp.add_argument("recipe", help="recipe file (.yaml, .yml or .json); see recipes/ and docs/recipes.md")
    sp.add_argument("--out", required=True, help="output folder: the final model, its manifest and the exported files")
    sp.add_argument("--model", help="override the recipe's model")
    sp.add_argument("--overwrite", action="store_true")
    sp.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sp.add_argument("--threads", type=COUNT, default=None, help="torch threads (default: all cores)")
    from .optimize.cli import optimize_args

    sp = sub.add_parser("optimize", help="search recipes and deployments for the cheapest one within a quality bound; "
                        "writes the model, recipe.yaml, trials.jsonl and report.html")
    common(sp)
    optimize_args(sp)
    return state_ranges(p)


COMMANDS = {"info": (cmd_info, show_info), "eval": (cmd_eval, show_eval), "profile": (cmd_profile, show_profile),
            "quantize": (cmd_quantize, show_quantize), "export": (cmd_export, show_export),
            "generate": (cmd_generate, show_generate), "draft": (cmd_draft, _show_speculative("show_draft")),
            "prune": (cmd_prune, show_prune), "distill": (cmd_distill, show_distill), "qat": (cmd_qat, show_qat),
            "sparsify": (_cmd_sparsify, _show_sparsify), "serve": (cmd_serve, _show_serve),
            "run": (cmd_run, show_run), "optimize": (lambda a: _optimize("cmd_optimize")(a), lambda r, c: _optimize("show_optimize")(r, c))}


def _optimize(name):
    from .optimize import cli

    return getattr(cli, name)


PARALLEL_COMMANDS = ("distill", "prune", "qat", "quantize")   # the commands --nproc / torchrun run data-parallel


def _nproc_args(sp) -> None:
    sp.add_argument("--nproc", type=COUNT, default=None,
                    help="data-parallel processes on this machine (re-launches through torch.distributed.run; "
                         "for several machines start with torchrun instead, docs/scale.md)")


def _check_nproc(a, started) -> None:
    """--nproc against torchrun's environment and the options it must divide (before any process starts)."""
    n = getattr(a, "nproc", None)
    if started.parallel and a.command not in PARALLEL_COMMANDS:
        raise LeanLMError(f"{a.command} does not run data-parallel; start it without torchrun (these do: {', '.join(PARALLEL_COMMANDS)})")
    if getattr(a, "max_memory", None) and (started.parallel or (n or 1) > 1):
        raise LeanLMError("--max-memory calibrates block by block in one process; drop --nproc / torchrun, or drop --max-memory")
    if n is None:
        return
    if started.parallel:
        raise LeanLMError(f"--nproc {n} given inside a torchrun launch of {started.size} processes; drop --nproc (torchrun "
                          "already started the processes) or start leanlm without torchrun")
    import torch

    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise LeanLMError(f"--nproc {n} exceeds the {torch.cuda.device_count()} GPUs here (one process per GPU); lower it")
    batch = getattr(a, "batch_size", None)
    if a.command != "quantize" and batch is not None and batch % n:
        raise LeanLMError(f"--batch-size {batch} does not split over --nproc {n} processes (each takes an equal share of "
                          f"every batch); use a batch size that is a multiple of {n}")
    if a.command == "quantize" and a.samples < n:
        raise LeanLMError(f"--samples {a.samples} cannot be shared by --nproc {n} processes; pass at least {n} samples")


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    return out


def _terminate(signum, frame):
    raise KeyboardInterrupt("stopped by SIGTERM")


def main(argv: list[str] | None = None) -> int:
    global _ARGS
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    run, show = COMMANDS[a.command]
    from .core import dist

    try:
        started = dist.env_world()
        _check_nproc(a, started)
        if getattr(a, "nproc", None) and a.nproc > 1:
            from .core.io import check_output

            if getattr(a, "out", None):   # once here, before the processes start
                check_output(a.out, getattr(a, "overwrite", False))
            return dist.launch(_without_nproc(argv), a.nproc)
    except LeanLMError as e:
        print("leanlm: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    # SIGTERM behaves like Ctrl-C: a KeyboardInterrupt, so every atomic write removes its temporary folder.
    old_term = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    clean = False
    try:
        from .core.io import check_output

        if getattr(a, "out", None):   # before any model is loaded
            check_output(a.out, getattr(a, "overwrite", False))
        if getattr(a, "checkpoint_dir", None):
            check_output(a.checkpoint_dir, True, "--checkpoint-dir")
        import torch

        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if started.parallel else 1   # processes sharing these cores
        torch.set_num_threads(a.threads or max(1, (os.cpu_count() or 1) // local))
        _ARGS = a
        dist.setup()
        result = run(a)
        clean = True
    except LeanLMError as e:
        print("leanlm: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"leanlm: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        _ARGS = None
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        dist.teardown(clean)
    if not started.main:   # rank 0 reports
        return 0
    from rich.console import Console

    result["command"] = "leanlm " + " ".join(argv)
    if a.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        show(result, Console(width=None if sys.stdout.isatty() else 160))
    return 0


if __name__ == "__main__":
    sys.exit(main())
