"""Finetuning end to end on a tiny model: the loss falls from the base weights, resume is exact, and
scripts.chat_cli answers in a pseudo-terminal. 8 simulated CPU devices (1 for the CLI processes).

Run: python -m pytest -q tests/test_sft.py
"""

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from conftest import TINY_RUN, script_env

from nanojax import chat
from nanojax.checkpoint import Checkpoints
from nanojax.common import UserError
from nanojax.pretrain import pretrain
from nanojax.sft import inherit, sft
from scripts import chat_sft
from scripts import pretrain as pretrain_script

REPO = Path(__file__).resolve().parents[1]
# 8 devices x 1 row x 128 tokens: one micro-step a step. Finetuning's lrs are not scaled by the batch size
# (nanochat's chat_sft), so this batch of 1,024 tokens takes --init-lr-frac 0.035 = 0.8 x sqrt(1024 / 2^19).
SFT_RUN = ["--max-seq-len=128", "--device-batch-size=1", "--total-batch-size=1024", "--eval-every=-1",
           "--eval-tokens=8192", "--embedding-lr=0.5", "--unembedding-lr=0.05", "--matrix-lr=0.05",
           "--init-lr-frac=0.035"]  # fmt: skip


def run_sft(base, tag, *extra):
    """SFT from base_checkpoints/<tag> (a copy of the tiny base run) into chatsft_checkpoints/<tag>."""
    if not (base / "base_checkpoints" / tag).is_dir():
        shutil.copytree(base / "base_checkpoints" / "chat", base / "base_checkpoints" / tag)
    return sft(chat_sft.parse_args([*SFT_RUN, f"--base-dir={base}", f"--model-tag={tag}", *extra]), base, ["Hi!"])[0]


@pytest.fixture(scope="module")
def base(tiny_base):
    """A base checkpoint to finetune: the tiny pretraining run, a few steps."""
    args = pretrain_script.parse_args([*TINY_RUN, "--num-iterations=3", "--model-tag=chat", f"--base-dir={tiny_base}"])
    pretrain(args, tiny_base, ["alpha"])
    return tiny_base


@pytest.fixture(scope="module")
def finetuned(base):
    """30 steps on the generated conversations (written to the base dir on first use)."""
    return run_sft(base, "chat", "--num-iterations=30", "--eval-every=10")


def test_sft_loss_on_assistant_tokens_falls(finetuned, base):
    losses = [loss for _, loss in finetuned["history"].train_loss]
    val_steps, val = zip(*finetuned["history"].val_loss, strict=True)
    assert val_steps == (0, 10, 20, 30) and val[-1] < val[0] - 0.3  # from the base model's, at step 0
    assert losses[-1] < losses[0] - 0.5
    assert (base / "chat_data" / "synthetic.jsonl").is_file()
    folder = Path(finetuned["checkpoint_dir"])
    assert folder == base / "chatsft_checkpoints" / "chat" and Checkpoints(folder).steps() == [30]
    assert "min / final val loss" in (folder / "report.md").read_text()
    meta = Checkpoints(folder).read_metadata()
    assert meta["val_loss"] == finetuned["final_val_loss"] and meta["user_config"]["base_checkpoint"].endswith("/3")


