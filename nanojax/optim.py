"""Muon for the block matrices, AdamW for the rest, as one optax partition (SPEC 4).

    groups = setup_groups(model_dim=128, matrix_lr=0.02, ...)        # nanochat's setup_optimizer
    tx = build_optimizer(params, groups, Schedule(num_iterations=100))
    updates, opt_state = tx.update(grads, opt_state, params)

Every rule reproduces nanochat's float32 arithmetic op for op (lerp as torch computes it, the
hyper-parameters as float32 scalars), so stored reference steps match to float noise. Schedules are
closed forms of the step count kept in the optimizer state: they change every step without
recompiling anything.
"""

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanojax.common import UserError
from nanojax.model import param_paths

POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# Which parameter belongs to which group: exactly one pattern must match every dotted path.
GROUP_PATTERNS = {
    "lm_head": r"lm_head\.kernel",
    "embedding": r"wte",
    "value_embeds": r"blocks\.\d+\.value_embed",
    "resid": r"resid_lambdas",
    "x0": r"x0_lambdas",
    "matrices": r"blocks\.\d+\.(attn|mlp)\.\w+\.kernel",
}


# --- schedules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """nanochat's schedules as functions of the step `it` (0-based, the steps already taken)."""

    num_iterations: int
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0

    def __post_init__(self):
        ratios = {"--warmup-ratio": self.warmup_ratio, "--warmdown-ratio": self.warmdown_ratio}
        if not all(0 <= r <= 1 for r in ratios.values()) or sum(ratios.values()) > 1:
            raise UserError(f"{ratios} must be fractions of the run (0 to 1) that add up to at most 1")
        if not 0 <= self.final_lr_frac <= 1:
            raise UserError(f"--final-lr-frac {self.final_lr_frac} must be between 0 and 1")

    def lr_multiplier(self, it):
        n = self.num_iterations
        warmup, warmdown = round(self.warmup_ratio * n), round(self.warmdown_ratio * n)
        it = jnp.asarray(it, jnp.float32)
        progress = (n - it) / max(warmdown, 1)
        decay = progress + (1 - progress) * self.final_lr_frac
        constant = jnp.where(it <= n - warmdown, 1.0, decay)
        return jnp.where(it < warmup, (it + 1) / max(warmup, 1), constant)

    @staticmethod
    def muon_momentum(it):
        frac = jnp.minimum(jnp.asarray(it, jnp.float32) / 300, 1.0)
        return (1 - frac) * 0.85 + frac * 0.95

    def weight_decay_multiplier(self, it):
        return 1 - jnp.asarray(it, jnp.float32) / self.num_iterations


CONSTANT = None  # a Schedule of None: hyper-parameters stay as built (how the reference vectors ran)


def batch_lr_scale(total_batch_size: int) -> float:
    """Every lr scales with sqrt(batch / 2^19), nanochat's reference batch."""
    return (total_batch_size / 2**19) ** 0.5


def depth_weight_decay(weight_decay: float, depth: int) -> float:
    return weight_decay * (12 / depth) ** 2


# --- groups -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    kind: str  # "adamw" or "muon"
    lr: float
    betas: tuple[float, float] = (0.8, 0.95)  # AdamW
    eps: float = 1e-10  # AdamW
    weight_decay: float = 0.0
    momentum: float = 0.95  # Muon
    beta2: float = 0.95  # Muon


def setup_groups(
    model_dim: int,
    *,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    adam_betas: tuple[float, float] = (0.8, 0.95),
    scalar_lr: float = 0.5,
) -> dict[str, Group]:
    """nanochat's GPT.setup_optimizer: the AdamW lrs scale with (model_dim / 768)^-1/2."""
    dmodel_lr_scale = (model_dim / 768) ** -0.5
    betas = tuple(adam_betas)
    return {
        "lm_head": Group("adamw", unembedding_lr * dmodel_lr_scale, betas),
        "embedding": Group("adamw", embedding_lr * dmodel_lr_scale, betas),
        "value_embeds": Group("adamw", embedding_lr * dmodel_lr_scale, betas),
        "resid": Group("adamw", scalar_lr * 0.01, betas),
        "x0": Group("adamw", scalar_lr, (0.96, 0.95)),
        "matrices": Group("muon", matrix_lr, weight_decay=weight_decay),
    }


