"""Model properties the reference vectors don't pin down: causality, windows, GQA, sizing, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanojax import model as model_module
from nanojax.common import UserError
from nanojax.convert import from_nanochat, to_nanochat
from nanojax.model import (
    GPT,
    RMS_EPS,
    Attention,
    GPTConfig,
    apply_rotary,
    attention_mask,
    config_from_depth,
    dense,
    rms_norm,
    rotary_tables,
    softmax_attention,
)


def randomized(config, seed=0):
    """A model whose zero-initialised projections are made non-zero, so every block contributes."""
    model = GPT(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


def test_causality_via_gradients():
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=1, n_embd=64)
    model = randomized(config)
    graphdef, params = nnx.split(model)
    idx = jnp.arange(16)[None] * 3  # distinct tokens: embedding row idx[s] is used at position s only
    t = 9

    def loss_t(p):
        logits = nnx.merge(graphdef, p)(idx)
        return jax.nn.logsumexp(logits[0, t])

    grads = jax.grad(loss_t)(params)
    for table in (grads["wte"], grads["blocks"][2]["value_embed"]):
        row_norms = np.linalg.norm(np.asarray(table[...])[np.asarray(idx[0])], axis=-1)
        assert np.all(row_norms[t + 1 :] == 0)
        assert np.all(row_norms[: t + 1] > 0)


@pytest.mark.parametrize("window", [3, 8])
def test_sliding_window_attention_sees_exactly_its_window(window):
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    attn = Attention(config, 0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    attn.c_proj.kernel[...] = jnp.eye(64)
    T, t = 12, 10
    k = jax.random.normal(jax.random.key(1), (3, 1, T, 2, 32))
    pos = jnp.arange(T)

    def out_t(kv):
        q = jnp.ones((1, T, 2, 32))
        return attn.attend(q, kv[0], kv[1], attention_mask(pos, pos, window))[0, t].sum()

    g = jax.grad(out_t)(k[:2])
    seen = np.abs(np.asarray(g[1])).sum(axis=(0, 2, 3)) > 0  # through v: every visible key
    assert list(np.flatnonzero(seen)) == list(range(t - window, t + 1))


@pytest.mark.parametrize(
    "window,implementation,query_block",
    [(40, "nanojax", 8), (5, "nanojax", 8), (3, "nanojax", 16), (40, "nanojax", 40), (40, "xla", 0), (5, "xla", 0)],
)
def test_self_attention_equals_the_full_mask(window, implementation, query_block):
    """self_attend gives what attend gives with the whole causal, windowed mask, values and gradients: ours
    in query blocks (keys cut to what each block's mask lets through, a ragged last block), and
    jax.nn.dot_product_attention with the arguments that, with implementation "cudnn", run flash attention
    on GPUs."""
    config = GPTConfig(sequence_len=40, vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=64)
    attn = Attention(config, 0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    attn.c_proj.kernel[...] = jax.random.normal(jax.random.key(2), (64, 64))
    T = 37
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, T, 4, 16))
    k, v = jax.random.normal(kk, (2, T, 2, 16)), jax.random.normal(kv, (2, T, 2, 16))
    pos = jnp.arange(T)

    def full(q, k, v):
        return attn.attend(q, k, v, attention_mask(pos, pos, window))

    def blocked(q, k, v):
        return attn.self_attend(q, k, v, window, implementation, query_block=query_block)

    def close(got, want):  # float32 rounding of sums whose terms are as large as the biggest output
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))

    close(blocked(q, k, v), full(q, k, v))
    for g, r in zip(
        jax.grad(lambda *a: jnp.sum(jnp.sin(blocked(*a))), argnums=(0, 1, 2))(q, k, v),
        jax.grad(lambda *a: jnp.sum(jnp.sin(full(*a))), argnums=(0, 1, 2))(q, k, v),
        strict=True,
    ):
        close(g, r)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax_attention_gradients_are_autodiffs(dtype):
    """softmax_attention's hand-written backward gives autodiff's gradients of the plain formula, with
    a sliding-window causal mask and ragged sizes."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    B, K, M, S, D = 2, 3, 7, 9, 16
    q = jax.random.normal(kq, (B, K, M, D), dtype)
    k, v = jax.random.normal(kk, (B, K, S, D), dtype), jax.random.normal(kv, (B, K, S, D), dtype)
    g = jax.random.normal(kg, (B, K, M, D), dtype)
    mask = attention_mask(jnp.arange(S - M, S), jnp.arange(S), 4)

    def plain(q, k, v):
        scores = jnp.einsum("bkmd,bksd->bkms", q, k, precision="highest", preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(jnp.where(mask, scores / math.sqrt(D), -jnp.inf), axis=-1)
        return jnp.einsum("bkms,bksd->bkmd", probs.astype(dtype), v, precision="highest").astype(dtype)

    got, vjp = jax.vjp(lambda q, k, v: softmax_attention(q, k, v, mask), q, k, v)
    want, vjp_want = jax.vjp(plain, q, k, v)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for a, b in zip((got, *vjp(g)), (want, *vjp_want(g)), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradients_are_autodiffs(dtype):
    """dense (every Linear's matmul) only rewrites how XLA lays out its matmuls: values and both gradients
    are those of jnp.dot, over leading batch axes too."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, W = jax.random.normal(kx, (2, 5, 8), dtype), jax.random.normal(kw, (8, 3), dtype)
    g = jax.random.normal(kg, (2, 5, 3), dtype)
    precision = jax.lax.Precision.HIGHEST
    got, vjp = jax.vjp(dense, x, W)
    want, vjp_want = jax.vjp(lambda x, W: jnp.dot(x, W, precision=precision), x, W)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    for a, b in zip((got, *vjp(g)), (want, *vjp_want(g)), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_attention_implementations_give_the_same_loss_and_gradients():
    """GPT's attention option reaches every layer: jax.nn.dot_product_attention's XLA implementation gives
    our loss and gradients (sliding and full windows, GQA, value embeddings)."""
    config = GPTConfig(sequence_len=24, vocab_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=64)
    idx = jax.random.randint(jax.random.key(1), (2, 24), 0, 64)
    params = nnx.state(randomized(config), nnx.Param)

    def loss_and_grads(attention):
        graphdef = nnx.graphdef(GPT(config, rngs=nnx.Rngs(0), attention=attention))
        return jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(idx[:, :-1], idx[:, 1:]))(params)

    (loss, grads), (want_loss, want_grads) = loss_and_grads("xla"), loss_and_grads("nanojax")
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_gradient_is_autodiffs(dtype):
    """rms_norm's gradient is autodiff's of the plain formula: bit for bit in float32 (autodiff's own),
    within bfloat16 rounding otherwise. The low-precision path's hand-written backward is checked in
    float32 too, where rounding cannot hide a wrong term."""
    x, g = (jax.random.normal(jax.random.key(i), (2, 37, 3, 64), dtype) for i in range(2))
    x = x * jnp.arange(1, 4, dtype=dtype)[:, None]  # rows of different scales

    def plain(x):
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)

    def grads(fn, x):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(g.astype(x.dtype))[0]

    (y, dx), (y_want, dx_want) = grads(rms_norm, x), grads(plain, x)
    np.testing.assert_array_equal(y, y_want)
    assert dx.dtype == dtype
    if dtype == jnp.float32:
        np.testing.assert_array_equal(dx, dx_want)
        np.testing.assert_allclose(grads(model_module._rms_norm_lowp, x)[1], dx_want, rtol=1e-5, atol=1e-6)
    else:  # relative to |dx| < 4: within about one bfloat16 ulp
        np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_want, np.float32), rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_gradient_is_autodiffs(dtype):
    """apply_rotary's backward (the inverse rotation) is autodiff's: the same float32 arithmetic, and in
    bfloat16 within a few roundings (autodiff rounds each partial product and their sum, the inverse rotation
    only the sum)."""
    cos, sin = (jnp.asarray(t[:37]) for t in rotary_tables(370, 16))
    x, g = (jax.random.normal(jax.random.key(i), (2, 37, 3, 16), dtype) for i in range(2))

    def plain(x):
        x1, x2 = x[..., :8], x[..., 8:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return jnp.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], axis=-1).astype(dtype)

    got, vjp = jax.vjp(lambda x: apply_rotary(x, cos, sin), x)
    want, vjp_want = jax.vjp(plain, x)
    np.testing.assert_array_equal(got, want)
    (dx,), (dx_want,) = vjp(g), vjp_want(g)
    assert dx.dtype == dtype
    if dtype == jnp.float32:
        np.testing.assert_array_equal(dx, dx_want)
    else:  # |dx| < 4 here, so a bfloat16 ulp is at most 2^-6: autodiff is within 1.5 of them, ours within 0.5
        np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_want, np.float32), atol=2**-5)


def test_gqa_query_heads_share_kv_heads():
    """Query head h attends with kv head h // (n_head / n_kv_head), as torch's enable_gqa does."""
    config = GPTConfig(sequence_len=8, vocab_size=64, n_layer=1, n_head=4, n_kv_head=2, n_embd=64)
    attn = Attention(config, 0, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    attn.c_proj.kernel[...] = jnp.eye(64)
    B, T, H, K, D = 2, 8, 4, 2, 16
    q, k, v = (
        jax.random.normal(key, (B, T, n, D))
        for key, n in zip(jax.random.split(jax.random.key(0), 3), (H, K, K), strict=True)
    )
    pos = jnp.arange(T)
    ours = np.asarray(attn.attend(q, k, v, attention_mask(pos, pos, T))).reshape(B, T, H, D)

    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    for h in range(H):
        kh, vh = k[:, :, h // (H // K)], v[:, :, h // (H // K)]
        s = np.einsum("btd,bsd->bts", q[:, :, h], kh) / math.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(ours[:, :, h], np.einsum("bts,bsd->btd", p, vh), atol=1e-5)


def test_seed_config_size_and_flops():
    config = config_from_depth(4, aspect_ratio=32, head_dim=64, max_seq_len=512, vocab_size=8192, window_pattern="L")
    assert (config.n_embd, config.n_head, config.n_kv_head) == (128, 2, 2)
    model = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    assert model.num_params() == 4_980_872
    scaling = 4 * 196_608 + 2 * 64 + 8192 * 128  # block matrices (incl. ve gates) + lm_head
    assert model.num_scaling_params() == scaling
    assert model.flops_per_token() == 6 * scaling + 4 * 12 * 2 * 64 * 512


def test_windows_and_value_embedding_layers():
    config = GPTConfig(
        sequence_len=64, vocab_size=100, n_layer=5, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSL"
    )
    assert config.window_sizes() == [32, 32, 64, 32, 64]
    assert [config.has_value_embed(i) for i in range(5)] == [True, False, True, False, True]
    assert config.padded_vocab_size == 128
    model = GPT(config, rngs=nnx.Rngs(0))
    assert model(jnp.zeros((1, 5), jnp.int32)).shape == (1, 5, 100)  # padded rows never predicted


def test_loss_ignores_minus_one_and_reductions_agree():
    config = GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = randomized(config)
    idx = jnp.arange(16)[None] % 64
    targets = jnp.roll(idx, -1).at[0, 3].set(-1)
    none = model.loss(idx, targets, reduction="none")
    assert none[0, 3] == 0
    np.testing.assert_allclose(model.loss(idx, targets), none.sum() / 15, rtol=1e-6)
    with pytest.raises(ValueError, match="reduction 'avg': use 'mean', 'sum' or 'none'"):
        model.loss(idx, targets, reduction="avg")


def test_nanochat_state_dict_round_trip():
    config = GPTConfig(sequence_len=16, vocab_size=70, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    a, b = randomized(config, 0), GPT(config, rngs=nnx.Rngs(5))
    sd = to_nanochat(nnx.to_pure_dict(nnx.state(a, nnx.Param)))
    assert sd["transformer.h.0.attn.c_k.weight"].shape == (32, 64)  # (out, in)
    assert sd["value_embeds.1.weight"].shape == (128, 32)
    like = nnx.to_pure_dict(nnx.state(b, nnx.Param))
    nnx.update(b, from_nanochat(sd, like))
    idx = jnp.arange(10)[None]
    np.testing.assert_array_equal(a(idx), b(idx))
    bad = dict(sd)
    bad["lm_head.weight"] = bad["lm_head.weight"][:64]
    with pytest.raises(UserError, match="different model config"):
        from_nanochat(bad, like)


def test_sequence_longer_than_rotary_table_is_a_clear_error():
    config = GPTConfig(sequence_len=4, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = GPT(config, rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match="longer than the rotary table"):
        model(jnp.zeros((1, 41), jnp.int32))


def test_bad_config_is_a_clear_error():
    with pytest.raises(UserError, match="window pattern"):
        GPTConfig(window_pattern="SXL")
    with pytest.raises(UserError, match="n_kv_head"):
        GPTConfig(n_head=6, n_kv_head=4)
    with pytest.raises(UserError, match="model sizes must be positive integers: vocab_size 0, n_layer 0"):
        GPTConfig(n_layer=0, vocab_size=0)
    with pytest.raises(UserError, match="head dim 7 is odd"):
        config_from_depth(2, aspect_ratio=32, head_dim=7, max_seq_len=16, vocab_size=64)
    with pytest.raises(UserError, match="unknown attention 'flash'"):
        GPT(GPTConfig(), rngs=nnx.Rngs(0), attention="flash")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softcap_ce_sum_gradients_are_autodiffs(dtype, monkeypatch):
    """softcap_ce_sum's gradients (computed in its forward, over ragged row tiles) are autodiff's of the
    weighted per-row softcap_ce, in float32 and in bfloat16, weights included."""
    monkeypatch.setattr(model_module, "CE_ROW_BLOCK", 16)
    kx, kw, kt, kv = jax.random.split(jax.random.key(0), 4)
    N, C, V = 40, 32, 250
    x, W = jax.random.normal(kx, (N, C), dtype), 0.3 * jax.random.normal(kw, (C, 256))
    targets, weights = jax.random.randint(kt, (N,), 0, V), jax.random.uniform(kv, (N,))

    def plain(x, W, weights):
        return jnp.sum(weights * model_module.softcap_ce(x, W, targets, V, 96, dtype))

    got, got_grads = jax.value_and_grad(model_module.softcap_ce_sum, argnums=(0, 1, 3))(
        x, W, targets, weights, V, 96, dtype
    )
    want, want_grads = jax.value_and_grad(plain, argnums=(0, 1, 2))(x, W, weights)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert g.dtype == w.dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


# 250: padded vocab, ragged last chunk; row block 24: 64 rows in ragged row tiles
@pytest.mark.parametrize("vocab_size,chunk,row_block", [(256, 64, 512), (250, 96, 512), (250, 96, 24)])
def test_fused_loss_chunk_matches_reference(vocab_size, chunk, row_block, monkeypatch):
    """The opt-in fused lm_head + softcap + cross-entropy (loss_chunk) agrees with the reference loss and grads."""
    monkeypatch.setattr(model_module, "CE_ROW_BLOCK", row_block)
    config = GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)
    graphdef, params = nnx.split(randomized(config), nnx.Param)
    fused_def = nnx.graphdef(GPT(config, rngs=nnx.Rngs(0), loss_chunk=chunk))
    rng = np.random.default_rng(0)
    idx = jnp.asarray(rng.integers(0, vocab_size, (2, 32)), jnp.int32)
    targets = np.asarray(rng.integers(0, vocab_size, (2, 32)), np.int32)
    targets[0, :5] = -1
    targets = jnp.asarray(targets)
    for reduction in ("mean", "sum", "none"):

        def loss(p, gd, reduction=reduction):
            return nnx.merge(gd, p).loss(idx, targets, reduction).sum()

        ref, ref_grads = jax.value_and_grad(loss)(params, graphdef)
        got, got_grads = jax.value_and_grad(loss)(params, fused_def)
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads), strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6 * float(jnp.abs(r).max()) + 1e-9)
