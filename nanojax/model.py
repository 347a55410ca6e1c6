"""The nanochat GPT as a Flax NNX module (SPEC sections 1-3).

    model = GPT(GPTConfig(...), rngs=nnx.Rngs(0))
    logits_BTV = model(idx_BT)                       # float32, softcapped, padding removed
    loss = model.loss(idx_BT, targets_BT)            # targets -1 are ignored

Linear kernels are stored (in, out), the JAX way; nanochat stores (out, in). `convert.to_nanochat`
and `convert.from_nanochat` translate between the two naming schemes.
"""

import math
import numbers
from dataclasses import dataclass
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from nanojax.common import ATTENTION_IMPLEMENTATIONS, UserError

VE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 channels of the block input
SOFTCAP = 15.0
ROTARY_BASE = 10_000
RMS_EPS = float(np.finfo(np.float32).eps)  # F.rms_norm's default, whatever the compute dtype
ROTARY_OVERSIZE = 10  # nanochat precomputes rotary tables for 10x the sequence length
ATTN_QUERY_BLOCK = 256  # self-attention runs in query blocks of this many rows, skipping masked keys
CE_ROW_BLOCK = 512  # the fused cross-entropy's row tile: with 2,048-column chunks its logits stay in cache


def _is_positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def __post_init__(self):
        sizes = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
        if bad := [f"{k} {getattr(self, k)!r}" for k in sizes if not _is_positive_int(getattr(self, k))]:
            raise UserError(f"model sizes must be positive integers: {', '.join(bad)}")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: change --head-dim")
        if self.head_dim % 2:
            raise UserError(f"head dim {self.head_dim} is odd: rotary embeddings turn pairs of channels; "
                            "pick an even --head-dim")  # fmt: skip
        if self.n_head % self.n_kv_head:
            raise UserError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise UserError(f"window pattern {self.window_pattern!r} must be made of S and L, e.g. SSSL")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / 64) * 64

    def window_sizes(self) -> list[int]:
        """Keys each layer's query t sees: t - window <= t' <= t. The last layer is always long."""
        pattern = self.window_pattern.upper()
        long, short = self.sequence_len, self.sequence_len // 2
        sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(self.n_layer)]
        sizes[-1] = long
        return sizes

    def has_value_embed(self, layer: int) -> bool:
        return layer % 2 == (self.n_layer - 1) % 2


def config_from_depth(
    depth: int,
    *,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    max_seq_len: int = 2048,
    vocab_size: int = 32768,
    window_pattern: str = "SSSL",
    n_kv_head: int | None = None,
) -> GPTConfig:
    """nanochat's sizing from --depth/--aspect-ratio/--head-dim (SPEC 1)."""
    model_dim = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = model_dim // head_dim
    return GPTConfig(
        sequence_len=max_seq_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_kv_head or n_head,
        n_embd=model_dim,
        window_pattern=window_pattern,
    )


@lru_cache(maxsize=8)
def rotary_tables(seq_len: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of shape (seq_len, head_dim/2), rounded to bfloat16 as nanochat keeps them, held in float32."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # torch's float32 pow is correctly rounded; numpy's can be off by an ulp, which bf16 rounding can expose.
    inv_freq = np.float32(1.0) / (np.float64(ROTARY_BASE) ** exponents.astype(np.float64)).astype(np.float32)
    freqs = np.outer(np.arange(seq_len, dtype=np.float32), inv_freq)
    bf16 = ml_dtypes.bfloat16
    return np.cos(freqs).astype(bf16).astype(np.float32), np.sin(freqs).astype(bf16).astype(np.float32)


def rms_norm(x):
    """x / rms(x) over the last axis (F.rms_norm without a weight), in float32, returned in x's dtype.
    Float32 is left to autodiff (the parity-tested default keeps its arithmetic bit for bit); other dtypes
    take `_rms_norm_lowp`'s one-expression backward."""
    if x.dtype == jnp.float32:
        return _rms_norm_fwd(x)[0]
    return _rms_norm_lowp(x)


@jax.custom_vjp
def _rms_norm_lowp(x):
    """rms_norm with autodiff's gradient, r (g - y mean(g y)), as one float32 expression: in bfloat16
    autodiff rounds its two partial gradients before summing them, and XLA on CPU ran that slower."""
    return _rms_norm_fwd(x)[0]


def _rms_norm_fwd(x):
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)
    return (x32 * r).astype(x.dtype), (x, r)


