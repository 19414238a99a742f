"""llama.cpp side of bench/decode.py, run inside bench/.venvs/llamacpp (llama-cpp-python).

Reads one JSON command per line on stdin and answers one JSON line on stdout, so the benchmark can
interleave llama.cpp runs with its own in one run:
  {"cmd": "load", "path": GGUF, "threads": 2, "n_ctx": 512}   (+ "prompt_lookup": k: llama-cpp-python's prompt-lookup drafts)
  {"cmd": "run", "prompt": [token ids], "new_tokens": 128}  -> {"tok": id} per token, then {"done": true}
Greedy (top_k=1, temperature 0), no early stop at end-of-sequence.
"""

import json
import sys

llm = None
for line in sys.stdin:
    msg = json.loads(line)
    if msg["cmd"] == "load":
        import llama_cpp

        draft = None
        if msg.get("prompt_lookup"):
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding(num_pred_tokens=msg["prompt_lookup"])
        llm = llama_cpp.Llama(model_path=msg["path"], n_threads=msg["threads"], n_threads_batch=msg["threads"],
                              n_ctx=msg["n_ctx"], n_batch=msg["n_ctx"], verbose=False, draft_model=draft)
        out = {"ok": True, "version": llama_cpp.__version__}
    elif msg["cmd"] == "run":
        llm.reset()
        n = 0
        for tok in llm.generate(msg["prompt"], top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            print(json.dumps({"tok": int(tok)}), flush=True)  # one line per token: the parent ticks on it
            n += 1
            if n == msg["new_tokens"]:
                break
        out = {"done": True}
    else:
        out = {"error": f"unknown command {msg['cmd']}"}
    print(json.dumps(out), flush=True)
