import json

import pytest
import torch

from leanlm import LeanLMError
from leanlm.core import data


def test_wiki_split_follows_protocol():
    arts = data.articles("wiki")
    calib, evl = data.calibration_texts("wiki"), data.evaluation_texts("wiki")
    assert len(calib) == 40
    assert calib + evl == arts  # first 40 calibration, all later ones evaluation, in dump order
    assert not set(calib) & set(evl)
    assert all(len(a) >= 500 for a in arts)
    assert not any(a.lower().startswith("#redirect") for a in arts)
    assert calib[0].startswith("'''Anarchism'''")


def test_news_split():
    calib, evl = data.calibration_texts("news"), data.evaluation_texts("news")
    assert len(calib) == 40 and len(calib) + len(evl) == 300
    assert not set(calib) & set(evl)


def test_user_txt_and_jsonl(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("first doc\nline two\n\nsecond doc\n\n\n")
    assert data.articles(t) == ["first doc\nline two", "second doc"]
    assert data.calibration_texts(t) == data.evaluation_texts(t)  # a user file is used whole
    j = tmp_path / "b.jsonl"
    j.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps("beta") + "\n")
    assert data.articles(j) == ["alpha", "beta"]


@pytest.mark.parametrize(
    "name,content,msg",
    [("bad.jsonl", "{not json\n", "not valid JSON"), ("bad2.jsonl", '{"txt": 1}\n', "no string 'text'"),
     ("empty.txt", "\n\n", "holds no text"), ("x.csv", "a,b", "unknown text format")],
)
def test_user_text_errors(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(LeanLMError, match=msg):
        data.articles(p)


def test_missing_text_file():
    with pytest.raises(LeanLMError, match="does not exist"):
        data.articles("/nonexistent/file.txt")


def test_calibration_batches(tiny_tokenizer, text_file):
    b = data.calibration_batches(tiny_tokenizer, n_samples=3, seq_len=16, source=text_file)
    assert b.shape == (3, 16) and b.dtype == torch.long
    stream = data.join_and_tokenize(tiny_tokenizer, data.calibration_texts(text_file))
    assert torch.equal(b.reshape(-1), stream[:48])  # consecutive, non-overlapping windows
    with pytest.raises(LeanLMError, match="calibration text has"):
        data.calibration_batches(tiny_tokenizer, n_samples=10_000, seq_len=512, source=text_file)


def test_calibration_and_eval_windows_never_overlap(tiny_tokenizer):
    calib = data.join_and_tokenize(tiny_tokenizer, data.calibration_texts("news"))
    evl = data.join_and_tokenize(tiny_tokenizer, data.evaluation_texts("news"))
    assert calib.numel() > 0 and evl.numel() > 0
    assert "\n\n".join(data.calibration_texts("news")) not in "\n\n".join(data.evaluation_texts("news"))
