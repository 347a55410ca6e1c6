"""chat_rl (nanojax/rl.py): rollouts train on the sampled tokens only, the policy-gradient step's
objective and its zero update when every sample earns the same reward, and the script end to end.

Run: python -m pytest -q tests/test_rl.py
"""

import dataclasses
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from conftest import TINY_RUN
from flax import nnx

from nanojax import rl
from nanojax.chat_eval import Task
from nanojax.checkpoint import Checkpoints
from nanojax.common import Interrupted, UserError
from nanojax.engine import Engine
from nanojax.model import GPT, GPTConfig
from nanojax.optim import finetune_groups
from nanojax.pretrain import pretrain
from nanojax.runs import check_run_folder
from nanojax.sharding import make_mesh
from nanojax.tokenizer import get_tokenizer
from nanojax.train import OptimSettings, init_state
from scripts import chat_eval as chat_eval_script
from scripts import chat_rl
from scripts import pretrain as pretrain_script


@pytest.fixture(scope="module")
def tok(tiny_base):
    return get_tokenizer(tiny_base)


@pytest.fixture(scope="module")
def config(tok):
    return GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def task_of(*pairs):
    return Task("t", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                      for q, a in pairs], categorical=False)  # fmt: skip


def test_a_rollout_trains_on_the_sampled_tokens_and_rewards_agreeing_answers(tok, config):
    engine = Engine(GPT(config, rngs=nnx.Rngs(0)), tok)
    sampling = dict(max_tokens=6, temperature=1.0, top_k=None, seed=3)
    task = task_of(("alpha beta", "gamma"))
    r = rl.rollout(engine, task, 0, 4, **sampling)
    prompt = tok.render_for_completion(task.items[0]["messages"])
    sequences, masks = engine.generate_batch(prompt, 4, **sampling)  # the same samples, same seed
    assert r.inputs.shape == r.targets.shape == (4, max(map(len, sequences)) - 1)
    for row, (seq, mask) in enumerate(zip(sequences, masks, strict=True)):
        np.testing.assert_array_equal(r.inputs[row, : len(seq) - 1], seq[:-1])
        trained = r.targets[row] >= 0
        assert not trained[: len(prompt) - 1].any() and trained.sum() == sum(mask) == len(seq) - len(prompt)
        np.testing.assert_array_equal(r.targets[row][trained], seq[len(prompt) :])
    # The reference as the model's own greedy answer: every greedy sample earns 1, no advantage.
    answer = tok.decode(engine.generate_batch(prompt, 1, max_tokens=6, temperature=0.0)[0][0][len(prompt) :])
    greedy = rl.rollout(engine, task_of(("alpha beta", answer)), 0, 3, max_tokens=6, temperature=0.0)
    assert greedy.rewards.tolist() == [1.0, 1.0, 1.0] and not greedy.advantages.any()