def test_sft_starts_from_the_base_weights(base, capsys):
    """With every lr at 0, one step leaves the restored base weights as they were. (Validating on the
    training conversations is allowed, with a note.)"""
    convs = chat.ensure_conversations(base)
    s = run_sft(base, "frozen", "--num-iterations=1", "--init-lr-frac=0", f"--data={convs}", f"--val-data={convs}")
    out = capsys.readouterr().out
    assert "note: 2,000 of the 2,000 --val-data conversations are training ones too" in out
    assert "note: --max-seq-len 128 is past the base model's 32-token context" in out
    base_params = Checkpoints(base / "base_checkpoints" / "chat").restore_params().params
    for a, b in zip(jax.tree.leaves(s["params"]), jax.tree.leaves(base_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_batch_that_does_not_divide_into_rows_is_refused_before_the_plan(base, capsys):
    with pytest.raises(UserError, match="--total-batch-size 1000 is not divisible by .* pick a multiple of 1024"):
        run_sft(base, "frozen", "--total-batch-size=1000")
    assert "steps of" not in capsys.readouterr().out  # no plan of "0 rows" a step first


def test_unset_flags_come_from_a_converted_nanochat_run(reference_dir):
    """A checkpoint converted from nanochat keeps nanochat's metadata: its run's batch and lrs (the lrs
    under optimizer_kwargs) are the ones finetuning inherits; what it does not give is said to be a default."""
    nanochat_meta = json.loads((reference_dir / "nanochat_checkpoint_a" / "meta_000000.json").read_text())
    meta = {"model_config": nanochat_meta["model_config"], "nanochat_meta": nanochat_meta}
    unset = dict.fromkeys(["device_batch_size", "total_batch_size", "embedding_lr", "unembedding_lr", "matrix_lr",
                           "scalar_lr", "max_seq_len"])  # fmt: skip
    args, said = SimpleNamespace(**(unset | {"matrix_lr": 0.05})), []
    inherit(args, meta, log=said.append)
    assert vars(args) == {"device_batch_size": 2, "total_batch_size": 524288, "embedding_lr": 0.2,
                          "unembedding_lr": 0.004, "matrix_lr": 0.05, "scalar_lr": 0.5, "max_seq_len": 64}  # fmt: skip
    assert said == [
        "from the base run: device_batch_size=2, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5, max_seq_len=64",
        "defaults (the base run does not give them): total_batch_size=524288",
    ]


def test_sft_resume_continues_exactly(base, capsys):
    flags = ["--num-iterations=6", "--save-every=3"]
    full = run_sft(base, "resume", *flags)
    folder = Path(full["checkpoint_dir"])
    assert Checkpoints(folder).steps() == [3, 6]
    shutil.rmtree(folder / "6")
    capsys.readouterr()
    # A resume's weights come from its checkpoint: another --model-step is noted and changes nothing.
    resumed = run_sft(base, "resume", *flags, "--resume-from-step=3", "--model-step=99")
    assert "finetuned from base step 3; --model-step 99 is ignored" in capsys.readouterr().out
    assert Checkpoints(folder).read_metadata()["user_config"]["base_checkpoint"].endswith("/3")
    assert resumed["history"].train_loss == full["history"].train_loss
    assert resumed["final_val_loss"] == full["final_val_loss"]
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(full["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- scripts.chat_cli -----------------------------------------------------------------------------


def read_until(fd, marker: str, out: list, timeout=120.0) -> str:
    """Read the terminal until `marker` follows everything read so far (or EOF); return the new text."""
    start, seen = len("".join(out)), ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"no {marker!r} from chat_cli; it wrote:\n{''.join(out)[-2000:]}")
        try:
            chunk = os.read(fd, 4096).decode(errors="replace")
        except OSError:  # EIO: the child closed the terminal
            chunk = ""
        if not chunk:
            break
        out.append(chunk)
        seen = "".join(out)[start:]
    return seen


def test_chat_cli_answers_two_turns_in_a_terminal(finetuned, base):
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "scripts.chat_cli", f"--base-dir={base}", "--model-tag=chat", "--max-tokens=6"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=script_env(), stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = []
    try:
        read_until(master, "User: ", out)
        os.write(master, b"What is 2+3?\n")
        first = read_until(master, "User: ", out)
        os.write(master, b"clear\n")
        read_until(master, "User: ", out)
        os.write(master, b"Hi!\n")
        second = read_until(master, "User: ", out)
        os.write(master, b"quit\n")
        read_until(master, "\0", out)  # to EOF
        assert proc.wait(timeout=30) == 0, "".join(out)
    finally:
        proc.kill()
        os.close(master)
    assert "Assistant: " in first and "Assistant: " in second
    assert "(new conversation)" in "".join(out) and "Traceback" not in "".join(out)


def test_chat_cli_one_shot_prompt(finetuned, base):
    cmd = [sys.executable, "-m", "scripts.chat_cli", f"--base-dir={base}", "--model-tag=chat", "-p", "Hi!", "-t", "0"]
    done = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "chatsft_checkpoints" in done.stderr and "User:" not in done.stdout and done.stdout.endswith("\n")
