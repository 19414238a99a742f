"""How much of a decoder layer's output MSE sits on the first position (the attention sink) after round to nearest.

Feeds each chosen layer of SmolLM2-135M its float inputs (8 x 512 calibration tokens), runs the float layer and the
`w4a16-rtn` layer, and reports the share of the squared output error at position 0 and at positions 0-3. This is
the evidence behind trying (and dropping) a per-token relative loss in AutoRound (docs/quantization.md).

    python bench/sink_loss_share.py [--layers 2,10,20,28]
"""

from __future__ import annotations

import argparse
import copy

import torch
from common import md_table, setup_threads, write_results

import leanlm
from leanlm.core.data import calibration_batches


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="2,10,20,28")
    a = ap.parse_args()
    setup_threads()
    model, tok = leanlm.load("smollm2-135m")
    ids = calibration_batches(tok, 8, 512)
    q = copy.deepcopy(model)
    leanlm.quantize(q, "w4a16-rtn", ids, progress=False)
    rows = []
    for li in (int(x) for x in a.layers.split(",")):
        got = {}
        h = model.model.layers[li].register_forward_hook(
            lambda m, args, kw, out: got.update(args=args, kw=kw, y=out[0] if isinstance(out, tuple) else out), with_kwargs=True)
        with torch.no_grad():
            model(ids)
            h.remove()
            yq = q.model.layers[li](*got["args"], **got["kw"])
        yq = yq[0] if isinstance(yq, tuple) else yq
        e = (yq - got["y"]).pow(2).mean(-1)
        norm = got["y"].norm(dim=-1)
        rows.append([li, f"{(e[:, 0].sum() / e.sum()).item():.1%}", f"{(e[:, :4].sum() / e.sum()).item():.1%}",
                     f"{norm[:, 0].mean().item():.1f}", f"{norm[:, 1:].mean().item():.1f}"])
    md = ("# Share of a layer's output MSE at the attention-sink position (SmolLM2-135M, w4a16-rtn, float inputs)\n\n"
          + md_table(["layer", "share at position 0", "share at positions 0-3", "|y| at position 0", "|y| elsewhere"], rows))
    print(write_results("sink_loss_share", {"rows": rows}, md).read_text())


if __name__ == "__main__":
    main()
