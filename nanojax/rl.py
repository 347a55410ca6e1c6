"""Reinforcement learning on tasks with checkable answers, as nanochat's chat_rl.

nanochat calls it GRPO; it is closer to REINFORCE: the samples come from the model being trained (so
no PPO ratio or clipping), there is no KL term to a reference model, and a sample's advantage is its
reward minus the mean reward of its question's samples (not divided by their spread). The objective is
normalised per token: each pass sums log-probability x advantage over the sampled tokens (not the
prompt, not the calculator's forced output) and divides by their count and by the step's passes.
A sample's reward is 1 when its final answer agrees with the reference (chat_eval.agrees), else 0.

scripts/chat_rl.py parses the flags and calls `reinforce`.
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nanojax import __version__
from nanojax.chat_eval import Task, sample_answers
from nanojax.checkpoint import Checkpoints
from nanojax.common import Interrupted, UserError
from nanojax.engine import Engine, bucket
from nanojax.model import GPTConfig
from nanojax.optim import Schedule
from nanojax.runs import check_run_folder, claimed, set_aside_previous_run
from nanojax.sharding import batch_sharding, global_batch, make_mesh, multi_process_env, replicated
from nanojax.train import OptimSettings, StopRequest, fmt_time, init_state


@dataclass
class Rollout:
    """One question's samples as training rows: targets are -1 where no loss goes."""

    inputs: np.ndarray  # (num_samples, length - 1)
    targets: np.ndarray
    rewards: np.ndarray  # (num_samples,)

    @property
    def advantages(self) -> np.ndarray:
        return self.rewards - self.rewards.mean()


def rollout(engine: Engine, task: Task, i: int, num_samples: int, **sampling) -> Rollout:
    """num_samples answers to item i of the task, their rewards and training rows."""
    answers = sample_answers(engine, task, i, num_samples, **sampling)
    sequences, masks = answers.sequences, answers.masks
    # Padded with <|assistant_end|>, masked: the stop token itself is not part of a sample (nanochat's too).
    length = max(len(s) for s in sequences)
    ids = np.full((num_samples, length), engine.tokenizer.encode_special("<|assistant_end|>"), np.int32)
    trained = np.zeros((num_samples, length), bool)
    for row, (seq, mask) in enumerate(zip(sequences, masks, strict=True)):
        ids[row, : len(seq)], trained[row, : len(mask)] = seq, mask
    targets = np.where(trained[:, 1:], ids[:, 1:], -1).astype(np.int32)
    return Rollout(ids[:, :-1], targets, np.asarray(answers.rewards, np.float32))


def stack_passes(rollouts: list[Rollout], rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The step's rollouts as passes of `rows` samples: (passes, rows, T) inputs and targets, (passes, rows)
    advantages, T padded to a power of two so that steps share compilations."""
    T = bucket(max(r.inputs.shape[1] for r in rollouts))
    pad = lambda a, value: np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=value)  # noqa: E731
    inputs = np.concatenate([pad(r.inputs, 0) for r in rollouts])
    targets = np.concatenate([pad(r.targets, -1) for r in rollouts])
    advantages = np.concatenate([r.advantages for r in rollouts])
    passes = len(inputs) // rows
    return inputs.reshape(passes, rows, T), targets.reshape(passes, rows, T), advantages.reshape(passes, rows)


def make_rl_step(state, mesh):
    """The jitted update: the policy-gradient loss's gradients summed over passes (each pass's objective per
    sampled token, over the number of passes), then the optimizer's step."""
    graphdef, tx = state.graphdef, state.tx

    def loss_fn(params, inputs_BT, targets_BT, advantages_B, scale):
        nll_BT = nnx.merge(graphdef, params).loss(inputs_BT, targets_BT, reduction="none")  # 0 where ignored
        tokens = jnp.maximum((targets_BT >= 0).sum(), 1)
        return (nll_BT * advantages_B[:, None]).sum() / tokens * scale  # minus log-prob x advantage

    def step(params, opt_state, inputs_PBT, targets_PBT, advantages_PB):
        scale = 1.0 / inputs_PBT.shape[0]

        def one_pass(acc, batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch, scale)
            return jax.tree.map(jnp.add, acc, grads), loss

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses_P = jax.lax.scan(one_pass, zeros, (inputs_PBT, targets_PBT, advantages_PB))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses_P.sum()

    rows = batch_sharding(mesh)
    return jax.jit(
        step,
        donate_argnums=(0, 1),
        in_shardings=(state.param_shardings, state.opt_shardings, rows, rows, rows),
        out_shardings=(state.param_shardings, state.opt_shardings, replicated(mesh)),
    )


