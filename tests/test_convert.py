"""nanochat <-> nanojax conversion on the reference's real nanochat checkpoint (needs torch): one checkpoint
each way, a whole nanochat base dir (then sampled and evaluated), and pickles that must not be loaded.

Run: python -m pytest -q tests/test_convert.py
"""

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import tiktoken
import torch
from flax import nnx

from nanojax.checkpoint import Checkpoints
from nanojax.common import UserError
from nanojax.convert import (
    from_nanochat_dir,
    load_nanochat_tokenizer,
    nanochat_config,
    nanochat_steps,
    to_nanochat_dir,
)
from nanojax.engine import load_model
from nanojax.parity import Reference
from nanojax.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer
from scripts import base_eval, convert_nanochat, sample

BUNDLE = Path(__file__).parent / "data" / "core_bundle"


@pytest.fixture(scope="module")
def ref(reference_dir):
    return Reference(reference_dir / "nanochat_vectors" / "a.json")


@pytest.fixture(scope="module")
def imported(reference_dir, tmp_path_factory):
    """checkpoint_a converted by the script into a nanojax checkpoint folder."""
    out = tmp_path_factory.mktemp("base") / "base_checkpoints" / "a"
    convert_nanochat.main([str(reference_dir / "nanochat_checkpoint_a"), "--out", str(out)])
    return out


def max_logit_diff(checkpoint_dir, ref) -> float:
    model, _ = load_model(checkpoint_dir)
    logits = nnx.jit(lambda m, idx: m(idx))(model, jnp.asarray(ref.arrays["idx"]))
    return float(np.max(np.abs(np.asarray(logits) - ref.arrays["logits"])))


def test_imported_logits_match_nanochat(imported, ref):
    _, meta = load_model(imported)
    assert meta["step"] == 0 and meta["model_config"]["n_layer"] == 2 and "tokenizer_fingerprint" not in meta
    assert max_logit_diff(imported, ref) <= 1e-6


def test_sampling_with_a_tokenizer_of_another_size_is_refused(imported, tmp_path):
    base = imported.parent.parent  # converted checkpoints carry no tokenizer fingerprint: the size must tell
    Tokenizer({bytes([i]): i for i in range(256)}).save(base / "tokenizer")  # 265 tokens, the model has 512
    with pytest.raises(UserError, match="has a 512-token vocabulary, the tokenizer here 265"):
        sample.main.__wrapped__([f"--base-dir={base}", "--max-tokens=2"])
    shutil.rmtree(base / "tokenizer")


def test_export_round_trips_bit_for_bit(reference_dir, imported, tmp_path):
    src = reference_dir / "nanochat_checkpoint_a"
    convert_nanochat.main([str(imported), "--to-nanochat", "--out", str(tmp_path), "--step=0"])
    original = torch.load(src / "model_000000.pt", weights_only=True)
    exported = torch.load(tmp_path / "model_000000.pt", weights_only=True)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].is_contiguous()
        assert torch.equal(exported[name], tensor), name
    meta = json.loads((tmp_path / "meta_000000.json").read_text())
    assert meta["model_config"] == json.loads((src / "meta_000000.json").read_text())["model_config"]
    with pytest.raises(UserError, match="already exists"):
        to_nanochat_dir(imported, tmp_path)


