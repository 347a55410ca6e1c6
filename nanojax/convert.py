"""nanochat checkpoints (PyTorch) to nanojax checkpoints (Orbax) and back; a whole nanochat base dir at once.
Checkpoints need torch: `pip install nanojax[convert]`; the tokenizer does not.

    step = from_nanochat_dir(nanochat_dir, checkpoint_dir)    # model_<step>.pt + meta_<step>.json -> Orbax
    path = to_nanochat_dir(checkpoint_dir, nanochat_dir)      # the reverse, loadable by nanochat's build_model
    written = from_nanochat_base_dir(nanochat_base, base_dir) # tokenizer + every checkpoint tag

Only the model weights travel (optim_<step>_rank<r>.pt is not read): a converted checkpoint samples and
evaluates but does not resume, since optimizer states and data-loader positions differ between the two.
nanochat's tokenizer is a pickled tiktoken Encoding; it is read with an unpickler that builds nothing
but that Encoding's plain state (a pickle can run code) and saved in our plain-data format.
"""

import json
import pickle
import re
from dataclasses import asdict, fields
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanojax.checkpoint import Checkpoints
from nanojax.common import CHECKPOINT_SOURCES, UserError
from nanojax.engine import load_model
from nanojax.model import GPTConfig, param_paths
from nanojax.tokenizer import META_FILE as TOKENIZER_META_FILE
from nanojax.tokenizer import Tokenizer, tokenizer_dir
from nanojax.train import abstract_model

MODEL_FILE, META_FILE = "model_{:06d}.pt", "meta_{:06d}.json"
# What a nanochat base dir shares with ours as is: the parquet shards (the last is validation in both)
# and the CORE task bundle. Linked, not copied: they can be gigabytes.
SHARED_FOLDERS = ("base_data", "eval_bundle")


_BLOCK_KERNEL = re.compile(r"blocks\.(\d+)\.(attn|mlp)\.(\w+)\.kernel")


def nanochat_name(path: str) -> tuple[str, bool]:
    """Our dotted parameter path -> (nanochat state_dict name, whether the array is transposed)."""
    if path == "wte":
        return "transformer.wte.weight", False
    if path == "lm_head.kernel":
        return "lm_head.weight", True
    if path in ("resid_lambdas", "x0_lambdas"):
        return path, False
    if m := re.fullmatch(r"blocks\.(\d+)\.value_embed", path):
        return f"value_embeds.{m[1]}.weight", False
    if m := _BLOCK_KERNEL.fullmatch(path):
        return f"transformer.h.{m[1]}.{m[2]}.{m[3]}.weight", True
    raise KeyError(f"no nanochat name for parameter {path}")


def to_nanochat(params) -> dict[str, np.ndarray]:
    """A params pytree (pure dict) -> nanochat state_dict names and (out, in) orientation, as numpy."""
    out = {}
    for path, leaf in zip(param_paths(params), jax.tree.leaves(params), strict=True):
        name, transpose = nanochat_name(path)
        arr = np.asarray(leaf)
        out[name] = arr.T if transpose else arr
    return out


def from_nanochat(state_dict: dict, like):
    """nanochat state_dict -> a params pytree shaped like `like` (torch's `_orig_mod.` prefix is fine)."""
    sd = {k.removeprefix("_orig_mod."): np.asarray(v) for k, v in state_dict.items()}
    leaves = []
    for path, leaf in zip(param_paths(like), jax.tree.leaves(like), strict=True):
        name, transpose = nanochat_name(path)
        if name not in sd:
            raise UserError(f"nanochat weights lack {name}: they are for a different model config")
        arr = sd.pop(name)
        arr = arr.T if transpose else arr
        if arr.shape != leaf.shape:
            want = leaf.shape[::-1] if transpose else leaf.shape
            raise UserError(
                f"{name} has shape {arr.T.shape if transpose else arr.shape}, the model expects "
                f"{want}: the weights are for a different model config"
            )
        leaves.append(jnp.asarray(arr, leaf.dtype))
    if sd:
        raise UserError(f"nanochat weights have parameters this model lacks: {sorted(sd)[:5]}")
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise UserError("converting nanochat checkpoints needs PyTorch: pip install nanojax[convert]") from e
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
    # As nanochat's checkpoint_manager patches it: checkpoints from before sliding windows saw full context.
    return GPTConfig(**{"window_pattern": "L"} | model_config)