def param_labels(params):
    """The group label of every parameter, as a pytree like `params`; names any path not in exactly one."""
    labels = []
    for path in param_paths(params):
        hits = [g for g, pattern in GROUP_PATTERNS.items() if re.fullmatch(pattern, path)]
        if len(hits) != 1:
            raise ValueError(f"parameter {path} falls in {len(hits)} optimizer groups ({hits}); it needs one")
        labels.append(hits[0])
    return jax.tree.unflatten(jax.tree.structure(params), labels)


# --- the rules --------------------------------------------------------------------------------


def lerp(start, end, weight):
    """torch.lerp's formula (its two branches round differently; matching them keeps parity)."""
    return jnp.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


class AdamWState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def adamw(group: Group, schedule: Schedule | None) -> optax.GradientTransformation:
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return AdamWState(jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params):
        f32 = jnp.float32
        lr = jnp.asarray(group.lr, f32)
        if schedule is not None:
            lr = lr * schedule.lr_multiplier(state.count)
        b1, b2 = jnp.asarray(group.betas[0], f32), jnp.asarray(group.betas[1], f32)
        eps, wd = jnp.asarray(group.eps, f32), jnp.asarray(group.weight_decay, f32)
        step = (state.count + 1).astype(f32)
        mu = jax.tree.map(lambda m, g: lerp(m, g, 1 - b1), state.mu, grads)
        nu = jax.tree.map(lambda v, g: lerp(v, jnp.square(g), 1 - b2), state.nu, grads)
        bias1, bias2 = 1 - b1**step, 1 - b2**step
        step_size = lr / bias1

        def delta(p, m, v):
            # nanochat: p *= 1 - lr*wd; p += -step_size * m / denom. With wd = 0 (every AdamW group)
            # p + delta is exactly that.
            return -(p * (lr * wd)) - step_size * (m / (jnp.sqrt(v / bias2) + eps))

        return jax.tree.map(delta, params, mu, nu), AdamWState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


class MuonState(NamedTuple):
    count: jax.Array
    momentum: optax.Updates  # like the params
    second_moment: optax.Updates  # factored NorMuon statistic, torch orientation: (rows, 1) or (1, cols)


def _factored_shape(kernel_shape):
    cols, rows = kernel_shape  # a JAX kernel is (in, out) = torch's (cols, rows)
    return (rows, 1) if rows >= cols else (1, cols)


def polar_express(X, steps: int = 5):
    """Approximately orthogonalise X (torch orientation), in X's dtype, with the smaller Gram matrix."""
    X = X / (jnp.linalg.norm(X.astype(jnp.float32)).astype(X.dtype) * 1.02 + 1e-6)
    tall = X.shape[-2] > X.shape[-1]
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        A = X.T @ X if tall else X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + X @ B if tall else a * X + B @ X
    return X


def muon(group: Group, schedule: Schedule | None, orth_dtype=jnp.float32) -> optax.GradientTransformation:
    """Nesterov momentum -> Polar Express -> NorMuon variance normalisation -> cautious weight decay."""

    def init(params):
        second = jax.tree.map(lambda p: jnp.zeros(_factored_shape(p.shape), p.dtype), params)
        return MuonState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params), second)

    def update(grads, state, params):
        f32 = jnp.float32
        momentum = jnp.asarray(group.momentum, f32)
        lr_base, wd = jnp.asarray(group.lr, f32), jnp.asarray(group.weight_decay, f32)
        if schedule is not None:
            momentum = schedule.muon_momentum(state.count)
            lr_base = lr_base * schedule.lr_multiplier(state.count)
            wd = wd * schedule.weight_decay_multiplier(state.count)
        beta2 = jnp.asarray(group.beta2, f32)

        def one(g, p, m, s):
            m = lerp(m, g, 1 - momentum)
            g = lerp(g, m, momentum)
            G, P = g.T, p.T  # torch orientation: rows = out, cols = in
            rows, cols = G.shape
            lr = lr_base * math.sqrt(max(1.0, rows / cols))
            X = polar_express(G.astype(orth_dtype))
            red_axis = -1 if rows >= cols else -2
            v_mean = jnp.mean(jnp.square(X.astype(f32)), axis=red_axis, keepdims=True)
            n = X.shape[red_axis]
            v_norm = jnp.sqrt(jnp.sum(v_mean) * n)
            s = lerp(s, v_mean, 1 - beta2)
            step = jax.lax.rsqrt(jnp.maximum(s, 1e-10))
            v_norm_new = jnp.sqrt(jnp.sum((v_mean * n) * jnp.square(step)))
            X = X * (step * (v_norm / jnp.maximum(v_norm_new, 1e-10))).astype(X.dtype)
            # The reference rounds lr and wd to the orthogonalisation dtype (bf16 in nanochat).
            lr_c, wd_c = lr.astype(X.dtype), wd.astype(X.dtype)
            mask = (X.astype(f32) * P) >= 0
            delta = -((lr_c * X).astype(f32) + (lr_c * wd_c).astype(f32) * P * mask)
            return delta.T, m, s

        leaves, treedef = jax.tree.flatten(grads)
        others = (jax.tree.leaves(t) for t in (params, state.momentum, state.second_moment))
        deltas, moms, seconds = zip(*map(one, leaves, *others), strict=True) if leaves else ((), (), ())
        unflat = lambda xs: jax.tree.unflatten(treedef, list(xs))  # noqa: E731
        return unflat(deltas), MuonState(state.count + 1, unflat(moms), unflat(seconds))

    return optax.GradientTransformation(init, update)