def _rms_norm_bwd(res, g):
    x, r = res
    y, g32 = x.astype(jnp.float32) * r, g.astype(jnp.float32)
    return (((g32 - y * jnp.mean(g32 * y, axis=-1, keepdims=True)) * r).astype(x.dtype),)


_rms_norm_lowp.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@jax.custom_vjp
def apply_rotary(x_BTHD, cos_TD, sin_TD):
    """Rotate each head's channel pairs (i, i + D/2) by the position's angles, as nanochat does. Its gradient
    is the inverse rotation (a custom VJP): autodiff's float32 arithmetic, and in bfloat16 one rounding where
    autodiff has one per partial product. Left to autodiff, XLA on CPU fused the bfloat16 backward's slices,
    pads and roundings into a loop that took 6 % of a bfloat16 train step."""
    d = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :d], x_BTHD[..., d:]
    cos, sin = cos_TD[None, :, None, :], sin_TD[None, :, None, :]
    return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1).astype(x_BTHD.dtype)


def _rotary_fwd(x_BTHD, cos_TD, sin_TD):
    return apply_rotary(x_BTHD, cos_TD, sin_TD), (cos_TD, sin_TD)


def _rotary_bwd(res, g_BTHD):
    cos_TD, sin_TD = res
    return apply_rotary(g_BTHD, cos_TD, -sin_TD), None, None  # the tables are constants


apply_rotary.defvjp(_rotary_fwd, _rotary_bwd)


def attention_mask(q_pos, k_pos, window: int):
    """Causal, and within `window` keys back: query t sees t' with t - window <= t' <= t."""
    delta = q_pos[:, None] - k_pos[None, :]
    return (delta >= 0) & (delta <= window)


def uniform_init(scale: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -scale, scale)


