"""Tokenizer: rustbpe training and tiktoken encoding equal nanochat's reference, storage, chat rendering.

Run: `.venv/bin/python -m pytest -q tests/test_tokenizer.py`
"""

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from nanojax.checkpoint import Checkpoints
from nanojax.common import UserError
from nanojax.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, cap_documents, get_tokenizer
from scripts import tok_eval, tok_train


@pytest.fixture(scope="module")
def vectors(reference_dir) -> dict:
    return json.loads((reference_dir / "tokenizer_vectors.json").read_text())


@pytest.fixture(scope="module")
def ref_tok(reference_dir, vectors) -> Tokenizer:
    return Tokenizer.from_tiktoken_file(
        reference_dir / vectors["mergeable_ranks_file"], vectors["split_pattern"], vectors["special_tokens"]
    )


def reference_text(vectors) -> str:
    """The training text the json describes, rebuilt from this Python's standard library."""
    spec = vectors["training_text"]
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / p for p in spec["files_relative_to_stdlib"]]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"this Python {sys.version.split()[0]} lacks some of the reference's stdlib files")
    text = "\n".join(p.read_text(encoding="utf-8") for p in paths)  # spec["join"] spells it escaped
    text = text[: spec["max_chars"]]
    if hashlib.sha256(text.encode()).hexdigest() != spec["sha256_utf8_of_text_used"]:
        pytest.skip(f"the stdlib of Python {sys.version.split()[0]} differs from {spec['python_version']}'s")
    return text


def check_samples(tok: Tokenizer, vectors: dict):
    for sample in vectors["samples"]:
        assert tok.encode(sample["text"]) == sample["ids"], sample["text"]
        assert tok.encode(sample["text"], prepend="<|bos|>") == sample["ids_prepend_bos"]
        assert [tok.enc.decode_single_token_bytes(i).hex() for i in sample["ids"]] == sample["token_bytes_hex"]
        assert tok.decode(sample["ids"]) == sample["text"]


def test_split_pattern_and_specials_match_reference(vectors):
    assert SPLIT_PATTERN == vectors["split_pattern"]
    assert list(vectors["special_tokens"]) == SPECIAL_TOKENS


def test_training_reproduces_reference(reference_dir, vectors, tmp_path):
    tok = Tokenizer.train([reference_text(vectors)], vectors["vocab_size"])
    ranks = (reference_dir / vectors["mergeable_ranks_file"]).read_bytes()
    assert (tok.save(tmp_path) / "tokenizer.tiktoken").read_bytes() == ranks
    assert hashlib.sha256(ranks).hexdigest() == vectors["mergeable_ranks_sha256"]
    assert tok.get_vocab_size() == vectors["vocab_size"]
    assert tok.special_tokens == vectors["special_tokens"]
    assert tok.get_bos_token_id() == vectors["bos_token_id"]
    check_samples(tok, vectors)
    np.testing.assert_array_equal(tok.token_bytes, vectors["token_bytes_exact"])


def test_reference_ranks_encode_like_reference(ref_tok, vectors):
    check_samples(ref_tok, vectors)
    assert ref_tok.token_bytes.dtype == np.int32
    np.testing.assert_array_equal(ref_tok.token_bytes, vectors["token_bytes_exact"])
    # The json's older token_bytes counted a partial UTF-8 token as U+FFFD (3 bytes); only those differ.
    differ = ref_tok.token_bytes != np.array(vectors["token_bytes"])
    assert all(ref_tok.decode([i]).endswith("\ufffd") for i in np.flatnonzero(differ))


def test_encode_batch_prepend_append(ref_tok):
    bos, end = ref_tok.get_bos_token_id(), ref_tok.encode_special("<|assistant_end|>")
    texts = ["hello world", "", "<|bos|> stays text"]
    batch = ref_tok.encode(texts, prepend=bos, append="<|assistant_end|>", num_threads=2)
    assert batch == [[bos, *ref_tok.encode(t), end] for t in texts]
    assert bos not in ref_tok.encode("<|bos|>")
    assert ref_tok.get_special_tokens() == set(SPECIAL_TOKENS)
    with pytest.raises(TypeError):
        ref_tok.encode(b"bytes")
    with pytest.raises(UserError, match="no special token '<\\|nope\\|>': the special tokens are <\\|bos\\|>, "):
        ref_tok.encode("hi", prepend="<|nope|>")


