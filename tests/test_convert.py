"""nanochat <-> nanojax checkpoint conversion on the reference's real nanochat checkpoint (needs torch).

Run: python -m pytest -q tests/test_convert.py
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nanojax.common import UserError
from nanojax.convert import from_nanochat_dir, nanochat_steps, to_nanochat_dir
from nanojax.engine import load_model
from nanojax.parity import load_vectors
from scripts import convert_nanochat


@pytest.fixture(scope="module")
def imported(reference_dir, tmp_path_factory):
    """checkpoint_a converted by the script into <base>/base_checkpoints/a."""
    base = tmp_path_factory.mktemp("base")
    src = reference_dir / "nanochat_checkpoint_a"
    convert_nanochat.main(["--from-nanochat", str(src), "--model-tag=a", f"--base-dir={base}"])
    return base / "base_checkpoints" / "a"


def test_imported_logits_match_nanochat(reference_dir, imported):
    _, arrays = load_vectors(reference_dir / "nanochat_vectors" / "a.json")
    model, meta = load_model(imported)
    assert meta["step"] == 0 and meta["model_config"]["n_layer"] == 2
    diff = np.max(np.abs(np.asarray(model(jnp.asarray(arrays["idx"]))) - arrays["logits"]))
    assert diff <= 1e-6


def test_export_round_trips_bit_for_bit(reference_dir, imported, tmp_path):
    src = reference_dir / "nanochat_checkpoint_a"
    convert_nanochat.main(["--to-nanochat", str(tmp_path), "--model-tag=a", f"--base-dir={imported.parents[1]}"])
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