class Linear(nnx.Linear):
    """nnx.Linear without bias whose matmul is `dense`: float32 accumulation, full float32 precision when
    computing in float32 (no TF32 on GPUs), and gradients XLA runs well on CPU."""

    def __init__(self, d_in, d_out, *, init, dtype, param_dtype, rngs):
        super().__init__(d_in, d_out, use_bias=False, kernel_init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


@jax.custom_vjp
def dense(x, W_CK):
    """x W over x's last axis, accumulated in float32 and rounded once to x's dtype, with autodiff's
    gradients written so that XLA on CPU runs every matmul as it runs best: row-major operands, no
    transpose folded into the dot. Left to autodiff, XLA writes lm_head's (rows, 8,192) output gradient
    transposed (a third of a float32 step at the seed size) and, in bfloat16, turns each backward dot
    and every dot with a bfloat16 result into a float32 one."""
    return _dot(x, W_CK, (x.ndim - 1, 0)).astype(x.dtype)


def _dense_fwd(x, W_CK):
    return dense(x, W_CK), (x, W_CK)


def _dense_bwd(res, g):
    x, W_CK = res
    x_NC, g_NK = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx_NC = _dot(g_NK, W_CK, (1, 1))
    dW_CK = _dot(transposed(x_NC), g_NK, (1, 0))
    return dx_NC.astype(x.dtype).reshape(x.shape), dW_CK.astype(W_CK.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def transposed(x):
    """x with its last two axes swapped, written out row-major (`row_major`)."""
    return row_major(jnp.swapaxes(x, -1, -2))


def row_major(x):
    """x written out in row-major order. XLA folds a transpose into its consumer's layout, and a dot whose
    operand is not row-major runs on CPU only in float32; flattening behind an optimization barrier makes
    XLA write the transposed array itself. Other backends' matmuls take transposed operands as they are, so
    there x is left to XLA."""
    if jax.default_backend() != "cpu":
        return x
    return jax.lax.optimization_barrier(x.reshape(-1)).reshape(x.shape)


class Attention(nnx.Module):
    def __init__(self, config: GPTConfig, layer: int, *, rngs, dtype, param_dtype):
        d, hd = config.n_embd, config.head_dim
        s = math.sqrt(3) / math.sqrt(d)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, hd
        self.c_q = Linear(d, config.n_head * hd, init=uniform_init(s), **kw)
        self.c_k = Linear(d, config.n_kv_head * hd, init=uniform_init(s), **kw)
        self.c_v = Linear(d, config.n_kv_head * hd, init=uniform_init(s), **kw)
        self.c_proj = Linear(d, d, init=nnx.initializers.zeros, **kw)
        has_ve = config.has_value_embed(layer)
        self.ve_gate = Linear(VE_GATE_CHANNELS, config.n_kv_head, init=nnx.initializers.zeros, **kw) if has_ve else None

    def qkv(self, x_BTD, ve_BTC, cos_TD, sin_TD):
        """Project, add the gated value embedding, rotate and QK-norm (rotary first, as nanochat)."""
        B, T, _ = x_BTD.shape
        q_BTHD = self.c_q(x_BTD).reshape(B, T, self.n_head, self.head_dim)
        k_BTKD = self.c_k(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        v_BTKD = self.c_v(x_BTD).reshape(B, T, self.n_kv_head, self.head_dim)
        if ve_BTC is not None:
            gate_BTK = 2 * jax.nn.sigmoid(self.ve_gate(x_BTD[..., :VE_GATE_CHANNELS]))
            v_BTKD = v_BTKD + gate_BTK[..., None] * ve_BTC.reshape(v_BTKD.shape).astype(v_BTKD.dtype)
        q_BTHD = rms_norm(apply_rotary(q_BTHD, cos_TD, sin_TD))
        k_BTKD = rms_norm(apply_rotary(k_BTKD, cos_TD, sin_TD))
        return q_BTHD, k_BTKD, v_BTKD

    def attend(self, q_BTHD, k_BSKD, v_BSKD, mask_TS):
        """Softmax attention of queries over keys (mask_TS says which), projected back to the residual."""
        return self.c_proj(self._softmax_attention(q_BTHD, k_BSKD, v_BSKD, mask_TS))

    def self_attend(
        self, q_BTHD, k_BTKD, v_BTKD, window: int, implementation: str = "nanojax", query_block: int = ATTN_QUERY_BLOCK
    ):  # fmt: skip
        """Causal self-attention of one sequence with itself, as `attend` with attention_mask.

        "nanojax" runs `softmax_attention` in blocks of queries that each see only the keys their mask can
        let through: a block ends its keys at its last query and starts them a window before its first. At
        two blocks that skips a quarter of the score matmuls and softmax; on CPU it pays, and the sums differ
        only in rounding. "xla" and "cudnn" are jax.nn.dot_product_attention's implementations, cuDNN's
        being flash attention on NVIDIA GPUs (bfloat16 or float16 only)."""
        B, T, H, D = q_BTHD.shape
        if implementation != "nanojax":
            # Query t sees keys t - window .. t; a window reaching the first key is plain causal attention.
            local_window = (window, 0) if window < T - 1 else None
            y_BTHD = jax.nn.dot_product_attention(
                q_BTHD, k_BTKD, v_BTKD, is_causal=True, local_window_size=local_window, implementation=implementation
            )
            return self.c_proj(y_BTHD.reshape(B, T, H * D))
        pos = jnp.arange(T)
        y_BTC = []
        for start in range(0, T, query_block):
            end, first_key = min(start + query_block, T), max(0, start - window)
            mask_TS = attention_mask(pos[start:end], pos[first_key:end], window)
            keys = slice(first_key, end)
            y_BTC.append(self._softmax_attention(q_BTHD[:, start:end], k_BTKD[:, keys], v_BTKD[:, keys], mask_TS))
        return self.c_proj(jnp.concatenate(y_BTC, axis=1))

    def _softmax_attention(self, q_BTHD, k_BSKD, v_BSKD, mask_TS):
        """Softmax attention; each kv head serves G = n_head / n_kv_head query heads (GQA), whose queries
        are stacked as rows M = G x T against that head's keys."""
        B, T, H, D = q_BTHD.shape
        K = self.n_kv_head
        G = H // K
        q_BKMD = row_major(q_BTHD.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, D))
        k_BKSD, v_BKSD = row_major(k_BSKD.transpose(0, 2, 1, 3)), row_major(v_BSKD.transpose(0, 2, 1, 3))
        y_BKMD = softmax_attention(q_BKMD, k_BKSD, v_BKSD, jnp.tile(mask_TS, (G, 1)))
        return y_BKMD.reshape(B, K, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)


@jax.custom_vjp
def softmax_attention(q_BKMD, k_BKSD, v_BKSD, mask_MS):
    """softmax(q k^T / sqrt(D), masked) v per batch and kv head, the scores and softmax in float32.
    A custom VJP so that every backward matmul is one XLA's CPU matmuls take in bfloat16 (row-major
    operands, see `transposed`); its gradients are autodiff's."""
    return _attention_fwd(q_BKMD, k_BKSD, v_BKSD, mask_MS)[0]


def _attention_fwd(q_BKMD, k_BKSD, v_BKSD, mask_MS):
    dtype, D = q_BKMD.dtype, q_BKMD.shape[-1]
    scores_BKMS = jnp.where(mask_MS, _dot(q_BKMD, k_BKSD, (3, 3), batch=2) / math.sqrt(D), -jnp.inf)
    e_BKMS = jnp.exp(scores_BKMS - scores_BKMS.max(-1, keepdims=True))
    p_BKMS = (e_BKMS / e_BKMS.sum(-1, keepdims=True)).astype(dtype)
    y_BKMD = _dot(p_BKMS, v_BKSD, (3, 2), batch=2).astype(dtype)
    return y_BKMD, (q_BKMD, k_BKSD, v_BKSD, p_BKMS, y_BKMD)


def _attention_bwd(res, dy_BKMD):
    q_BKMD, k_BKSD, v_BKSD, p_BKMS, y_BKMD = res
    dtype, D = q_BKMD.dtype, q_BKMD.shape[-1]
    dy_BKMD = row_major(dy_BKMD)
    dp_BKMS = _dot(dy_BKMD, v_BKSD, (3, 3), batch=2)
    # softmax's backward: ds = p (dp - sum_s p dp), and sum_s p dp = dy . y
    dy_dot_y_BKM1 = jnp.sum(dy_BKMD.astype(jnp.float32) * y_BKMD.astype(jnp.float32), -1, keepdims=True)
    ds_BKMS = (p_BKMS.astype(jnp.float32) * (dp_BKMS - dy_dot_y_BKM1) / math.sqrt(D)).astype(dtype)
    dq_BKMD = _dot(ds_BKMS, k_BKSD, (3, 2), batch=2)
    dk_BKSD = _dot(transposed(ds_BKMS), q_BKMD, (3, 2), batch=2)
    dv_BKSD = _dot(transposed(p_BKMS), dy_BKMD, (3, 2), batch=2)
    return dq_BKMD.astype(dtype), dk_BKSD.astype(dtype), dv_BKSD.astype(dtype), None


softmax_attention.defvjp(_attention_fwd, _attention_bwd)


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, rngs, dtype, param_dtype):
        d = config.n_embd
        s = math.sqrt(3) / math.sqrt(d)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Linear(d, 4 * d, init=uniform_init(s), **kw)
        self.c_proj = Linear(4 * d, d, init=nnx.initializers.zeros, **kw)

    def __call__(self, x_BTD):
        return self.c_proj(jnp.square(jax.nn.relu(self.c_fc(x_BTD))))


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, layer: int, *, rngs, dtype, param_dtype):
        self.attn = Attention(config, layer, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if config.has_value_embed(layer):
            kv_dim = config.n_kv_head * config.head_dim
            s = math.sqrt(3) / math.sqrt(config.n_embd)
            self.value_embed = nnx.Param(
                uniform_init(s)(rngs.params(), (config.padded_vocab_size, kv_dim), param_dtype)
            )
        else:
            self.value_embed = None


class GPT(nnx.Module):
    def __init__(
        self, config: GPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
        loss_chunk: int | None = None, attention: str = "nanojax",
    ):  # fmt: skip
        """loss_chunk, opt-in: `loss` fuses lm_head + softcap + cross-entropy (`softcap_ce_sum`) over
        vocabulary chunks of this many columns, never materialising the logits; None keeps the reference path.
        attention: the self-attention implementation, one of ATTENTION_IMPLEMENTATIONS (see `self_attend`)."""
        if attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"unknown attention {attention!r}: pick one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        self.config = config
        self.dtype = dtype
        self.loss_chunk = loss_chunk
        self.attention = attention
        V, D, L = config.padded_vocab_size, config.n_embd, config.n_layer
        self.wte = nnx.Param(jax.random.normal(rngs.params(), (V, D), param_dtype))
        self.blocks = nnx.List([Block(config, i, rngs=rngs, dtype=dtype, param_dtype=param_dtype) for i in range(L)])
        self.lm_head = Linear(
            D, V, init=nnx.initializers.normal(0.001), dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.resid_lambdas = nnx.Param(jnp.ones((L,), param_dtype))
        self.x0_lambdas = nnx.Param(jnp.full((L,), 0.1, param_dtype))

    def trunk(self, idx_BT):
        """The residual stream after the last block, before the final norm and lm_head."""
        B, T = idx_BT.shape
        rotary_len = self.config.sequence_len * ROTARY_OVERSIZE
        if T > rotary_len:
            raise UserError(
                f"sequence of {T} tokens is longer than the rotary table ({rotary_len} = 10 x sequence_len): "
                "use a shorter prompt or a model with a larger --max-seq-len"
            )
        cos_TD, sin_TD = (jnp.asarray(t[:T]) for t in rotary_tables(rotary_len, self.config.head_dim))

        x_BTD = rms_norm(self.wte[...][idx_BT]).astype(self.dtype)
        x0_BTD = x_BTD
        for i, (block, window) in enumerate(zip(self.blocks, self.config.window_sizes(), strict=True)):
            ve_BTC = block.value_embed[...][idx_BT] if block.value_embed is not None else None
            x_BTD = self.resid_lambdas[i] * x_BTD + self.x0_lambdas[i] * x0_BTD
            q_BTHD, k_BTKD, v_BTKD = block.attn.qkv(rms_norm(x_BTD), ve_BTC, cos_TD, sin_TD)
            x_BTD = x_BTD + block.attn.self_attend(q_BTHD, k_BTKD, v_BTKD, window, self.attention)
            x_BTD = x_BTD + block.mlp(rms_norm(x_BTD))
        return x_BTD

    def __call__(self, idx_BT):
        """Logits (B, T, vocab_size) in float32, softcapped."""
        return self.head(self.trunk(idx_BT))

    def head(self, x_BTD):
        logits_BTV = self.lm_head(rms_norm(x_BTD))[..., : self.config.vocab_size].astype(jnp.float32)
        return SOFTCAP * jnp.tanh(logits_BTV / SOFTCAP)

    def loss(self, idx_BT, targets_BT, reduction: str = "mean", groups: int = 1):
        """Cross-entropy over targets != -1: the mean, or per position (0 where ignored) for 'none'.

        groups: the mean is taken in each of this many equal slices of the rows, then averaged, as
        nanochat averages one mean per GPU; the train step passes its number of devices, so a finetuning
        loss (whose rows hold different numbers of targets) is the same on any number of them."""
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction {reduction!r}: use 'mean', 'sum' or 'none'")
        if self.loss_chunk is None:
            return cross_entropy(self(idx_BT), targets_BT, reduction, groups)
        x_NC = rms_norm(self.trunk(idx_BT))
        B, T, C = x_NC.shape
        valid_BT = targets_BT != -1
        args = (x_NC.reshape(B * T, C), self.lm_head.kernel[...], jnp.where(valid_BT, targets_BT, 0).reshape(-1))
        static = (self.config.vocab_size, self.loss_chunk, jnp.dtype(self.dtype))
        if reduction == "none":
            return jnp.where(valid_BT, softcap_ce(*args, *static).reshape(B, T), 0.0)
        weights_GN = valid_BT.reshape(groups, -1).astype(jnp.float32)
        if reduction == "mean":
            weights_GN = weights_GN / (jnp.maximum(weights_GN.sum(1, keepdims=True), 1) * groups)
        return softcap_ce_sum(*args, weights_GN.reshape(-1), *static)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))

    def num_scaling_params(self) -> int:
        """Block matrices + lm_head: the count nanochat scales data by (--target-param-data-ratio)."""
        blocks = sum(x.size for x in jax.tree.leaves(nnx.state(self.blocks, nnx.Param)))
        ve = sum(b.value_embed.size for b in self.blocks if b.value_embed is not None)
        return blocks - ve + self.lm_head.kernel.size

    def flops_per_token(self) -> int:
        """6 x matmul params + attention's 12 * n_head * head_dim * (window-limited) seq_len per layer."""
        c = self.config
        matmul_params = self.num_scaling_params()
        attn = sum(12 * c.n_head * c.head_dim * min(w, c.sequence_len) for w in c.window_sizes())
        return 6 * matmul_params + attn