def test_save_load_round_trip(ref_tok, reference_dir, vectors, tmp_path):
    ref_tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.tiktoken").read_bytes() == (
        reference_dir / vectors["mergeable_ranks_file"]
    ).read_bytes()
    meta = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert meta["special_tokens"] == vectors["special_tokens"] and meta["vocab_size"] == 2048
    np.testing.assert_array_equal(np.load(tmp_path / "tok" / "token_bytes.npy"), ref_tok.token_bytes)

    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.mergeable_ranks == ref_tok.mergeable_ranks
    assert (loaded.pattern, loaded.special_tokens) == (ref_tok.pattern, ref_tok.special_tokens)
    assert loaded.fingerprint() == ref_tok.fingerprint() == meta["fingerprint"]
    check_samples(loaded, vectors)


def test_fingerprint_changes_with_the_vocabulary(ref_tok):
    ranks = dict(ref_tok.mergeable_ranks)
    ranks.pop(max(ranks, key=ranks.get))
    assert Tokenizer(ranks).fingerprint() != ref_tok.fingerprint()
    assert len(ref_tok.fingerprint()) == 16


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer at .*scripts.tok_train"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(UserError, match=str(tmp_path / "tokenizer")):
        get_tokenizer(tmp_path)


def test_training_rejects_bad_input():
    with pytest.raises(UserError, match="at least 265"):
        Tokenizer.train(["some text"], 264)
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train(iter([]), 300)


def test_cap_documents():
    docs = ["a" * 5, "b" * 20, "c" * 5, "d"]
    assert list(cap_documents(docs, max_chars=100, doc_cap=8)) == ["a" * 5, "b" * 8, "b" * 8, "b" * 4, "c" * 5, "d"]
    assert list(cap_documents(docs, max_chars=10, doc_cap=8)) == ["a" * 5, "b" * 5]