def _resolve_step(nanochat_dir: Path, step: int | None) -> int:
    steps = nanochat_steps(nanochat_dir)
    if step is None and not steps:
        raise UserError(f"no nanochat checkpoint (model_<step>.pt with meta_<step>.json) in {nanochat_dir}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"no nanochat checkpoint for step {step} in {nanochat_dir}; available steps: {steps}")
    return step


def _read_meta(nanochat_dir: Path, step: int, tokenizer: Tokenizer | None) -> tuple[dict, GPTConfig]:
    meta = json.loads((nanochat_dir / META_FILE.format(step)).read_text())
    config = nanochat_config(meta["model_config"])
    if tokenizer is not None and tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(
            f"{nanochat_dir / META_FILE.format(step)} is for a vocabulary of {config.vocab_size} tokens, the "
            f"tokenizer has {tokenizer.get_vocab_size()}: the checkpoint belongs to another base dir"
        )
    return meta, config


def from_nanochat_dir(nanochat_dir, checkpoint_dir, step: int | None = None, tokenizer: Tokenizer | None = None) -> int:
    """Write nanochat's model_<step>.pt (the latest step unless given) as a nanojax checkpoint of the same
    step in checkpoint_dir; returns the step. With the tokenizer it was trained with, the checkpoint is
    stamped with its fingerprint so that scripts refuse any other."""
    torch = _torch()
    nanochat_dir = Path(nanochat_dir)
    step = _resolve_step(nanochat_dir, step)
    meta, config = _read_meta(nanochat_dir, step, tokenizer)
    source = str(nanochat_dir.resolve())
    _check_out_folder(Path(checkpoint_dir), source)
    model_file = nanochat_dir / MODEL_FILE.format(step)
    try:  # weights_only: tensors and plain containers, never code
        state_dict = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch says a damaged file many ways; its advice to unpickle code is not for us
        raise UserError(
            f"{model_file} is not a readable PyTorch state dict ({type(e).__name__}): a truncated or damaged "
            "copy? copy it again from where nanochat saved it"
        ) from e
    # bfloat16 (nanochat's embeddings on GPU) has no numpy dtype: go through float32, our param dtype.
    state_dict = {k: v.float().numpy() for k, v in state_dict.items()}
    like = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    params = from_nanochat(state_dict, like)
    metadata = {
        "step": step, "val_bpb": meta.get("val_bpb"), "model_config": asdict(config),
        "converted_from": source, "nanochat_meta": meta,
    }  # fmt: skip
    if tokenizer is not None:
        metadata["tokenizer_fingerprint"] = tokenizer.fingerprint()
    with Checkpoints(checkpoint_dir) as ckpts:
        ckpts.save(step, params, None, None, metadata)
    return step


def _check_out_folder(checkpoint_dir: Path, source: str) -> None:
    """Converted steps go into a new folder, or one holding other steps converted from the same source:
    the latest step of a folder is what scripts load, so it must never be another model's."""
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UserError(f"--out {checkpoint_dir} is a file: give a folder for the checkpoint")
    if not checkpoint_dir.is_dir() or not any(checkpoint_dir.iterdir()):
        return
    ckpts = Checkpoints(checkpoint_dir)
    latest = ckpts.latest_step()
    if latest is None:
        raise UserError(f"{checkpoint_dir} holds files that are not checkpoints: convert into a new or empty folder")
    if ckpts.read_metadata(latest).get("converted_from") != source:
        raise UserError(
            f"{checkpoint_dir} holds checkpoints of another model (step {latest}): convert into a new or empty folder"
        )


def to_nanochat_dir(checkpoint_dir, nanochat_dir, step: int | None = None) -> Path:
    """Write a nanojax checkpoint (the latest step unless given) as nanochat's model_<step>.pt and
    meta_<step>.json in nanochat_dir; returns the model file's path."""
    torch = _torch()
    model, meta = load_model(checkpoint_dir, step)
    step = meta["step"]
    nanochat_dir = Path(nanochat_dir)
    path = nanochat_dir / MODEL_FILE.format(step)
    if nanochat_dir.exists() and not nanochat_dir.is_dir():
        raise UserError(f"--out {nanochat_dir} is a file: give a folder for nanochat's files")
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


# --- nanochat's tokenizer -------------------------------------------------------------------------


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: pickle hands it the Encoding's state
    (name, pattern, ranks, special tokens) and nothing of tiktoken runs."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    # nanochat pickles with the default protocol (3 or later), under which an Encoding references this one
    # global and otherwise holds dicts, strings, bytes and ints. Anything else is a different file, or
    # an attack (any other global is a callable the pickle could run).
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"it references {module}.{name}")