def test_bad_input(reference_dir, tmp_path):
    with pytest.raises(UserError, match="no nanochat checkpoint"):
        from_nanochat_dir(tmp_path, tmp_path / "out")
    src = tmp_path / "src"
    shutil.copytree(reference_dir / "nanochat_checkpoint_a", src)
    assert nanochat_steps(src) == [0]
    with pytest.raises(UserError, match="available steps: \\[0\\]"):
        from_nanochat_dir(src, tmp_path / "out", step=5)
    meta = json.loads((src / "meta_000000.json").read_text())
    meta["model_config"]["n_layer"] = 3  # weights for 2 layers
    (src / "meta_000000.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="different model config"):
        from_nanochat_dir(src, tmp_path / "out")
    meta["model_config"]["rope_scaling"] = 2.0
    (src / "meta_000000.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not implement: \\['rope_scaling'\\]"):
        from_nanochat_dir(src, tmp_path / "out")


def test_a_config_without_windows_is_full_context(reference_dir):
    """nanochat's checkpoint_manager reads a missing window_pattern as "L": older models saw full context."""
    config = json.loads((reference_dir / "nanochat_checkpoint_a" / "meta_000000.json").read_text())["model_config"]
    assert nanochat_config({k: v for k, v in config.items() if k != "window_pattern"}).window_pattern == "L"
    assert nanochat_config(config).window_pattern == config["window_pattern"]


def test_a_damaged_file_or_a_taken_folder_is_refused(reference_dir, imported, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(reference_dir / "nanochat_checkpoint_a", src)
    model_file = src / "model_000000.pt"
    whole = model_file.read_bytes()
    for damaged in (whole[: len(whole) // 2], os.urandom(4096)):
        model_file.write_bytes(damaged)
        with pytest.raises(UserError, match="not a readable PyTorch state dict .* copy it again") as e:
            from_nanochat_dir(src, tmp_path / "out")
        assert "weights_only" not in str(e.value)
    assert not (tmp_path / "out").exists()
    model_file.write_bytes(whole)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file: give a folder"):
        from_nanochat_dir(src, tmp_path / "file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(UserError, match="holds files that are not checkpoints"):
        from_nanochat_dir(src, tmp_path / "notes")
    # `imported` holds step 0 converted from the reference folder, not from this copy of it
    with pytest.raises(UserError, match="holds checkpoints of another model"):
        from_nanochat_dir(src, imported)


@pytest.mark.parametrize(
    "argv,message",
    [([], "either SRC"), (["src"], "needs --out"), (["src", "--base-dir=b"], "either SRC"),
     (["--base-dir=b", "--step=1"], "convert one checkpoint")],
)  # fmt: skip
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        convert_nanochat.main(argv)
    assert message in capsys.readouterr().err


def test_without_torch_one_line_error(reference_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(SystemExit):
        convert_nanochat.main([str(reference_dir / "nanochat_checkpoint_a"), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "pip install nanojax[convert]" in err and err.strip().count("\n") == 0


# --- a whole nanochat base dir --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab512(reference_dir) -> Tokenizer:
    """The reference tokenizer cut to its first 503 ranks (bytes + the earliest merges): with the specials
    512 tokens, checkpoint_a's vocabulary."""
    full = Tokenizer.from_tiktoken_file(reference_dir / "tokenizer_vectors.tiktoken")
    return Tokenizer({t: r for t, r in full.mergeable_ranks.items() if r < 512 - len(SPECIAL_TOKENS)})


@pytest.fixture(scope="module")
def nanochat_base(reference_dir, tiny_base, vocab512, tmp_path_factory) -> Path:
    """What a nanochat user has: tokenizer.pkl + token_bytes.pt, checkpoint_a as steps 0 and 5 of tag d2,
    the data shards and an eval bundle."""
    base = tmp_path_factory.mktemp("nanochat")
    (base / "tokenizer").mkdir()
    enc = tiktoken.Encoding(name="rustbpe", pat_str=vocab512.pattern, mergeable_ranks=vocab512.mergeable_ranks,
                            special_tokens=vocab512.special_tokens)  # fmt: skip
    with open(base / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)  # as nanochat's RustBPETokenizer.save
    torch.save(torch.tensor(vocab512.token_bytes, dtype=torch.int32), base / "tokenizer" / "token_bytes.pt")
    tag = base / "base_checkpoints" / "d2"
    shutil.copytree(reference_dir / "nanochat_checkpoint_a", tag)
    shutil.copy(tag / "model_000000.pt", tag / "model_000005.pt")
    meta = json.loads((tag / "meta_000000.json").read_text())
    (tag / "meta_000005.json").write_text(json.dumps({**meta, "step": 5}))
    shutil.copytree(tiny_base / "base_data", base / "base_data")
    shutil.copytree(BUNDLE, base / "eval_bundle")
    return base


def test_base_dir_converts_and_runs(nanochat_base, vocab512, ref, tmp_path, capsys):
    out = tmp_path / "nanojax"
    convert_nanochat.main(["--base-dir", str(nanochat_base), "--out", str(out)])
    assert get_tokenizer(out).fingerprint() == vocab512.fingerprint()
    checkpoint_dir = out / "base_checkpoints" / "d2"
    assert Checkpoints(checkpoint_dir).steps() == [5]  # the latest step only
    _, meta = load_model(checkpoint_dir)
    assert meta["tokenizer_fingerprint"] == vocab512.fingerprint()
    assert max_logit_diff(checkpoint_dir, ref) <= 1e-6
    assert (out / "base_data").is_symlink() and (out / "eval_bundle").is_symlink()
    capsys.readouterr()

    sample.main([f"--base-dir={out}", "--prompt", "def main(", "--max-tokens=4", "--temperature=0"])
    assert "d2 step 5" in capsys.readouterr().err  # sample.py names the checkpoint on stderr
    base_eval.main([f"--base-dir={out}", "--eval-tokens=512", "--device-batch-size=1", "--max-per-task=3"])
    out_text = capsys.readouterr().out
    assert "| val bpb |" in out_text and "| CORE |" in out_text and "| tiny_lambada |" in out_text
    assert "## Base model evaluation, step 5" in (checkpoint_dir / "report.md").read_text()

    with pytest.raises(SystemExit):  # converting again would overwrite: refused before writing anything
        convert_nanochat.main(["--base-dir", str(nanochat_base), "--out", str(out)])
    assert "already exists" in capsys.readouterr().err
    convert_nanochat.main(["--base-dir", str(nanochat_base), "--out", str(tmp_path / "all"), "--all-steps"])
    assert Checkpoints(tmp_path / "all" / "base_checkpoints" / "d2").steps() == [0, 5]


def test_base_dir_checks_vocab_and_tokenizer(nanochat_base, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(nanochat_base, other, symlinks=True)
    bytes_only = Tokenizer({bytes([i]): i for i in range(256)})  # 265 tokens, the model has 512
    enc = tiktoken.Encoding(name="x", pat_str=bytes_only.pattern, mergeable_ranks=bytes_only.mergeable_ranks,
                            special_tokens=bytes_only.special_tokens)  # fmt: skip
    (other / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    with pytest.raises(UserError, match="vocabulary of 512 tokens, the tokenizer has 265"):
        convert_nanochat.main.__wrapped__(["--base-dir", str(other), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "tokenizer").exists()  # nothing written
    Tokenizer.train(["gamma delta " * 50], 300).save(tmp_path / "taken" / "tokenizer")
    with pytest.raises(UserError, match="already holds another tokenizer"):
        convert_nanochat.main.__wrapped__(["--base-dir", str(nanochat_base), "--out", str(tmp_path / "taken")])


class RunsCode:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_malicious_pickle_is_refused_unrun(tmp_path, protocol, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "tokenizer" / "tokenizer.pkl"
    path.parent.mkdir()
    path.write_bytes(pickle.dumps(RunsCode(f"touch {marker}"), protocol=protocol))
    with pytest.raises(UserError, match=f"refusing to load {path}: .*references posix.system"):
        load_nanochat_tokenizer(path)
    with pytest.raises(SystemExit):
        convert_nanochat.main(["--base-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "refusing to load" in err and err.strip().count("\n") == 0
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"mergeable_ranks": {}}))  # only allowed opcodes, but not an Encoding
    with pytest.raises(UserError, match="unexpected contents"):
        load_nanochat_tokenizer(path)
