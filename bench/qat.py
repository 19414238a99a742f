"""QAT and QAD on SmolLM2-135M (PROTOCOL.md): held-out perplexity (40 x 512 tokens of the wiki evaluation
split and of the news domain) of float32, PTQ (the scheme's own calibration algorithm), QAT (LM loss) and
QAD (KL to the float model) at the same token budget, and the fraction of the PTQ perplexity gap each
closes on each text. Training reads the wiki calibration split only, so the news columns show how much of
the gain carries to a domain training never saw.

The budget is given in tokens so that the result does not depend on the machine's load. Its
conversion from minutes: `--measure` runs a few QAD optimizer steps and reports tokens/s, both by
wall time and by the process's CPU time divided by the thread count (what the same work takes on
a quiet machine with that many cores); `--tokens` is then that rate times 600 s, rounded to whole
optimizer steps. QAT gets the same token count (it is cheaper per token: no teacher forward).

    python bench/qat.py --measure                                    # tokens/s of QAD (a few steps)
    python bench/qat.py --tokens 245760 --schemes w3a16-gptq,w4a8    # the table
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches, calibration_texts, evaluation_texts, join_and_tokenize
from leanlm.distill import DistillConfig
from leanlm.distill.trainer import fast_bf16
from leanlm.evaluation import perplexity
from leanlm.qat import QATConfig, default_train_config, qat


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="w3a16-gptq,w4a8")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens for QAT and QAD (the 10-minute conversion)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="instead of --tokens: QAD trains for this many wall minutes, then QAT for the tokens QAD reached")
    ap.add_argument("--measure", action="store_true", help="only measure QAD tokens/s (a few steps) and exit")
    ap.add_argument("--measure-steps", type=int, default=3)
    ap.add_argument("--measure-scheme", default="w4a16-rtn", help="scheme for --measure (no calibration algorithm, so it starts at once)")
    ap.add_argument("--samples", type=int, default=32, help="PTQ calibration sequences of 512 tokens (as bench/ptq.py)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--learn-scales", type=int, default=1, help="1: learn weight scales (LSQ), 0: keep the calibrated ones")
    ap.add_argument("--scale-lr-mult", type=float, default=10.0)
    ap.add_argument("--lm-weight", type=float, default=0.0, help="QAD: LM loss weight next to the KL")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bfloat16 autocast in training (default: the trainer's choice, on with AVX512-BF16/AMX)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile'd fake quantization (default: on where torch.compile works; its compile time counts in the budget)")
    ap.add_argument("--modes", default="qad,qat")
    ap.add_argument("--name", default="qat")
    a = ap.parse_args()
    setup_threads()
    threads = torch.get_num_threads()
    model, tok = leanlm.load("smollm2-135m")
    model.eval()
    train_ids = join_and_tokenize(tok, calibration_texts("wiki"))
    eval_ids = join_and_tokenize(tok, evaluation_texts("wiki"))
    news_ids = join_and_tokenize(tok, evaluation_texts("news"))
    calib = calibration_batches(tok, a.samples, 512)
    qcfg = QATConfig(learn_scales=bool(a.learn_scales), scale_lr_mult=a.scale_lr_mult, compile=a.compile)
    compiled = qcfg.use_compile("cpu")
    dcfg = DistillConfig(lm_weight=a.lm_weight)

    def tcfg(tokens, minutes=None):
        return default_train_config(max_tokens=tokens, max_minutes=minutes, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, grad_accum=a.grad_accum, autocast_bf16=a.bf16,
                                    warmup_steps=min(5, max(1, (tokens or 10**9) // tps // 10)))

    def ppl(m):
        """(wiki, news) held-out perplexity."""
        return tuple(perplexity(m, ids=i, max_windows=a.windows, progress=False).perplexity for i in (eval_ids, news_ids))

    def ptq(scheme):
        m = copy.deepcopy(model)
        leanlm.quantize(m, scheme, calib, progress=False)
        return m

    schemes = a.schemes.split(",")
    tps = a.batch_size * a.seq_len * a.grad_accum
    if a.measure:
        q = ptq(a.measure_scheme)
        t0, c0 = time.perf_counter(), time.process_time()
        res = qat(q, None, tokenizer=tok, teacher=model, config=qcfg, distill=dcfg, train_config=tcfg(tps * a.measure_steps),
                  train_data=train_ids, evaluate=False, progress=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        import resource

        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        steps = res.train.steps
        rate_wall, rate_cpu = res.train.tokens / wall, res.train.tokens / (cpu / threads)
        per10 = int(rate_cpu * 600) // tps * tps
        print(f"QAD {a.measure_scheme}: {steps} steps of {tps} tokens in {wall:.1f} s wall, {cpu:.1f} s CPU on {threads} threads, "
              f"load {os.getloadavg()[0]:.1f}: {rate_wall:.0f} tok/s by wall time, {rate_cpu:.0f} tok/s by CPU time / threads; "
              f"10 minutes = {per10} tokens ({per10 // tps} steps); peak RSS {peak_gb:.1f} GB")
        return
    if (a.tokens is None) == (a.minutes is None):
        raise SystemExit("give --tokens N or --minutes M (run --measure first for the 10-minute conversion)")
    if a.minutes is not None and not a.modes.startswith("qad"):
        raise SystemExit("--minutes times QAD and gives QAT its token count: --modes must start with qad")
    base, base_n = ppl(model)
    print(f"float32 {base:.4f} (news {base_n:.4f})", flush=True)
    rows, data = [], {"float32": base, "float32_news": base_n, "tokens": a.tokens, "minutes": a.minutes, "tokens_per_step": tps, "lr": a.lr, "learn_scales": bool(a.learn_scales),
                      "scale_lr_mult": a.scale_lr_mult, "lm_weight": a.lm_weight, "compiled_fake_quant": compiled, "samples": a.samples, "windows": a.windows,
                      "threads": threads, "schemes": {}}

    def write():
        table = md_table(["scheme", "method", "wiki perplexity", "vs float32", "PTQ gap closed", "news perplexity", "vs float32",
                          "news gap closed", "train tokens", "train s (wall)",
                          "quiet-machine minutes (CPU s / threads / 60)", "load"], rows)
        md = (f"# QAT and QAD, SmolLM2-135M\n\nHeld-out perplexity on {a.windows} x 512 tokens of the wiki evaluation split (float32 "
              f"{base:.4f}) and of the news domain (float32 {base_n:.4f}); training never reads either. PTQ: the preset's own algorithm on {a.samples} x 512 wiki calibration tokens. QAT (LM loss) and QAD "
              f"(KL to the float32 model{', plus LM loss x ' + str(a.lm_weight) if a.lm_weight else ''}) start from the PTQ model "
              f"and train on the wiki calibration split for the same number of tokens: "
              + (f"{a.tokens:,} ({a.tokens // tps} steps" if a.tokens else f"QAD for {a.minutes:g} wall minutes, QAT for the tokens QAD reached (steps")
              + f" of {a.grad_accum} x {a.batch_size} x {a.seq_len}), AdamW lr {a.lr}, cosine, "
              f"{'bf16 autocast' if (fast_bf16(torch.device('cpu')) if a.bf16 is None else a.bf16) else 'float32'}, {'learned (LSQ) scales, x' + str(a.scale_lr_mult) + ' lr' if a.learn_scales else 'calibrated scales kept'}, "
              f"{'fused (torch.compile) fake quantization, compile time included' if compiled else 'eager fake quantization'}, all parameters training (lm_head stays float as in the presets). Gap closed = (PTQ - method) / (PTQ - float32). "
              f"'train s' is wall time at the load shown (1-minute load average; about 2 is this job alone on 2 cores); the quiet-machine "
              f"estimate is the process's CPU time over its {threads} threads.\n\n{table}")
        write_results(a.name, data, md)

    for scheme in schemes:
        t0 = time.perf_counter()
        start = ptq(scheme)
        ptq_s = time.perf_counter() - t0
        p_ptq, n_ptq = ppl(start)
        d = data["schemes"][scheme] = {"ptq": p_ptq, "ptq_news": n_ptq, "ptq_seconds": ptq_s}
        print(f"{scheme} PTQ {p_ptq:.4f} (news {n_ptq:.4f}) ({ptq_s:.0f} s)", flush=True)
        rows.append([scheme, "PTQ", f"{p_ptq:.4f}", f"{p_ptq / base - 1:+.2%}", "0%", f"{n_ptq:.4f}", f"{n_ptq / base_n - 1:+.2%}", "0%", 0, f"{ptq_s:.0f} (calibration)", "-",
                     f"{os.getloadavg()[0]:.1f}"])
        write()
        budget = a.tokens
        for mode in a.modes.split(","):
            m = copy.deepcopy(start)
            teacher = model if mode == "qad" else None
            c0 = time.process_time()
            res = qat(m, None, tokenizer=tok, teacher=teacher, config=qcfg, distill=dcfg, train_config=tcfg(budget, a.minutes if budget is None else None),
                      train_data=train_ids, evaluate=False, progress=False)
            budget = res.train.tokens   # with --minutes, QAT gets the tokens QAD reached
            cpu = time.process_time() - c0
            p, pn = ppl(m)
            closed, closed_n = (p_ptq - p) / (p_ptq - base), (n_ptq - pn) / (n_ptq - base_n)
            d[mode] = {"perplexity": p, "gap_closed": closed, "perplexity_news": pn, "gap_closed_news": closed_n, "steps": res.train.steps, "tokens": res.train.tokens,
                       "seconds": res.train.seconds, "cpu_seconds": cpu, "quiet_minutes_estimate": cpu / threads / 60,
                       "load": os.getloadavg()[0],
                       "loss_first5": [h["loss"] for h in res.train.history[:5]], "loss_last5": [h["loss"] for h in res.train.history[-5:]]}
            print(f"{scheme} {mode.upper()} {p:.4f} closes {closed:.1%} of the gap, news {pn:.4f} {closed_n:.1%} ({res.train.seconds:.0f} s)", flush=True)
            rows.append([scheme, mode.upper(), f"{p:.4f}", f"{p / base - 1:+.2%}", f"{closed:.1%}", f"{pn:.4f}", f"{pn / base_n - 1:+.2%}",
                         f"{closed_n:.1%}", f"{res.train.tokens:,}",
                         f"{res.train.seconds:.0f}", f"{cpu / threads / 60:.1f}", f"{os.getloadavg()[0]:.1f}"])
            write()
            del m
    print((write() or None) or open(os.path.join(os.path.dirname(__file__), "results", f"{a.name}.md")).read())


if __name__ == "__main__":
    main()
