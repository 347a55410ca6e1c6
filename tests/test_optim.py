"""Optimizer pieces the reference steps don't isolate: labels, schedules, the (out, in) orientation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanojax.common import UserError
from nanojax.model import GPT, GPTConfig, param_paths
from nanojax.optim import (
    POLAR_EXPRESS_COEFFS,
    Group,
    Schedule,
    batch_lr_scale,
    build_optimizer,
    depth_weight_decay,
    finetune_groups,
    muon,
    param_labels,
    scaled_groups,
    setup_groups,
)


def test_labels_on_a_model_with_value_embeddings_and_gqa():
    config = GPTConfig(sequence_len=16, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    params = nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(0)), nnx.Param))
    labels = dict(zip(param_paths(params), jax.tree.leaves(param_labels(params)), strict=True))
    assert labels["wte"] == "embedding" and labels["lm_head.kernel"] == "lm_head"
    assert labels["resid_lambdas"] == "resid" and labels["x0_lambdas"] == "x0"
    assert {k for k, v in labels.items() if v == "value_embeds"} == {
        "blocks.0.value_embed",
        "blocks.2.value_embed",
    }
    matrices = {k for k, v in labels.items() if v == "matrices"}
    assert "blocks.2.attn.ve_gate.kernel" in matrices and "blocks.1.attn.c_k.kernel" in matrices
    assert len(matrices) == 3 * 6 + 2  # q, k, v, proj, fc, mlp proj per layer + two gates


def test_a_parameter_outside_every_group_is_named():
    with pytest.raises(ValueError, match="blocks.0.attn.bias falls in 0 optimizer groups"):
        param_labels({"blocks": {0: {"attn": {"bias": jnp.zeros(3)}}}})


def test_lr_schedule_boundaries():
    s = Schedule(num_iterations=100, warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.1)
    # warmup (it+1)/10 for it < 10; 1.0 through it = 50; then p + (1-p)*0.1 with p = (100-it)/50.
    expected = {
        0: 0.1,
        9: 1.0,
        10: 1.0,
        50: 1.0,
        51: 0.98 + 0.02 * 0.1,
        75: 0.5 + 0.5 * 0.1,
        99: 0.02 + 0.98 * 0.1,
    }
    for it, lrm in expected.items():
        assert float(s.lr_multiplier(it)) == pytest.approx(lrm, rel=1e-6), it
    plain = Schedule(num_iterations=100)  # nanochat's defaults: no warmup, warmdown 0.5 to 0
    assert float(plain.lr_multiplier(0)) == 1.0 and float(plain.lr_multiplier(100)) == 0.0


def test_muon_momentum_and_weight_decay_schedules():
    s = Schedule(num_iterations=1000)
    assert float(s.muon_momentum(0)) == pytest.approx(0.85)
    assert float(s.muon_momentum(150)) == pytest.approx(0.90)
    assert float(s.muon_momentum(300)) == pytest.approx(0.95)
    assert float(s.muon_momentum(5000)) == pytest.approx(0.95)
    assert float(s.weight_decay_multiplier(0)) == 1.0
    assert float(s.weight_decay_multiplier(250)) == pytest.approx(0.75)


def test_batch_and_depth_scalings():
    assert batch_lr_scale(2**19) == 1.0
    assert batch_lr_scale(4096) == pytest.approx(0.08838834764831845)
    assert depth_weight_decay(0.1, 4) == pytest.approx(0.9)
    groups = setup_groups(128, embedding_lr=0.3, unembedding_lr=0.004, scalar_lr=0.5)
    assert groups["embedding"].lr == pytest.approx(0.3 * 2.4494897427831783)
    assert groups["resid"].lr == pytest.approx(0.005) and groups["x0"].betas == (0.96, 0.95)


def numpy_muon_step(P, G, lr, wd, mu=0.95, beta2=0.95):
    """SPEC 4 in float64 for a fresh state, on a torch-oriented (rows=out, cols=in) matrix."""
    M = (1 - mu) * G
    G = G + mu * (M - G)
    X = G / (np.linalg.norm(G) * 1.02 + 1e-6)
    rows, cols = X.shape
    for a, b, c in POLAR_EXPRESS_COEFFS:
        if rows > cols:
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    axis = 1 if rows >= cols else 0
    v_mean = np.mean(X**2, axis=axis, keepdims=True)
    n = X.shape[axis]
    v_norm = math.sqrt(v_mean.sum() * n)
    S = (1 - beta2) * v_mean
    step = 1 / np.sqrt(np.maximum(S, 1e-10))
    v_norm_new = math.sqrt(np.sum(v_mean * n * step**2))
    X = X * step * v_norm / max(v_norm_new, 1e-10)
    lr = lr * math.sqrt(max(1, rows / cols))
    return P - lr * X - lr * wd * P * (X * P >= 0)


@pytest.mark.parametrize("rows,cols", [(48, 16), (16, 48), (24, 24)])
def test_muon_uses_torch_orientation(rows, cols):
    rng = np.random.default_rng(0)
    P, G = rng.normal(size=(rows, cols)), rng.normal(size=(rows, cols))
    tx = muon(Group("muon", lr=0.02, weight_decay=0.1), schedule=None)
    kernel, grad = jnp.asarray(P.T, jnp.float32), jnp.asarray(G.T, jnp.float32)  # JAX kernels are (in, out)
    updates, _ = tx.update(grad, tx.init(kernel), kernel)
    ours = np.asarray(optax.apply_updates(kernel, updates)).T
    np.testing.assert_allclose(ours, numpy_muon_step(P, G, lr=0.02, wd=0.1), atol=2e-6)


def test_schedule_changes_need_no_recompile():
    config = GPTConfig(sequence_len=8, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    params = nnx.to_pure_dict(nnx.state(GPT(config, rngs=nnx.Rngs(0)), nnx.Param))
    tx = build_optimizer(params, setup_groups(64, weight_decay=0.1), Schedule(num_iterations=10))
    step = jax.jit(lambda p, g, s: tx.update(g, s, p))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
        _, state = step(params, grads, state)
    assert step._cache_size() == 1


def test_schedule_and_learning_rates_are_checked():
    with pytest.raises(UserError, match="add up to at most 1"):
        Schedule(100, warmup_ratio=0.6, warmdown_ratio=0.5)
    with pytest.raises(UserError, match="fractions of the run"):
        Schedule(100, warmup_ratio=2.0)
    with pytest.raises(UserError, match="--final-lr-frac -0.1"):
        Schedule(100, final_lr_frac=-0.1)
    lrs = dict(embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(UserError, match=f"--matrix-lr {bad}: learning rates must be finite numbers >= 0"):
            scaled_groups(128, 4, 4096, **(lrs | {"matrix_lr": bad}), weight_decay=0.0, adam_betas=(0.8, 0.95))
    with pytest.raises(UserError, match="--weight-decay inf must be a finite number >= 0"):
        scaled_groups(128, 4, 4096, **lrs, weight_decay=math.inf, adam_betas=(0.8, 0.95))
    with pytest.raises(UserError, match="--weight-decay -1.0 must be"):  # as given, not scaled by (12 / depth)^2
        scaled_groups(128, 4, 4096, **lrs, weight_decay=-1.0, adam_betas=(0.8, 0.95))
    for betas in [(1.5, 0.95), (0.8, 1.0), (-0.1, 0.95)]:
        with pytest.raises(UserError, match="AdamW's betas must be >= 0 and below 1"):
            finetune_groups(128, 0.8, **lrs, weight_decay=0.0, adam_betas=betas)
    with pytest.raises(UserError, match="--init-lr-frac -1 must be a finite number >= 0"):
        finetune_groups(128, -1, **lrs, weight_decay=0.0, adam_betas=(0.8, 0.95))