def build_optimizer(
    params, groups: dict[str, Group], schedule: Schedule | None = CONSTANT, orth_dtype=jnp.float32
) -> optax.GradientTransformation:
    """One rule per group over explicit labels (every parameter in exactly one group)."""
    labels = param_labels(params)
    used = set(jax.tree.leaves(labels))
    if missing := used - set(groups):
        raise ValueError(f"no optimizer group for labels {sorted(missing)}")
    rules = {
        name: muon(g, schedule, orth_dtype) if g.kind == "muon" else adamw(g, schedule)
        for name, g in groups.items()
        if name in used
    }
    return optax.multi_transform(rules, labels)


def scaled_groups(
    model_dim: int, depth: int, total_batch_size: int, *, weight_decay: float, adam_betas: tuple[float, float], **lrs
) -> dict[str, Group]:
    """base_train's groups: every lr (embedding_lr, unembedding_lr, matrix_lr, scalar_lr) scaled by the batch
    size, weight decay by depth."""
    _check_weight_decay(weight_decay)  # the value as given, not as scaled
    wd = depth_weight_decay(weight_decay, depth)
    return _lrs_times(batch_lr_scale(total_batch_size), model_dim, wd, adam_betas, lrs)


def finetune_groups(
    model_dim: int, init_lr_frac: float, *, weight_decay: float, adam_betas: tuple[float, float], **lrs
) -> dict[str, Group]:
    """chat_sft's groups: the lrs as given (not scaled by the batch size, as pretraining's are) x init_lr_frac."""
    if not 0 <= init_lr_frac < math.inf:
        raise UserError(f"--init-lr-frac {init_lr_frac} must be a finite number >= 0")
    _check_weight_decay(weight_decay)
    return _lrs_times(init_lr_frac, model_dim, weight_decay, adam_betas, lrs)


def _check_weight_decay(weight_decay: float) -> None:
    if not 0 <= weight_decay < math.inf:
        raise UserError(f"--weight-decay {weight_decay} must be a finite number >= 0")


def _lrs_times(scale: float, model_dim: int, weight_decay: float, adam_betas, lrs: dict) -> dict[str, Group]:
    if bad := [f"--{name.replace('_', '-')} {lr}" for name, lr in lrs.items() if not 0 <= lr < math.inf]:
        raise UserError(f"{', '.join(bad)}: learning rates must be finite numbers >= 0")
    if not all(0 <= beta < 1 for beta in adam_betas):  # beta2 = 1 never updates the second moment from 0
        raise UserError(f"--adam-beta1, --adam-beta2 {adam_betas[0]}, {adam_betas[1]}: AdamW's betas must be >= 0 "
                        "and below 1")  # fmt: skip
    scaled = {name: lr * scale for name, lr in lrs.items()}
    return setup_groups(model_dim, weight_decay=weight_decay, adam_betas=adam_betas, **scaled)