def load_nanochat_tokenizer(path) -> Tokenizer:
    """nanochat's tokenizer.pkl (a pickled tiktoken Encoding) as our Tokenizer, without running the pickle."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"no nanochat tokenizer at {path}: pass a nanochat base dir (its tokenizer/ holds tokenizer.pkl)"
        )
    try:
        with path.open("rb") as f:
            obj = _TokenizerUnpickler(f).load()
    except Exception as e:  # the unpickler's own errors and whatever a malformed stream raises
        raise UserError(f"refusing to load {path}: not a pickled tiktoken Encoding ({e})") from e
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise UserError(f"{path} names tiktoken's built-in encoding {state!r}: nanojax needs a trained tokenizer")
    if not _is_encoding_state(state):
        raise UserError(f"refusing to load {path}: not a pickled tiktoken Encoding (unexpected contents)")
    return Tokenizer(state["mergeable_ranks"], state["pat_str"], state["special_tokens"])


def _is_encoding_state(state) -> bool:
    return (
        isinstance(state, dict)
        and isinstance(state.get("pat_str"), str)
        and isinstance(ranks := state.get("mergeable_ranks"), dict)
        and all(type(k) is bytes and type(v) is int for k, v in ranks.items())
        and isinstance(specials := state.get("special_tokens"), dict)
        and all(type(k) is str and type(v) is int for k, v in specials.items())
    )


# --- a whole base dir -----------------------------------------------------------------------------


def from_nanochat_base_dir(nanochat_base, base_dir, all_steps: bool = False, log=print) -> list[Path]:
    """Convert a nanochat base dir into ours: its tokenizer, the latest step (or every step) of each
    checkpoint tag under base_checkpoints/ and chatsft_checkpoints/, and links to its data shards and CORE
    bundle. Every checkpoint is checked against the tokenizer before anything is written. Returns the
    checkpoint step folders written."""
    nanochat_base, base_dir = Path(nanochat_base).expanduser(), Path(base_dir).expanduser()
    _torch()  # before anything is written
    tokenizer = load_nanochat_tokenizer(nanochat_base / "tokenizer" / "tokenizer.pkl")
    todo = []
    for folder in CHECKPOINT_SOURCES.values():
        tags = sorted(p for p in (nanochat_base / folder).glob("*") if p.is_dir() and nanochat_steps(p))
        for tag in tags:
            steps = nanochat_steps(tag)
            for step in steps if all_steps else steps[-1:]:
                _read_meta(tag, step, tokenizer)
                dst = base_dir / folder / tag.name
                if (dst / str(step)).exists():
                    raise UserError(f"{dst / str(step)} already exists: convert into an empty base dir (--out)")
                todo.append((tag, dst, step))
    if not todo:
        folders = " or ".join(f"{f}/<tag>/" for f in CHECKPOINT_SOURCES.values())
        raise UserError(f"no nanochat checkpoints in {nanochat_base}: expected model_<step>.pt files in {folders}")

    _save_tokenizer(tokenizer, tokenizer_dir(base_dir), log)
    written = []
    for src, dst, step in todo:
        from_nanochat_dir(src, dst, step, tokenizer)
        written.append(dst / str(step))
        log(f"{src / MODEL_FILE.format(step)} -> {written[-1]}")
    for name in SHARED_FOLDERS:
        src, dst = nanochat_base / name, base_dir / name
        if src.is_dir() and not dst.exists():
            dst.symlink_to(src.resolve(), target_is_directory=True)
            log(f"linked {dst} -> {src.resolve()}")
        elif src.is_dir():
            log(f"kept {dst} (already there); nanochat's is at {src}")
    return written


def _save_tokenizer(tokenizer: Tokenizer, directory: Path, log) -> None:
    """Save, unless the same tokenizer is already there; another one is never overwritten."""
    if (directory / TOKENIZER_META_FILE).is_file():
        existing = Tokenizer.load(directory)
        if existing.fingerprint() != tokenizer.fingerprint():
            raise UserError(f"{directory} already holds another tokenizer: convert into an empty base dir (--out)")
        log(f"kept {directory} (the same tokenizer)")
        return
    tokenizer.save(directory)
    log(f"wrote {directory} ({tokenizer.get_vocab_size()} tokens)")
