import json

from leanlm.cli import main


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_json(capsys, tiny_folder):
    code, out, _ = run(capsys, "info", str(tiny_folder), "--json")
    assert code == 0
    r = json.loads(out)
    assert r["facts"]["layers"] == 2 and r["facts"]["tied_embeddings"] is True
    assert r["checkpoint_bytes"] > 0 and r["command"].startswith("leanlm info")


def test_info_table(capsys, tiny_folder):
    code, out, _ = run(capsys, "info", str(tiny_folder))
    assert code == 0 and "LlamaForCausalLM" in out and "hidden_size" in out


def test_eval_compare_json(capsys, tiny_folder, text_file):
    code, out, _ = run(capsys, "eval", str(tiny_folder), "--compare-dtype", "bfloat16", "--source", str(text_file),
                       "--window", "32", "--windows", "3", "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "2",
                       "--price-per-hour", "1.0", "--json")
    assert code == 0
    r = json.loads(out)
    base, other = r["models"].values()
    assert base["perplexity"]["windows"] == 3 and base["perplexity"]["increase_vs_baseline"] == 0
    assert abs(other["perplexity"]["increase_vs_baseline"]) < 0.05  # bf16 of the same weights
    assert base["speed"]["decode_ratio_vs_baseline"] == 1.0 and other["speed"]["decode_tps"] > 0
    # parameters halve; the small rotary buffer stays float32
    assert 0.5 < other["weights_in_memory_bytes"] / base["weights_in_memory_bytes"] < 0.51
    assert base["speed"]["usd_per_million_tokens"] > 0


def test_eval_table(capsys, tiny_folder, text_file):
    code, out, _ = run(capsys, "eval", str(tiny_folder), "--ppl", "--source", str(text_file), "--window", "32", "--windows", "2")
    assert code == 0 and "perplexity" in out and "(float32)" in out


def test_profile_json(capsys, tiny_folder):
    code, out, _ = run(capsys, "profile", str(tiny_folder), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["bandwidth_gbs"] > 0 and r["matmul_gflops"] > 0 and r["measured_decode_tps"] > 0
    assert r["verdict"].split("-")[0] in {"memory", "compute", "overhead"}


def test_errors_are_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "info", str(tmp_path / "missing"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("leanlm: error: unknown model")
    code, _, err = run(capsys, "eval", "smollm2-135m", "--dtype", "int7")
    assert code == 2 and "unknown dtype" in err
