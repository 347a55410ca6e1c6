"""A run's checkpoint folder and what a checkpoint must agree with before training goes on from it.

    with claimed(folder):                                 # writable, and held by this run alone
        check_compatible(meta, config, tokenizer, where)  # a resume: the same model shape and tokenizer
        ...
        set_aside_previous_run(folder, log)               # a fresh run's first save: the earlier run is kept

Shared by pretraining, finetuning and RL (nanojax.train, nanojax.sft, nanojax.rl) and by whatever restores
a checkpoint to sample from it (nanojax.engine: check_tokenizer).
"""

import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import jax

from nanojax.common import UserError, a_few, file_lock
from nanojax.model import GPTConfig


@contextmanager
def claimed(folder: Path):
    """The run's checkpoint folder, checked writable now (not at a first save after hours of training)
    and held for this run alone: a second run of the same model tag would move the first's folder aside,
    or save into it. The lock file sits beside the folder, so setting the folder aside keeps it."""
    where = folder if folder.is_dir() else folder.parent
    if jax.process_index() != 0:
        yield
        return
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
    except OSError as e:
        raise UserError(f"can't write checkpoints in {where} ({e.strerror}): pass another --base-dir") from None
    busy = f"another run (process {{}}) is training into {folder}: wait for it to end"
    with file_lock(folder.parent / f".{folder.name}.lock", busy.format):
        yield


def note_disk_space(folder: Path, state, keep: int | None, log) -> None:
    """Say at the start, not at a failed save hours later, when the disk can't hold the checkpoints kept
    (and the one being written before the oldest is pruned)."""
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
    where = folder if folder.is_dir() else folder.parent
    free = shutil.disk_usage(where).free
    if jax.process_index() == 0 and keep and free < size * (keep + 1):
        log(f"note: {free / 2**20:,.0f} MiB free in {where}, less than {keep + 1} checkpoints of "
            f"{size / 2**20:,.0f} MiB: saves may fail; free some space or lower --keep-checkpoints")  # fmt: skip


def is_run_file(path: Path) -> bool:
    """What a run writes in its folder: step directories (and Orbax's temporaries of them), the report and
    its plot (chat_rl's is reward.png)."""
    return path.name.split(".", 1)[0].isdigit() or path.name in ("report.md", "loss.png", "reward.png")


def check_run_folder(folder: Path) -> None:
    """A fresh run's folder may hold an earlier run (set aside at the first save), nothing else."""
    foreign = [p.name for p in folder.iterdir() if not is_run_file(p)] if folder.is_dir() else []
    if foreign:
        raise UserError(f"{folder} holds files that no run wrote ({a_few(sorted(foreign))}): move them out")


def set_aside_previous_run(folder: Path, log) -> None:
    """A fresh run in a folder holding another run's checkpoints renames that folder: nothing is lost.
    A folder holding anything else is not a run's: it is refused, never moved."""
    if jax.process_index() == 0 and folder.is_dir() and any(folder.iterdir()):
        check_run_folder(folder)
        aside = folder.with_name(f"{folder.name}-previous-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        log(f"{folder} held an earlier run: moved it to {aside}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpoint folder ready")


def check_compatible(meta: dict, config: GPTConfig, tokenizer, where) -> None:
    """A checkpoint resumes only into the same model shape and tokenizer."""
    check_tokenizer(meta, tokenizer, where)
    saved, now = asdict(GPTConfig(**meta["model_config"])), asdict(config)
    if saved != now:
        diff = ", ".join(f"{k} {saved[k]} (this run: {now[k]})" for k in saved if saved[k] != now[k])
        raise UserError(
            f"checkpoint {where} is for another model shape, {diff}: resume with the flags it was trained "
            "with, or start a new run under another --model-tag"
        )


# Flags that leave a resumed run's losses and weights as they would have been: where it saves and
# reports, how it splits the batch over devices, and which base weights finetuning started from (a
# resume takes its weights from the checkpoint). --data only names where the base dir's shards came
# from; other shards are refused (prepare_data, the loader's state).
BOOKKEEPING_FLAGS = {
    "base_dir", "run", "model_tag", "resume_from_step", "eval_every", "eval_tokens", "sample_every", "save_every",
    "keep_checkpoints", "device_batch_size", "fsdp", "data_readers", "skip_bad_lines", "model_step", "data",
    "sample_prompt",
}  # fmt: skip


def note_changed_settings(saved: dict, now: dict, log) -> None:
    """Say which training settings a resume changes: the run goes on with them, but no longer as the
    uninterrupted run would have (another batch size, learning rate, schedule length...)."""
    changed = [
        f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and k not in BOOKKEEPING_FLAGS and saved[k] != now[k]
    ]
    if changed:
        log(f"note: resuming with settings the checkpoint was not trained with: {', '.join(changed)}")


def check_tokenizer(meta: dict, tokenizer, where) -> None:
    """A one-line UserError if the checkpoint was trained with another tokenizer: its vocabulary size
    differs, or its fingerprint (converted nanochat checkpoints carry none: their size must tell)."""
    vocab_size = meta["model_config"]["vocab_size"]
    if vocab_size != tokenizer.get_vocab_size():
        raise UserError(
            f"checkpoint {where} has a {vocab_size}-token vocabulary, the tokenizer here {tokenizer.get_vocab_size()}: "
            "use the base dir (--base-dir) whose tokenizer it was trained with"
        )
    saved = meta.get("tokenizer_fingerprint")
    if saved not in (None, tokenizer.fingerprint()):
        raise UserError(
            f"checkpoint {where} was trained with another tokenizer ({saved}, the one here is "
            f"{tokenizer.fingerprint()}): use the base dir it was trained in (--base-dir)"
        )