def test_the_step_follows_the_advantage_weighted_log_likelihood(tok, config):
    groups = finetune_groups(config.n_embd, 1.0, weight_decay=0.0, adam_betas=(0.8, 0.95), embedding_lr=0.2,
                             unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5)  # fmt: skip
    mesh = make_mesh(1)
    state = init_state(config, OptimSettings(groups, None), mesh, seed=1)
    before = jax.tree.map(np.asarray, state.params)
    rng = np.random.default_rng(0)
    x = rng.integers(0, config.vocab_size, (2, 2, 16)).astype(np.int32)
    y = np.where(rng.random((2, 2, 16)) < 0.6, rng.integers(0, config.vocab_size, (2, 2, 16)), -1).astype(np.int32)
    step = rl.make_rl_step(state, mesh)
    model = nnx.merge(state.graphdef, state.params)
    # Advantage 1 everywhere: each pass's objective is its mean NLL, the step's the mean over passes.
    expected = np.mean([float(model.loss(x[p], y[p])) for p in range(2)])
    params, opt_state, loss = step(state.params, state.opt_state, x, y, np.ones((2, 2), np.float32))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Every sample rewarded alike: advantages 0, nothing to learn, the params stay as they were.
    state = init_state(config, OptimSettings(groups, None), mesh, seed=1)
    params, _, loss = step(state.params, state.opt_state, x, y, np.zeros((2, 2), np.float32))
    assert float(loss) == 0.0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_the_script_trains_saves_and_chat_eval_reads_the_result(tiny_base, tmp_path, capsys):
    for name in ("base_data", "tokenizer"):
        shutil.copytree(tiny_base / name, tmp_path / name)
    pretrain(pretrain_script.parse_args([*TINY_RUN, "--num-iterations=1", f"--base-dir={tmp_path}"]), tmp_path, ["a"])
    chat_rl.main(["--source=base", f"--base-dir={tmp_path}", "--task=Arithmetic", "--num-examples=4",
                  "--examples-per-step=2", "--num-samples=4", "--device-batch-size=1", "--max-new-tokens=4",
                  "--eval-examples=2", "--eval-every=-1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "4 training items, 2 held out | 2 steps of 2 items x 4 samples, in passes of 8" in out
    assert "step 00002/00002 | reward " in out
    assert re.findall(r"step (\d+) \| pass@1 ", out) == ["00002"]  # --eval-every -1: at the end only
    folder = tmp_path / "chatrl_checkpoints" / "d2"
    assert Checkpoints(folder).steps() == [2] and (folder / "reward.png").is_file()
    assert "| step | pass@1 |\n|---|---|\n| 2 | " in (folder / "report.md").read_text()
    history = Checkpoints(folder).read_metadata()["loop_state"]["history"]
    assert [step for step, _ in history["pass@k"]] == [2] and [step for step, _ in history["reward"]] == [1, 2]
    check_run_folder(folder)  # all of it a run's: a second run moves it aside
    chat_eval_script.main(["--source=rl", f"--base-dir={tmp_path}", "-a", "Arithmetic", "-x", "2", "-m", "4"])
    assert "## Chat evaluation (rl model, step 2)" in capsys.readouterr().out


def test_a_multi_process_environment_is_refused(monkeypatch):
    """Each process would train a model of its own, all saving into one folder."""
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(UserError, match="chat_rl runs in one process .*without JAX_NUM_PROCESSES"):
        rl.reinforce(None, None, None, None, None, {}, rl.RLSettings(), "/nonexistent", {})


def test_ctrl_c_keeps_the_checkpoints_saved_and_names_them(tok, config, tmp_path, monkeypatch):
    groups = finetune_groups(config.n_embd, 0.05, weight_decay=0.0, adam_betas=(0.8, 0.95), embedding_lr=0.2,
                             unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5)  # fmt: skip
    task = task_of(*[(f"q{i}", "1") for i in range(4)])
    real, calls = rl.rollout, []

    def rollout(*args, **kwargs):  # Ctrl-C while sampling step 3's answers
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "rollout", rollout)
    settings = rl.RLSettings(examples_per_step=1, num_samples=8, device_batch_size=1, max_new_tokens=3,
                             eval_every=-1, save_every=1)  # fmt: skip
    with pytest.raises(Interrupted, match=f"interrupted: steps 1, 2 are saved in {tmp_path / 'rl'}"):
        rl.reinforce(config, None, tok, task, task, groups, settings, tmp_path / "rl", {})
    assert Checkpoints(tmp_path / "rl").steps() == [1, 2]

    def ctrl_c_while_sampling(*args, **kwargs):  # as a terminal's Ctrl-C: the step goes on, then is saved
        calls.append(1)
        if len(calls) == 5:  # step 2 of this run
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "rollout", ctrl_c_while_sampling)
    settings = dataclasses.replace(settings, save_every=-1)  # at the end only: the stop saves its step
    with pytest.raises(Interrupted, match=f"stopped at step 2, saved in {tmp_path / 'again' / '2'}"):
        rl.reinforce(config, None, tok, task, task, groups, settings, tmp_path / "again", {})
    assert Checkpoints(tmp_path / "again").steps() == [2]
