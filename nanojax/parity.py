"""Checks nanojax against a nanochat reference vector set (the format of ../shared/reference).

Each check is link by link, as the reference README asks: forward and gradients at stored params,
the optimizer fed stored gradients. `run_checks` returns one Row per check plus the names skipped
because the set lacks their arrays. scripts/parity.py prints them.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nanojax.common import UserError
from nanojax.convert import from_nanochat, nanochat_name, to_nanochat
from nanojax.engine import cached_greedy, greedy
from nanojax.evaluate import bits_per_byte, bpb_sums
from nanojax.model import GPT, GPTConfig, param_paths, rotary_tables
from nanojax.optim import Group, Schedule, build_optimizer, param_labels, scaled_groups, setup_groups
from nanojax.sharding import make_mesh
from nanojax.train import OptimSettings, init_state, make_train_step

# Tolerances suggested by the reference README for a float32 port.
TOL_LOGITS, TOL_LOGITS_STEP1, TOL_LOSS, TOL_GRAD = 1e-6, 2e-6, 1e-6, 1e-7


def loss_tolerance(value) -> float:
    """1e-6, but never under two float32 ulps of the value: at a loss of ln(8192) = 9.01 one ulp is 9.5e-7."""
    return max(TOL_LOSS, 2 * float(np.spacing(np.float32(abs(value)))))


@dataclass
class Row:
    name: str
    diff: float
    tol: float
    ok: bool
    note: str = ""


def load_vectors(json_path) -> tuple[dict, dict[str, np.ndarray]]:
    """The set's json and the merged arrays of every npz it lists."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise UserError(f"no vector set at {json_path}: pass the path of a reference json such as a.json")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{json_path} is not a vector set's json: pass the json (a.json), not its npz") from None
    if not isinstance(meta, dict) or "gpt_config" not in meta:
        raise UserError(f"{json_path} is not a vector set's json (it has no gpt_config): pass one such as a.json")
    arrays = {}
    for name in meta.get("files", {}):
        path = json_path.parent / name
        if not path.is_file():
            raise UserError(f"{json_path.name} lists {name}, which is missing next to it: copy the whole set")
        with np.load(path) as z:
            arrays.update({k: z[k] for k in z.files})
    return meta, arrays


