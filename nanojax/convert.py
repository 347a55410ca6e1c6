"""nanochat checkpoints (PyTorch) to nanojax checkpoints (Orbax) and back. Needs torch:
`pip install -e ".[convert]"`.

    step = from_nanochat_dir(nanochat_dir, checkpoint_dir)    # model_<step>.pt + meta_<step>.json -> Orbax
    path = to_nanochat_dir(checkpoint_dir, nanochat_dir)      # the reverse, loadable by nanochat's build_model

Only the model weights travel: a converted checkpoint can be sampled and evaluated, not resumed
(optimizer states differ between the two). nanochat's tokenizer is a pickle; it is not converted,
so an imported checkpoint carries no tokenizer fingerprint and is paired with the tokenizer of the
base dir it is used from.
"""

import json
import re
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
from flax import nnx

from nanojax.checkpoint import Checkpoints
from nanojax.common import UserError
from nanojax.engine import load_model
from nanojax.model import GPTConfig, from_nanochat, to_nanochat
from nanojax.train import abstract_model

MODEL_FILE, META_FILE = "model_{:06d}.pt", "meta_{:06d}.json"


def _torch():
    try:
        import torch
    except ImportError as e:
        raise UserError('converting nanochat checkpoints needs PyTorch: pip install -e ".[convert]"') from e
    return torch


def nanochat_steps(directory) -> list[int]:
    """Steps with both a model and a meta file in a nanochat checkpoint directory, ascending."""
    directory = Path(directory)
    found = [int(m[1]) for p in directory.glob("model_*.pt") if (m := re.fullmatch(r"model_(\d+)\.pt", p.name))]
    return sorted(s for s in found if (directory / META_FILE.format(s)).is_file())


def nanochat_config(model_config: dict) -> GPTConfig:
    """GPTConfig from nanochat's model_config kwargs; a key we do not know may change the math, so it is refused."""
    known = {f.name for f in fields(GPTConfig)}
    if unknown := sorted(set(model_config) - known):
        raise UserError(f"nanochat model_config has settings nanojax does not implement: {unknown}")
    return GPTConfig(**model_config)


def from_nanochat_dir(nanochat_dir, checkpoint_dir, step: int | None = None) -> int:
    """Write nanochat's model_<step>.pt (the latest step unless given) as a nanojax checkpoint of
    the same step in checkpoint_dir; returns the step."""
    torch = _torch()
    nanochat_dir = Path(nanochat_dir)
    steps = nanochat_steps(nanochat_dir)
    if step is None and not steps:
        raise UserError(f"no nanochat checkpoint (model_<step>.pt with meta_<step>.json) in {nanochat_dir}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"no nanochat checkpoint for step {step} in {nanochat_dir}; available steps: {steps}")
    meta = json.loads((nanochat_dir / META_FILE.format(step)).read_text())
    config = nanochat_config(meta["model_config"])
    state_dict = torch.load(nanochat_dir / MODEL_FILE.format(step), map_location="cpu", weights_only=True)
    # bfloat16 (nanochat's embeddings on GPU) has no numpy dtype: go through float32, our param dtype.
    state_dict = {k: v.float().numpy() for k, v in state_dict.items()}
    like = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    params = from_nanochat(state_dict, like)
    metadata = {
        "step": step, "val_bpb": meta.get("val_bpb"), "model_config": asdict(config),
        "converted_from": str(nanochat_dir.resolve()), "nanochat_meta": meta,
    }  # fmt: skip
    with Checkpoints(checkpoint_dir) as ckpts:
        ckpts.save(step, params, None, None, metadata)
    return step


def to_nanochat_dir(checkpoint_dir, nanochat_dir, step: int | None = None) -> Path:
    """Write a nanojax checkpoint (the latest step unless given) as nanochat's model_<step>.pt and
    meta_<step>.json in nanochat_dir; returns the model file's path."""
    torch = _torch()
    model, meta = load_model(checkpoint_dir, step)
    step = meta["step"]
    nanochat_dir = Path(nanochat_dir)
    path = nanochat_dir / MODEL_FILE.format(step)
    if path.exists():
        raise UserError(f"{path} already exists: move it aside or export to another directory")
    weights = to_nanochat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state_dict = {k: torch.from_numpy(np.array(v, order="C")) for k, v in weights.items()}
    nanochat_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    config = meta["model_config"]
    nanochat_meta = {
        "step": step, "val_bpb": meta.get("val_bpb"), "model_config": config,
        "user_config": meta.get("user_config", {}), "device_batch_size": meta.get("device_batch_size"),
        "max_seq_len": config["sequence_len"],
    }  # fmt: skip
    (nanochat_dir / META_FILE.format(step)).write_text(json.dumps(nanochat_meta, indent=2))
    return path