def test_tok_train_script(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    for i in range(5):
        (tmp_path / "data" / f"{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog\n" * 20)
    tok_train.main(["--data", str(tmp_path / "data"), "--vocab-size", "300", "--base-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "bytes/token" in out and "vocab size 300" in out
    tok = get_tokenizer(tmp_path)
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"

    # Retraining is fine until a model was trained with this tokenizer; then it would orphan that model.
    tok_train.main(["--data", str(tmp_path / "data"), "--vocab-size", "280", "--base-dir", str(tmp_path)])
    used = get_tokenizer(tmp_path)
    with Checkpoints(tmp_path / "base_checkpoints" / "d2") as ckpts:
        params = {"w": np.ones(2, np.float32)}
        ckpts.save(1, params, params, None, {"step": 1, "tokenizer_fingerprint": used.fingerprint()})
    tok_train.main(["--data", str(tmp_path / "data"), "--vocab-size", "280", "--base-dir", str(tmp_path)])  # the same
    capsys.readouterr()
    with pytest.raises(SystemExit):
        tok_train.main(["--data", str(tmp_path / "data"), "--vocab-size", "300", "--base-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert out.startswith("note: 1 model(s) were trained with the tokenizer")  # before the training
    assert "1 model(s) were trained with the 280-token tokenizer in" in err and "(base_checkpoints/d2)" in err
    # A smaller vocabulary can't come out the same: refused before the training.
    with pytest.raises(SystemExit):
        tok_train.main(["--data", str(tmp_path / "data"), "--vocab-size", "270", "--base-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert out == "" and "1 model(s) were trained with the 280-token tokenizer in" in err
    assert get_tokenizer(tmp_path).fingerprint() == used.fingerprint()
    # A vocabulary too small for the bytes and special tokens is refused before any data is prepared.
    with pytest.raises(SystemExit):
        tok_train.main(["--vocab-size", "100", "--base-dir", str(tmp_path / "fresh")])
    assert "vocab size 100 is too small: it must be at least 265" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()


# ---- chat rendering


def specials(tok, *names):
    return [tok.encode_special(f"<|{n}|>") for n in names]


def test_render_text_conversation(ref_tok):
    bos, us, ue, as_, ae = specials(ref_tok, "bos", "user_start", "user_end", "assistant_start", "assistant_end")
    hi, hello = ref_tok.encode("Hi there"), ref_tok.encode("Hello! How can I help?")
    conversation = {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ]
    }
    ids, mask = ref_tok.render_conversation(conversation)
    turn = [us, *hi, ue, as_, *hello, ae]
    turn_mask = [0] * (len(hi) + 3) + [1] * (len(hello) + 1)
    assert ids == [bos, *turn, *turn]
    assert mask == [0, *turn_mask, *turn_mask]

    assert ref_tok.render_conversation(conversation, max_tokens=5) == (ids[:5], mask[:5])
    completion = ref_tok.render_for_completion(conversation)
    assert completion == [bos, *turn, us, *hi, ue, as_]


def test_render_tool_call_and_output(ref_tok):
    names = [n.strip("<|>") for n in SPECIAL_TOKENS]
    bos, us, ue, as_, ae, ps, pe, os_, oe = specials(ref_tok, *names)
    parts = [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "12*34"},
        {"type": "python_output", "text": "408"},
        {"type": "text", "text": "It is 408."},
    ]
    ids, mask = ref_tok.render_conversation(
        [{"role": "user", "content": "12*34?"}, {"role": "assistant", "content": parts}]
    )
    enc = ref_tok.encode
    expected = [
        ([bos, us, *enc("12*34?"), ue, as_], 0),
        (enc("Let me compute."), 1),
        ([ps, *enc("12*34"), pe], 1),
        ([os_, *enc("408"), oe], 0),
        ([*enc("It is 408."), ae], 1),
    ]
    assert ids == [i for tokens, _ in expected for i in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]


def test_render_merges_leading_system_message(ref_tok):
    with_system = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    merged = [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]
    assert ref_tok.render_conversation(with_system) == ref_tok.render_conversation(merged)
    assert with_system["messages"][1]["content"] == "Hi"  # the caller's conversation is untouched


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "assistant", "content": "Hi"}], "should be from 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "followed by a user"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "x", "text": ""}]}],
            "'x'",
        ),
        ([], "at least one message"),
    ],
)
def test_render_rejects_malformed_conversations(ref_tok, messages, error):
    with pytest.raises(UserError, match=error):
        ref_tok.render_conversation({"messages": messages})


def test_tok_eval_measures_each_kind_of_text_and_the_corpus(tiny_base, monkeypatch, capsys):
    """A compared encoding is a tiktoken Encoding: ours, under another name, must count as ours does."""
    ours = get_tokenizer(tiny_base)

    def get_encoding(name):
        if name == "offline":
            raise ConnectionError("no network")
        if name == "same":
            return ours.enc
        raise ValueError(name)

    monkeypatch.setattr("tiktoken.get_encoding", get_encoding)
    tok_eval.main([f"--base-dir={tiny_base}", "--compare", "same", "offline", "bogus", "--max-chars=5000"])
    out = capsys.readouterr().out
    table = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    rows = {cells[0]: cells[1:] for cells in table}
    assert list(rows)[1:] == [*tok_eval.SAMPLES, "corpus train", "corpus val"]
    assert rows["corpus train"][0] == "5,000"  # --max-chars of ASCII words
    for cells in list(rows.values())[1:]:
        assert cells[1:3] == cells[3:5]  # ours and "same": tokens, bytes/token
    assert "note: offline left out: tiktoken could not load it (ConnectionError)" in out
    assert "note: bogus is not a tiktoken encoding" in out