def prefixed(arrays: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def tree_diff(ours: dict, ref: dict) -> tuple[float, str]:
    """Max abs difference over tensors with nanochat names, and the tensor where it occurs."""
    worst, where = 0.0, ""
    for name, arr in ref.items():
        d = max_diff(ours[name], arr)
        if d > worst:
            worst, where = d, name
    return worst, where


class Reference:
    """A vector set and the nanojax model built from its config, with the pieces the checks share."""

    def __init__(self, json_path):
        self.meta, self.arrays = load_vectors(json_path)
        self.config = GPTConfig(**self.meta["gpt_config"])
        self.model = GPT(self.config, rngs=nnx.Rngs(0))
        self.graphdef, state = nnx.split(self.model)
        self.like = nnx.to_pure_dict(nnx.state(self.model, nnx.Param))
        self.idx = jnp.asarray(self.arrays["idx"])
        self.targets = jnp.asarray(self.arrays["targets"])

        def loss_fn(params, idx, targets):
            return nnx.merge(self.graphdef, params).loss(idx, targets)

        self.forward = jax.jit(lambda params, idx: nnx.merge(self.graphdef, params)(idx))
        self.loss_none = jax.jit(lambda p, i, t: nnx.merge(self.graphdef, p).loss(i, t, reduction="none"))
        self.value_and_grad = jax.jit(jax.value_and_grad(loss_fn))

    def has(self, *keys) -> bool:
        return all(k in self.arrays or any(a.startswith(k) for a in self.arrays) for k in keys)

    def params(self, prefix: str):
        return from_nanochat(prefixed(self.arrays, prefix), self.like)

    def greedy(self, params, prompt, n: int):
        """n greedy tokens by repeated full forward (no cache), and the logits that chose each."""
        tokens, logits = greedy(lambda idx: self.forward(params, jnp.asarray(idx)), [list(prompt)], n)
        return np.array(tokens[0]), logits[0]


def model_checks(ref: Reference) -> tuple[list[Row], list[str]]:
    rows, skipped = [], []
    a = ref.arrays

    def check(name, diff, tol, note=""):
        rows.append(Row(name, diff, tol, diff <= tol, note))

    n_params = ref.model.num_params()
    expected = ref.meta.get("checks", {}).get("num_scaling_params", {}).get("total")
    if expected is None:
        expected = sum(v.size for v in prefixed(a, "param/").values())
    check("param_count", abs(n_params - expected), 0, f"{n_params:,} vs {expected:,}")

    if ref.has("buffer/cos"):
        rows_needed = a["buffer/cos"].shape[0]
        cos, sin = rotary_tables(rows_needed, ref.config.head_dim)
        check("rotary_tables", max(max_diff(cos, a["buffer/cos"]), max_diff(sin, a["buffer/sin"])), 0.0)
    else:
        skipped.append("rotary_tables")

    p0 = ref.params("param/")
    if ref.has("logits"):
        check("logits", max_diff(ref.forward(p0, ref.idx), a["logits"]), TOL_LOGITS)
    else:
        skipped.append("logits")
    loss, grads = ref.value_and_grad(p0, ref.idx, ref.targets)
    if ref.has("loss_mean"):
        check("loss_mean", max_diff(loss, a["loss_mean"]), loss_tolerance(a["loss_mean"]))
    else:
        skipped.append("loss_mean")
    loss_none = ref.loss_none(p0, ref.idx, ref.targets)
    if ref.has("loss_none"):
        ln = np.asarray(loss_none).reshape(-1)
        check("loss_none", max_diff(ln, a["loss_none"]), loss_tolerance(np.max(a["loss_none"])))
    else:
        skipped.append("loss_none")
    if ref.has("bpb", "token_bytes"):
        bpb = bits_per_byte(*bpb_sums(loss_none, ref.targets, a["token_bytes"]))
        check("bpb", abs(bpb - float(a["bpb"])), TOL_LOSS)
    else:
        skipped.append("bpb")
    if ref.has("grad1/"):
        diff, where = tree_diff(to_nanochat(grads), prefixed(a, "grad1/"))
        check("grad1", diff, TOL_GRAD, where)
    else:
        skipped.append("grad1")

    for prefix, logits_key, loss_key, grad_key in (
        ("step1/", "logits_after_step1", "loss2", "grad2/"),
        ("step1_fp32/", None, "loss2_fp32", "grad2_fp32/"),
    ):
        if not ref.has(prefix):
            skipped.append(f"{prefix}forward")
            continue
        p1 = ref.params(prefix)
        if logits_key and ref.has(logits_key):
            check(logits_key, max_diff(ref.forward(p1, ref.idx), a[logits_key]), TOL_LOGITS_STEP1)
        loss1, grads1 = ref.value_and_grad(p1, ref.idx, ref.targets)
        if ref.has(loss_key):
            check(loss_key, max_diff(loss1, a[loss_key]), loss_tolerance(a[loss_key]))
        if ref.has(grad_key):
            diff, where = tree_diff(to_nanochat(grads1), prefixed(a, grad_key))
            check(grad_key.rstrip("/"), diff, TOL_GRAD, where)

    rows_gen, skipped_gen = generation_checks(ref, p0)
    return rows + rows_gen, skipped + skipped_gen


def generation_checks(ref: Reference, p0) -> tuple[list[Row], list[str]]:
    rows, skipped = [], []
    a = ref.arrays
    if not ref.has("gen_prompt"):
        return rows, ["generation"]
    prompt = a["gen_prompt"]
    cases = [("gen_tokens", "param/", None), ("gen_tokens_step1", "step1/", None)]
    cases.append(("gen_long_tokens_step1", "step1/", "gen_long_logits_step1"))
    for key, prefix, logits_key in cases:
        if not ref.has(key, prefix):
            skipped.append(key)
            continue
        params = p0 if prefix == "param/" else ref.params(prefix)
        uncached = ref.greedy(params, prompt, len(a[key]))
        cached = cached_greedy(nnx.merge(ref.graphdef, params), list(prompt), len(a[key]))
        for how, (tokens, logits) in (("uncached", uncached), ("KV cache", cached)):
            mismatches = int(np.sum(np.asarray(tokens) != a[key]))
            rows.append(Row(f"{key} ({how})", mismatches, 0, mismatches == 0, f"{mismatches} tokens differ"))
            if logits_key and ref.has(logits_key):
                d = max_diff(logits, a[logits_key])
                rows.append(Row(f"{logits_key} ({how})", d, TOL_LOGITS_STEP1, d <= TOL_LOGITS_STEP1))
    return rows, skipped


def run_checks(json_path) -> tuple[list[Row], list[str]]:
    ref = Reference(json_path)
    rows, skipped = model_checks(ref)
    opt_rows, opt_skipped = optimizer_checks(ref)
    return rows + opt_rows, skipped + opt_skipped


# --- optimizer rows ------------------------------------------------------------------------------

TOL_STEP_FP32, TOL_STEP1_BF16, TOL_STEP2_BF16 = 1e-6, 2e-3, 5e-3
MAX_FLIP_FRACTION = 1e-3  # cautious-weight-decay mask flips allowed per tensor (0.1%)


def reference_groups(ref: Reference) -> dict[str, Group]:
    kwargs = dict(ref.meta["optimizer"]["kwargs"])
    kwargs["adam_betas"] = tuple(kwargs.get("adam_betas", (0.8, 0.95)))
    return setup_groups(ref.config.n_embd, **kwargs)


def group_rows(ref: Reference, groups: dict[str, Group]) -> list[Row]:
    """Our labels and hyper-parameters against the json's listing of nanochat's param groups."""
    labels = dict(zip(param_paths(ref.like), jax.tree.leaves(param_labels(ref.like)), strict=True))
    by_nanochat = {nanochat_name(path)[0]: label for path, label in labels.items()}
    bad = []
    for g in ref.meta["optimizer"].get("groups", []):
        ours = {by_nanochat[name] for name in g["params"]}
        if len(ours) != 1:
            bad.append(f"{g['params']} split over {sorted(ours)}")
            continue
        ours = groups[ours.pop()]
        same = ours.kind == g["kind"] and math.isclose(ours.lr, g["lr"], rel_tol=1e-9)
        if g["kind"] == "adamw":
            same &= tuple(ours.betas) == tuple(g["betas"]) and ours.eps == g["eps"]
            same &= ours.weight_decay == g["weight_decay"]
        else:
            same &= ours.weight_decay == g["weight_decay"] and ours.momentum == g["momentum"]
            same &= ours.beta2 == g["beta2"]
        if not same:
            bad.append(f"{g['params'][0]}: ours {ours}, nanochat {g}")
    return [Row("optimizer_groups", len(bad), 0, not bad, "; ".join(bad)[:200])]


def step_row(name, ours: dict, ref_after: dict, before: dict, groups, labels, tol) -> Row:
    """Max diff of one optimizer step; elements off only by a flipped cautious-decay mask are counted."""
    worst, where, flips, bad = 0.0, "", 0, []
    for key, want in ref_after.items():
        diff = np.abs(np.asarray(ours[key], np.float64) - want)
        over = diff > tol
        g = groups[labels[key]]
        if g.kind == "muon":
            rows, cols = want.shape
            lr = g.lr * math.sqrt(max(1.0, rows / cols))
            flipped = over & (diff <= lr * g.weight_decay * np.abs(before[key]) + tol)
            if flipped.sum() > MAX_FLIP_FRACTION * diff.size:
                bad.append(f"{key}: {int(flipped.sum())} mask flips")
            flips += int(flipped.sum())
            diff = np.where(flipped, 0.0, diff)
        if diff.max() > worst:
            worst, where = float(diff.max()), key
    note = f"{where}; {flips} cautious-wd mask flips" + (f"; {bad}" if bad else "")
    return Row(name, worst, tol, worst <= tol and not bad, note)


def optimizer_checks(ref: Reference) -> tuple[list[Row], list[str]]:
    if "optimizer" not in ref.meta or not ref.has("grad1/"):
        return [], ["optimizer"]
    groups = reference_groups(ref)
    rows = group_rows(ref, groups)
    labels_tree = param_labels(ref.like)
    by_name = dict(zip(param_paths(ref.like), jax.tree.leaves(labels_tree), strict=True))
    labels = {nanochat_name(path)[0]: label for path, label in by_name.items()}
    skipped = []
    for variant, orth_dtype, tol1, tol2 in (
        ("_fp32", jnp.float32, TOL_STEP_FP32, TOL_STEP_FP32),
        ("", jnp.bfloat16, TOL_STEP1_BF16, TOL_STEP2_BF16),
    ):
        step1, grad2, step2 = f"step1{variant}/", f"grad2{variant}/", f"step2{variant}/"
        if not ref.has(step1):
            skipped.append(f"step1{variant}")
            continue
        tx = build_optimizer(ref.like, groups, orth_dtype=orth_dtype)
        apply = jax.jit(lambda p, g, s, tx=tx: _apply(tx, p, g, s))
        p0 = ref.params("param/")
        p1, state = apply(p0, ref.params("grad1/"), tx.init(p0))
        bf = " (bf16 orthogonalisation)" if orth_dtype == jnp.bfloat16 else ""
        rows.append(step_row(f"step1{variant}{bf}", to_nanochat(p1), prefixed(ref.arrays, step1),
                             prefixed(ref.arrays, "param/"), groups, labels, tol1))  # fmt: skip
        if not ref.has(grad2, step2):
            skipped.append(f"step2{variant}")
            continue
        # Link by link: the stored step-1 params with our optimizer state after step 1.
        p2, _ = apply(ref.params(step1), ref.params(grad2), state)
        rows.append(step_row(f"step2{variant}{bf}", to_nanochat(p2), prefixed(ref.arrays, step2),
                             prefixed(ref.arrays, step1), groups, labels, tol2))  # fmt: skip
    return rows, skipped


def _apply(tx, params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


# --- training trajectory -------------------------------------------------------------------------

TRAJECTORY_MEAN_REL_TOL = 5e-3  # the set's noise note: a faithful float32 replay is well under 0.5%


def trajectory_checks(folder) -> tuple[list[Row], list[tuple[int, float, float]]]:
    """Replay nanochat's own training steps (its init, its micro-batches, its flags) with our train step.

    Returns the summary rows and (step, our loss, nanochat's loss) per step; a step's loss is the mean
    of its micro-batch losses before its update."""
    folder = Path(folder)
    if not (folder / "trajectory.json").is_file():
        raise UserError(
            f"no trajectory.json in {folder}: pass a folder like ../shared/reference/nanochat_trajectory_d4"
        )
    try:
        meta = json.loads((folder / "trajectory.json").read_text(encoding="utf-8"))
        flags, model_config = meta["cli"], meta["derived"]["model_config"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{folder / 'trajectory.json'} is not a trajectory's (no cli, derived.model_config)") from None
    with np.load(folder / "init.npz") as z:
        init = prefixed({k: z[k] for k in z.files}, "param/")
    with np.load(folder / "batches.npz") as z:
        xs, ys, ref_losses = z["x"], z["y"], z["micro_losses"]

    config = GPTConfig(**model_config)
    groups = scaled_groups(
        config.n_embd, flags["depth"], flags["total_batch_size"], embedding_lr=flags["embedding_lr"],
        unembedding_lr=flags["unembedding_lr"], matrix_lr=flags["matrix_lr"], scalar_lr=flags["scalar_lr"],
        weight_decay=flags["weight_decay"], adam_betas=(flags["adam_beta1"], flags["adam_beta2"]),
    )  # fmt: skip
    schedule = Schedule(flags["num_iterations"], flags["warmup_ratio"], flags["warmdown_ratio"], flags["final_lr_frac"])
    mesh = make_mesh(1)
    state = init_state(config, OptimSettings(groups, schedule, "float32"), mesh)
    state.params = jax.device_put(from_nanochat(init, state.params), state.param_shardings)
    step_fn = make_train_step(state, mesh)

    params, opt_state, per_step = state.params, state.opt_state, []
    for i in range(xs.shape[0]):
        # (A, B, T) as the step takes them: nanochat's micro-batches in the order it consumed them.
        params, opt_state, losses = step_fn(params, opt_state, jnp.asarray(xs[i]), jnp.asarray(ys[i]))
        per_step.append((i, float(np.mean(np.asarray(losses, np.float64))), float(ref_losses[i].mean())))
    rel = np.array([abs(o - r) / abs(r) for _, o, r in per_step])
    first = abs(per_step[0][1] - per_step[0][2])
    return [
        Row(
            "trajectory mean rel diff", float(rel.mean()), TRAJECTORY_MEAN_REL_TOL, rel.mean() < TRAJECTORY_MEAN_REL_TOL
        ),
        Row("trajectory max rel diff", float(rel.max()), float("inf"), True, f"at step {int(rel.argmax())}"),
        Row("trajectory step 0 loss", first, loss_tolerance(per_step[0][2]), first <= loss_tolerance(per_step[0][2])),
    ], per_step