def cross_entropy(logits_BTV, targets_BT, reduction: str = "mean", groups: int = 1):
    valid_BT = targets_BT != -1
    safe_BT = jnp.where(valid_BT, targets_BT, 0)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logits_BTV, safe_BT[..., None], axis=-1)[..., 0]
    loss_BT = jnp.where(valid_BT, logz_BT - picked_BT, 0.0)
    return reduce_loss(loss_BT, valid_BT, reduction, groups)


def reduce_loss(loss_BT, valid_BT, reduction: str, groups: int = 1):
    """'none', 'sum', or 'mean': the mean of each of `groups` equal slices of the rows, averaged."""
    if reduction == "none":
        return loss_BT
    if reduction == "sum":
        return loss_BT.sum()
    loss_G = loss_BT.reshape(groups, -1).sum(1) / jnp.maximum(valid_BT.reshape(groups, -1).sum(1), 1)
    return loss_G.mean()


def _dot(a, b, contracting: tuple[int, int], batch: int = 0):
    """a . b over one axis each and the first `batch` axes of both as batch axes, accumulated in float32;
    full float32 precision for float32 inputs."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contracting[0],), (contracting[1],)), (tuple(range(batch)), tuple(range(batch))))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def softcap_ce(x_NC, W_CV, targets_N, vocab_size: int, chunk: int, dtype):
    """Per-row cross-entropy of SOFTCAP * tanh(x W / SOFTCAP) over the first vocab_size columns, in tiles of
    CE_ROW_BLOCK rows (one after another, a lax.map, so that a tile's logits stay in cache whatever the
    batch) by `chunk` vocab columns: the (N, V) float32 logits never exist. Autodiff differentiates it;
    `softcap_ce_sum` is the fast path for a weighted sum, such as the mean loss."""
    N = x_NC.shape[0]
    if N <= CE_ROW_BLOCK:
        return _ce_tile(x_NC, W_CV, targets_N, None, vocab_size, chunk, dtype, with_grad=False)
    x_nRC, targets_nR = _row_tiles(x_NC), _row_tiles(targets_N)
    loss_nR = jax.lax.map(
        lambda t: _ce_tile(t[0], W_CV, t[1], None, vocab_size, chunk, dtype, with_grad=False), (x_nRC, targets_nR)
    )
    return loss_nR.reshape(-1)[:N]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def softcap_ce_sum(x_NC, W_CV, targets_N, weights_N, vocab_size: int, chunk: int, dtype):
    """sum_n weights_n * softcap_ce_n. Differentiated, its forward computes the gradients as well: the loss
    is a scalar, so they only await its cotangent, and nothing per row is kept for the backward."""
    return jnp.sum(weights_N * softcap_ce(x_NC, W_CV, targets_N, vocab_size, chunk, dtype))


def _ce_sum_fwd(x_NC, W_CV, targets_N, weights_N, vocab_size, chunk, dtype):
    N = x_NC.shape[0]
    if N <= CE_ROW_BLOCK:
        loss_N, dx_NC, dW_CV = _ce_tile(x_NC, W_CV, targets_N, weights_N, vocab_size, chunk, dtype, with_grad=True)
    else:  # padding rows have weight 0: no gradient

        def tile(dW_CV, t):
            loss_R, dx_RC, dW_tile_CV = _ce_tile(t[0], W_CV, t[1], t[2], vocab_size, chunk, dtype, with_grad=True)
            return dW_CV + dW_tile_CV, (loss_R, dx_RC)

        dW_CV = jnp.zeros((x_NC.shape[1], vocab_size), jnp.float32)
        dW_CV, (loss_nR, dx_nRC) = jax.lax.scan(tile, dW_CV, tuple(map(_row_tiles, (x_NC, targets_N, weights_N))))
        loss_N, dx_NC = loss_nR.reshape(-1)[:N], dx_nRC.reshape(-1, x_NC.shape[1])[:N]
    dW_CV = jnp.pad(dW_CV, ((0, 0), (0, W_CV.shape[1] - vocab_size)))  # padded vocab columns: no gradient
    loss = jnp.sum(weights_N * loss_N)
    return loss, (loss_N, dx_NC.astype(x_NC.dtype), dW_CV.astype(W_CV.dtype))


def _ce_sum_bwd(vocab_size, chunk, dtype, res, g):
    loss_N, dx_NC, dW_CV = res
    return (g * dx_NC).astype(dx_NC.dtype), (g * dW_CV).astype(dW_CV.dtype), None, g * loss_N


softcap_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def _row_tiles(a_N):
    """a's rows zero-padded to whole CE_ROW_BLOCK tiles: (tiles, CE_ROW_BLOCK, ...)."""
    tiles = -(-a_N.shape[0] // CE_ROW_BLOCK)
    padding = ((0, tiles * CE_ROW_BLOCK - a_N.shape[0]),) + ((0, 0),) * (a_N.ndim - 1)
    return jnp.pad(a_N, padding).reshape(tiles, CE_ROW_BLOCK, *a_N.shape[1:])


def _ce_tile(x_in_RC, W_in_CV, targets_R, weights_R, vocab_size, chunk, dtype, with_grad: bool):
    """loss_R for one row tile and, with_grad, d sum(weights loss) / dx and / dW[:, :vocab_size]. With
    t = tanh(z / SOFTCAP) and e = exp(SOFTCAP t), dloss/dz = (e / sum(e) - onehot) (1 - t^2): a = e (1 - t^2)
    per chunk gives a W^T as it goes, and once sum(e) is known, dW = (x / sum(e))^T a: three matmuls where
    autodiff does four."""
    x_RC, W_CV = x_in_RC.astype(dtype), W_in_CV[:, :vocab_size].astype(dtype)
    sumexp_R = jnp.zeros(x_RC.shape[0], jnp.float32)
    dx_unscaled_RC = jnp.zeros(x_RC.shape, jnp.float32)
    a_chunks = []
    for start in range(0, vocab_size, chunk):
        W_Cc = W_CV[:, start : start + chunk]
        t_Rc = jnp.tanh(_dot(x_RC, W_Cc, (1, 0)) / SOFTCAP)
        # Softcapped logits are at most SOFTCAP: shifting by it bounds exp without a running max.
        e_Rc = jnp.exp(SOFTCAP * t_Rc - SOFTCAP)
        sumexp_R = sumexp_R + e_Rc.sum(-1)
        if with_grad:
            a_Rc = (e_Rc * (1 - t_Rc * t_Rc)).astype(dtype)
            dx_unscaled_RC = dx_unscaled_RC + _dot(a_Rc, W_Cc, (1, 1))
            a_chunks.append(a_Rc)
    # The target's logit from its own column of W: a row dot instead of a one-hot pass over every chunk.
    W_target_RC = jnp.take(W_CV, targets_R, axis=1).T
    z_target_R = _dot(x_RC, W_target_RC, (1, 1), batch=1)
    t_target_R = jnp.tanh(z_target_R / SOFTCAP)
    loss_R = jnp.log(sumexp_R) + SOFTCAP - SOFTCAP * t_target_R
    if not with_grad:
        return loss_R
    scale_R = weights_R / sumexp_R  # the softmax's normalisation
    target_R = weights_R * (1 - t_target_R * t_target_R)  # the one-hot part of dloss/dz
    dx_RC = scale_R[:, None] * dx_unscaled_RC - target_R[:, None] * W_target_RC.astype(jnp.float32)
    x32_RC = x_in_RC.astype(jnp.float32)
    x_scaled_CR = transposed((x32_RC * scale_R[:, None]).astype(dtype))
    dW_CV = jnp.concatenate([_dot(x_scaled_CR, a_Rc, (1, 0)) for a_Rc in a_chunks], axis=1)
    dW_CV = dW_CV.at[:, targets_R].add(-(x32_RC * target_R[:, None]).T)
    return loss_R, dx_RC, dW_CV


def param_paths(params) -> dict[str, tuple]:
    """Dotted path -> key tuple for every leaf of a params pytree (pure dict or nnx.State)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for keypath, _ in flat:
        keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in keypath)
        keys = tuple(k for k in keys if k != "value")  # nnx.Variable's own leaf
        out[".".join(str(k) for k in keys)] = keypath
    return out