def pass_at_k(engine: Engine, task: Task, k: int, max_tokens: int, top_k, seed: int) -> list[float]:
    """pass@1..k over the task's items, from k samples each at temperature 1 (nanochat's RL evaluation)."""
    hits = np.zeros(k)
    for i in range(len(task.items)):
        answers = sample_answers(engine, task, i, k, max_tokens=max_tokens, temperature=1.0, top_k=top_k, seed=seed + i)
        hits += np.maximum.accumulate(answers.rewards) > 0  # pass@j: one of the first j samples passed
    return (hits / len(task.items)).tolist()


EVAL_SEED = 10**6  # every evaluation draws with the same seeds, so their pass@k compare


@dataclass
class RLSettings:
    examples_per_step: int = 16
    num_samples: int = 16
    device_batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    num_epochs: int = 1
    eval_every: int = 60
    save_every: int = 60
    seed: int = 0


def reinforce(config: GPTConfig, base_params, tokenizer, train_task: Task, val_task: Task, groups: dict,
              settings: RLSettings, checkpoint_dir, user_config: dict, log=print) -> dict:  # fmt: skip
    """Train from base_params(targets) -> params (a chat model's, as init_state's load_params) on train_task
    with the optimizer groups (optim.finetune_groups); evaluate pass@k on val_task; save to checkpoint_dir
    every save_every steps and at the end. Returns a summary."""
    s = settings
    mesh = make_mesh()
    if multi_process_env():  # each process would train alone, all saving into one folder
        raise UserError("chat_rl runs in one process (on all its devices): start it without JAX_NUM_PROCESSES and "
                        "JAX_COORDINATOR_ADDRESS")  # fmt: skip
    rows = s.device_batch_size * mesh.size  # a pass's samples, split over the devices
    if (s.examples_per_step * s.num_samples) % rows:
        total = s.examples_per_step * s.num_samples
        raise UserError(f"--examples-per-step x --num-samples = {total} samples don't fill passes of "
                        f"--device-batch-size x {mesh.size} device(s) = {rows}: change one of them")  # fmt: skip
    num_steps = len(train_task.items) // s.examples_per_step * s.num_epochs
    if num_steps < 1:
        raise UserError(f"{len(train_task.items)} training items make no step of --examples-per-step "
                        f"{s.examples_per_step}: give more items or fewer per step")  # fmt: skip
    # nanochat's RL schedule: lr falling linearly from the first step to 0 at the end.
    optim = OptimSettings(groups, Schedule(num_steps, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0))
    state = init_state(config, optim, mesh, load_params=base_params)
    graphdef = state.graphdef
    step_fn = make_rl_step(state, mesh)
    sharding = batch_sharding(mesh)
    params, opt_state = state.params, state.opt_state
    del state  # the step donates these buffers

    def engine_now():
        return Engine(nnx.merge(graphdef, params), tokenizer)

    log(f"{len(train_task.items):,} training items, {len(val_task.items):,} held out | {num_steps} steps of "
        f"{s.examples_per_step} items x {s.num_samples} samples, in passes of {rows}")  # fmt: skip
    history = {"reward": [], "pass@k": []}
    folder = Path(checkpoint_dir)
    ckpts, saved, t_start = None, [], time.perf_counter()
    sample_settings = dict(max_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k)
    order = np.random.default_rng(s.seed).permutation(len(train_task.items))

    def evaluate(step):
        passk = pass_at_k(engine_now(), val_task, s.device_batch_size, s.max_new_tokens, s.top_k, EVAL_SEED)
        history["pass@k"].append((step, passk))
        log(f"step {step:05d} | " + ", ".join(f"pass@{k + 1} {p:.4f}" for k, p in enumerate(passk)))

    def save(step):
        nonlocal ckpts
        if ckpts is None:  # as pretraining: an earlier run in the folder is moved aside at the first save
            set_aside_previous_run(folder, log)
            ckpts = Checkpoints(folder)
        meta = {"step": step, "model_config": asdict(config), "user_config": user_config,
                "loop_state": {"history": history}, "tokenizer_fingerprint": tokenizer.fingerprint(),
                "nanojax_version": __version__}  # fmt: skip
        ckpts.save(step, params, opt_state, None, meta)
        saved.append(step)
        log(f"step {step:05d} | checkpoint {ckpts.step_dir(step)}")

    with claimed(folder):
        check_run_folder(folder)  # a folder that is not a run's is refused now, not at the first save
        stop = StopRequest(log)  # Ctrl-C: this step is finished and saved; a second one stops at once
        try:
            for step in range(num_steps):
                if s.eval_every > 0 and step % s.eval_every == 0:
                    evaluate(step)
                t0 = time.perf_counter()
                engine = engine_now()
                first = step * s.examples_per_step
                rollouts = [rollout(engine, train_task, int(order[(first + j) % len(order)]), s.num_samples,
                                    seed=hash((s.seed, step, j)) & 0x7FFFFFFF, **sample_settings)
                            for j in range(s.examples_per_step)]  # fmt: skip
                x, y, adv = stack_passes(rollouts, rows)
                params, opt_state, loss = step_fn(params, opt_state, global_batch(x, sharding),
                                                  global_batch(y, sharding), global_batch(adv, sharding))  # fmt: skip
                loss = float(loss)
                if not math.isfinite(loss):
                    raise UserError(f"the loss became {loss} at step {step + 1}: lower --init-lr-frac")
                reward = float(np.mean([r.rewards.mean() for r in rollouts]))
                history["reward"].append((step + 1, reward))
                length = float(np.mean([(r.targets >= 0).sum(1).mean() for r in rollouts]))
                dt = time.perf_counter() - t0
                elapsed = time.perf_counter() - t_start
                eta = fmt_time(elapsed / (step + 1) * (num_steps - step - 1))
                log(f"step {step + 1:05d}/{num_steps:05d} | reward {reward:.4f} | loss {loss:+.6f} | sampled tokens "
                    f"{length:.1f} | dt {dt:.1f}s | elapsed {fmt_time(elapsed)} | eta {eta}")  # fmt: skip
                last = step + 1 == num_steps
                if last:  # whatever --eval-every, and before the save, whose metadata keeps the history
                    evaluate(num_steps)
                if last or (s.save_every > 0 and (step + 1) % s.save_every == 0):
                    save(step + 1)
                if stop.asked and not last:
                    if saved[-1:] != [step + 1]:
                        save(step + 1)
                    raise Interrupted(f"stopped at step {step + 1}, saved in {ckpts.step_dir(step + 1)}")
        except KeyboardInterrupt:
            many = len(saved) > 1
            where = (f"step{'s' if many else ''} {', '.join(map(str, saved))} {'are' if many else 'is'} saved in "
                     f"{folder}" if saved else "no checkpoint was saved")  # fmt: skip
            raise Interrupted(f"interrupted: {where}") from None
        finally:
            stop.restore()
            if ckpts:
                ckpts.close()  # waits for pending saves
    return {"num_steps": num_steps, "history": history, "checkpoint_dir": str(folder), "params": params,
            "user_config": user_config}  # fmt: skip
