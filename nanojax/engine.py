"""Generation: a KV-cached engine with sampling, stop tokens and the calculator tool, as nanochat's.

    model, meta = load_model(base_dir / "base_checkpoints" / "d4")
    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(ids, num_samples=4, max_tokens=64, temperature=0.8, top_k=50):
        ...                                            # one token per sample, streamed; masks: 1 sampled, 0 forced
    results, masks = engine.generate_batch(ids, num_samples=4, max_tokens=64)   # stop tokens cut off
    for piece in engine.stream(ids, max_tokens=64): print(piece, end="")          # one sample as text

One prefill of the prompt (padded to a power-of-two bucket) fills a per-layer cache that is then
copied to every sample row; decoding runs up to `chunk` tokens per host round trip inside a jitted
`lax.while_loop`, so nothing recompiles per token or per prompt length within a bucket. Positions
are absolute: a query at t sees keys t - window .. t in every layer, also past sequence_len.

`greedy` and `sample_texts` decode without a cache by repeated full forwards at one fixed length:
the uncached reference that the cached path is tested against, and training's quick samples.
"""

import ast
import math
import operator
import re
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanojax.checkpoint import Checkpoints
from nanojax.common import CHECKPOINT_SOURCES, UserError
from nanojax.model import GPT, ROTARY_OVERSIZE, GPTConfig, attention_mask, rms_norm, rotary_tables
from nanojax.runs import check_tokenizer
from nanojax.tokenizer import get_tokenizer
from nanojax.train import abstract_model

# --- uncached decoding ----------------------------------------------------------------------------


def greedy(
    forward, prompts: list[list[int]], max_tokens: int, stop_tokens=(), tool=None
) -> tuple[list[list[int]], list]:
    """max_tokens greedy continuations of each prompt (cut after a stop token), and the logits that chose them.

    forward(idx_BT) -> logits_BTV runs at one fixed length (so one compilation serves every token);
    causality makes the padding after each position irrelevant. tool (a CalculatorTool): a chat model's
    calculator calls are answered, as the Engine answers them."""
    total = max(len(p) for p in prompts) + max_tokens
    seq = np.zeros((len(prompts), total), np.int32)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts])
    rows = np.arange(len(prompts))
    states = [_Row() for _ in prompts]
    chosen = []
    for k in range(max_tokens):
        logits = np.asarray(forward(seq))[rows, lengths + k - 1]
        tokens = logits.argmax(-1)
        if tool:
            for i, row in enumerate(states):
                if row.forced:
                    tokens[i] = row.forced.popleft()
                tool.advance(row, int(tokens[i]))
        seq[rows, lengths + k] = tokens
        chosen.append(logits)
    out = []
    for i, n in enumerate(lengths):
        tokens = seq[i, n : n + max_tokens].tolist()
        stops = [j for j, t in enumerate(tokens) if t in stop_tokens]
        out.append(tokens[: stops[0]] if stops else tokens)
    return out, np.stack(chosen, axis=1)


def sample_texts(forward, tokenizer, prompts: list[str], max_tokens: int = 16) -> list[str]:
    """Greedy completions of text prompts (each starting with <|bos|>), decoded: training's samples."""
    bos = tokenizer.get_bos_token_id()
    ids = tokenizer.encode(prompts, prepend=bos)
    out, _ = greedy(forward, ids, max_tokens, stop_tokens=(bos,))
    return [p + tokenizer.decode(t) for p, t in zip(prompts, out, strict=True)]


# --- the cached forward ---------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Rotated, normed keys and the values of each layer at positions 0..S-1, each (B, K, S, D): heads
    before positions, the layout attention's batched matmuls read without a per-step transpose."""

    k: list
    v: list


def init_cache(config: GPTConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    # Zeros, not empty: slots past the current position are masked, and 0 x a finite value stays 0.
    shape = (batch, config.n_kv_head, length, config.head_dim)
    return KVCache(*([jnp.zeros(shape, dtype) for _ in range(config.n_layer)] for _ in range(2)))


def bucket(n: int, smallest: int = 16) -> int:
    """The power of two >= n that pads prompts and sizes caches, so lengths share compilations."""
    return max(smallest, 1 << (n - 1).bit_length())


def forward_cached(model: GPT, idx_BT, start, cache: KVCache):
    """Hidden states (before model.head) of tokens at absolute positions start..start+T-1.

    Writes their keys and values into the cache, then attends over the whole cache, so the cache
    must hold every earlier position. Same math as GPT.__call__, which reads it all from idx_BT."""
    c = model.config
    T, S = idx_BT.shape[1], cache.k[0].shape[2]
    pos_T = start + jnp.arange(T)
    # Clipped: only prefill padding can lie past the table, and its keys are never attended.
    cos_TD, sin_TD = (
        jnp.take(jnp.asarray(t), pos_T, axis=0, mode="clip")
        for t in rotary_tables(c.sequence_len * ROTARY_OVERSIZE, c.head_dim)
    )
    masks = {w: attention_mask(pos_T, jnp.arange(S), w) for w in set(c.window_sizes())}
    ks, vs = list(cache.k), list(cache.v)
    x_BTD = rms_norm(model.wte[...][idx_BT]).astype(model.dtype)
    x0_BTD = x_BTD
    for i, (block, window) in enumerate(zip(model.blocks, c.window_sizes(), strict=True)):
        ve_BTC = block.value_embed[...][idx_BT] if block.value_embed is not None else None
        x_BTD = model.resid_lambdas[i] * x_BTD + model.x0_lambdas[i] * x0_BTD
        q_BTHD, k_BTKD, v_BTKD = block.attn.qkv(rms_norm(x_BTD), ve_BTC, cos_TD, sin_TD)
        ks[i] = jax.lax.dynamic_update_slice(ks[i], k_BTKD.transpose(0, 2, 1, 3).astype(ks[i].dtype), (0, 0, start, 0))
        vs[i] = jax.lax.dynamic_update_slice(vs[i], v_BTKD.transpose(0, 2, 1, 3).astype(vs[i].dtype), (0, 0, start, 0))
        k_BSKD, v_BSKD = ks[i].transpose(0, 2, 1, 3), vs[i].transpose(0, 2, 1, 3)
        x_BTD = x_BTD + block.attn.attend(q_BTHD, k_BSKD, v_BSKD, masks[window])
        x_BTD = x_BTD + block.mlp(rms_norm(x_BTD))
    return x_BTD, KVCache(ks, vs)


@partial(jax.jit, static_argnames=("graphdef", "cache_len", "num_rows", "cache_dtype"))
def prefill(graphdef, params, idx_1T, length, *, cache_len: int, num_rows: int = 1, cache_dtype=jnp.float32):
    """Run one padded prompt (its first `length` tokens are real) into a fresh cache of cache_len
    positions; return the logits after its last real token and the cache, both copied to num_rows."""
    model = nnx.merge(graphdef, params)
    cache = init_cache(model.config, 1, cache_len, cache_dtype)
    x_1TD, cache = forward_cached(model, idx_1T, 0, cache)
    logits_1V = model.head(jax.lax.dynamic_slice_in_dim(x_1TD, length - 1, 1, axis=1))[:, 0]

    def rows(a):
        return jnp.broadcast_to(a, (num_rows, *a.shape[1:]))

    return rows(logits_1V), jax.tree.map(rows, cache)


@partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, params, token_B, pos, cache: KVCache):
    """Feed one token per row at absolute position pos: the next logits (B, V) and the updated cache."""
    model = nnx.merge(graphdef, params)
    x_B1D, cache = forward_cached(model, token_B[:, None], pos, cache)
    return model.head(x_B1D)[:, 0], cache


def sample_next(logits_BV, key, temperature, top_k: int | None = None):
    """Argmax at temperature 0; otherwise a draw from softmax(logits / temperature), over the top_k only if set."""
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    if top_k is None:
        drawn_B = jax.random.categorical(key, logits_BV / safe_t, axis=-1)
    else:
        vals_BK, idx_BK = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))
        choice_B = jax.random.categorical(key, vals_BK / safe_t, axis=-1)
        drawn_B = jnp.take_along_axis(idx_BK, choice_B[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, drawn_B, jnp.argmax(logits_BV, axis=-1)).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "top_k"), donate_argnames=("cache", "logits_BV"))
def decode_chunk(graphdef, params, cache, logits_BV, pos, step, key, temperature, forced_BC, num_forced_B, done_B,
                 max_steps, stop_tokens, tool_token, *, top_k=None):  # fmt: skip
    """Up to max_steps (<= C) decode steps on the device. Row b takes its first num_forced_B[b] tokens
    from forced_BC, then samples. Stops early once every row has emitted a stop token, or after a row
    samples tool_token (the host must run the tool and force its output). Returns the tokens (B, C),
    how many steps ran, and the logits and cache to continue from."""
    model = nnx.merge(graphdef, params)
    B, C = forced_BC.shape

    def cond(carry):
        i, _, _, done_B, _, paused = carry
        return (i < max_steps) & ~jnp.all(done_B) & ~paused

    def body(carry):
        i, cache, logits_BV, done_B, out_BC, _ = carry
        # Keys by absolute step: the draws do not depend on how the steps are split into chunks.
        sampled_B = sample_next(logits_BV, jax.random.fold_in(key, step + i), temperature, top_k)
        is_forced_B = i < num_forced_B
        token_B = jnp.where(is_forced_B, forced_BC[:, i], sampled_B)
        paused = jnp.any(~done_B & ~is_forced_B & (token_B == tool_token))
        done_B = done_B | jnp.isin(token_B, stop_tokens)
        x_B1D, cache = forward_cached(model, token_B[:, None], pos + i, cache)
        return i + 1, cache, model.head(x_B1D)[:, 0], done_B, out_BC.at[:, i].set(token_B), paused

    carry = (jnp.int32(0), cache, logits_BV, done_B, jnp.zeros((B, C), jnp.int32), jnp.bool_(False))
    steps, cache, logits_BV, _, out_BC, _ = jax.lax.while_loop(cond, body, carry)
    return out_BC, steps, logits_BV, cache


def cached_greedy(model: GPT, prompt: list[int], max_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding one token per decode_step: the tokens and the logits (max_tokens, V) that chose
    them (row 0 from the prefill), as nanochat's engine computes them."""
    graphdef, params = nnx.split(model)
    idx = np.zeros((1, bucket(len(prompt))), np.int32)
    idx[0, : len(prompt)] = prompt
    logits_1V, cache = prefill(graphdef, params, idx, len(prompt), cache_len=bucket(len(prompt) + max_tokens))
    tokens, chosen = [], []
    for k in range(max_tokens):
        chosen.append(np.asarray(logits_1V[0]))
        tokens.append(int(chosen[-1].argmax()))
        logits_1V, cache = decode_step(graphdef, params, jnp.array([tokens[-1]], jnp.int32), len(prompt) + k, cache)
    return tokens, np.stack(chosen)


# --- the calculator tool --------------------------------------------------------------------------

STR_METHODS = frozenset(
    "count find rfind index startswith endswith lower upper title capitalize strip lstrip rstrip replace split "
    "isdigit isalpha".split()
)
MAX_EXPR_CHARS = 500
MAX_EXPONENT = 100
MAX_INT = 10**100
MAX_STR = 10_000  # one replace can multiply a string's length: a chain of them must not fill the memory
_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip


class _Refused(Exception):
    pass


def calculate(expr: str) -> str | None:
    """The value of a calculator expression as text, or None if it is refused or fails.

    Arithmetic on numbers (+ - * / // % and ** up to exponent 100, results within 10^100) and
    whitelisted methods of string literals, e.g. "strawberry".count("r"). Names, other attributes,
    subscripts, keywords, string arithmetic (so no "a" * 10**9) are refused; nothing reaches eval."""
    if len(expr) > MAX_EXPR_CHARS:
        return None
    if re.fullmatch(r"[\d\s.,+\-*/%()]*", expr):
        expr = expr.replace(",", "")  # thousands separators, as nanochat's tool strips them
    try:
        value = _evaluate(ast.parse(expr.strip(), mode="eval").body)
    except (_Refused, SyntaxError, ArithmeticError, ValueError, TypeError, RecursionError):
        return None
    return str(value)


def _number(x):
    if type(x) not in (int, float) or (type(x) is int and abs(x) > MAX_INT) or not math.isfinite(x):
        raise _Refused
    return x


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        x = _number(_evaluate(node.operand))
        return x if isinstance(node.op, ast.UAdd) else -x
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _number(_evaluate(node.left)), _number(_evaluate(node.right))
        if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
            raise _Refused
        return _number(_BINOPS[type(node.op)](a, b))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in STR_METHODS
        and not node.keywords
    ):
        receiver = _evaluate(node.func.value)
        if type(receiver) is not str:
            raise _Refused
        result = getattr(receiver, node.func.attr)(*(_evaluate(a) for a in node.args))
        if type(result) is str and len(result) > MAX_STR:
            raise _Refused
        return result
    raise _Refused


# --- the engine -----------------------------------------------------------------------------------


@dataclass
class _Row:
    """One sample's tool-use state, as nanochat's RowState."""

    forced: deque = field(default_factory=deque)  # tokens to feed instead of sampling (tool output)
    in_python: bool = False
    expr: list = field(default_factory=list)
    completed: bool = False


class CalculatorTool:
    """nanochat's tool use: <|python_start|> expr <|python_end|> is answered with <|output_start|> value
    <|output_end|>, tokens the sampler must feed instead of choosing (a row's `forced`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        names = ("python_start", "python_end", "output_start", "output_end")
        self.ids = {n: tokenizer.encode_special(f"<|{n}|>") for n in names}

    def advance(self, row: _Row, token: int) -> None:
        if token == self.ids["python_start"]:
            row.in_python, row.expr = True, []
        elif token == self.ids["python_end"] and row.in_python:
            row.in_python = False
            result = calculate(self.tokenizer.decode(row.expr)) if row.expr else None
            if result is not None:
                row.forced.extend([self.ids["output_start"], *self.tokenizer.encode(result), self.ids["output_end"]])
            row.expr = []
        elif row.in_python:
            row.expr.append(token)


class Engine:
    """Cached sampling from a GPT. With a tokenizer, <|assistant_end|> and <|bos|> end a sample and
    <|python_start|> expr <|python_end|> is answered with <|output_start|> value <|output_end|>."""

    def __init__(self, model: GPT, tokenizer=None, *, cache_dtype=jnp.float32, chunk: int = 16):
        self.graphdef, self.params = nnx.split(model)
        self.config, self.tokenizer = model.config, tokenizer
        self.cache_dtype, self.chunk = cache_dtype, chunk
        self.stop_tokens, self.tool = (), None
        if tokenizer is not None:
            self.stop_tokens = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
            self.tool = CalculatorTool(tokenizer)

    @property
    def max_positions(self) -> int:
        """Prompt plus generated tokens can't pass the rotary table (10 x sequence_len, as nanochat)."""
        return self.config.sequence_len * ROTARY_OVERSIZE

    def generate(self, tokens: list[int], num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token of each sample, mask of each: 1 sampled, 0 forced) per step, until max_tokens
        steps (default: up to sequence_len in all) or every sample has emitted a stop token."""
        P, B, C = len(tokens), num_samples, self.chunk
        if P == 0:
            raise UserError("empty prompt: give at least one token (e.g. <|bos|>)")
        vocab = self.config.vocab_size
        if not all(isinstance(t, int | np.integer) and 0 <= t < vocab for t in tokens):
            raise UserError(f"the prompt must be token ids in [0, {vocab}): encode text with the tokenizer first")
        if max_tokens is None:
            max_tokens = max(self.config.sequence_len - P, 1)
        if num_samples < 1 or max_tokens < 1 or temperature < 0:
            raise UserError(
                f"need num_samples >= 1, max_tokens >= 1 and temperature >= 0 (got {num_samples}, {max_tokens}, "
                f"{temperature})"
            )
        limit = self.max_positions
        if P + max_tokens > limit:
            raise UserError(
                f"prompt ({P} tokens) + max_tokens ({max_tokens}) exceed the rotary table of {limit} positions "
                "(10 x sequence_len): shorten the prompt or lower max_tokens"
            )
        top_k = top_k if top_k and top_k > 0 else None
        idx = np.zeros((1, bucket(P)), np.int32)
        idx[0, :P] = tokens
        logits_BV, cache = prefill(self.graphdef, self.params, idx, P, cache_len=bucket(P + max_tokens),
                                   num_rows=B, cache_dtype=self.cache_dtype)  # fmt: skip
        stop_tokens = np.array(self.stop_tokens or (-1,), np.int32)
        tool_token = self.tool.ids["python_end"] if self.tool else -1
        key = jax.random.key(seed)
        rows = [_Row() for _ in range(B)]
        n = 0
        while n < max_tokens and not all(r.completed for r in rows):
            forced_BC, num_forced_B = np.zeros((B, C), np.int32), np.zeros(B, np.int32)
            for b, row in enumerate(rows):
                queued = list(row.forced)[:C]
                forced_BC[b, : len(queued)], num_forced_B[b] = queued, len(queued)
            done_B = np.array([r.completed for r in rows])
            out_BC, steps, logits_BV, cache = decode_chunk(
                self.graphdef, self.params, cache, logits_BV, P + n, n, key, temperature, forced_BC, num_forced_B,
                done_B, min(C, max_tokens - n), stop_tokens, tool_token, top_k=top_k,
            )  # fmt: skip
            out_BC, steps = np.asarray(out_BC), int(steps)
            for i in range(steps):
                masks = [0 if i < num_forced_B[b] else 1 for b in range(B)]
                for b, row in enumerate(rows):
                    if not masks[b]:
                        row.forced.popleft()
                    self._advance(row, int(out_BC[b, i]))
                yield out_BC[:, i].tolist(), masks
            n += steps

    def _advance(self, row: _Row, token: int) -> None:
        """nanochat's per-token state machine: stop tokens and the calculator tool."""
        if token in self.stop_tokens:
            row.completed = True
        if self.tool:
            self.tool.advance(row, token)

    def generate_batch(self, tokens: list[int], num_samples=1, **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """Each sample's prompt + generated tokens (without its stop token) and their masks (prompt 0)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for b, (token, mask) in enumerate(zip(column, column_masks, strict=True)):
                if completed[b]:
                    continue
                if token in self.stop_tokens:
                    completed[b] = True
                else:
                    results[b].append(token)
                    masks[b].append(mask)
        return results, masks

    def stream(self, tokens: list[int], **kwargs) -> Iterator[str]:
        """One sample's text as it is generated, up to its stop token; a character split over tokens
        is held back until complete. Needs the Engine's tokenizer, to decode."""
        if self.tokenizer is None:
            raise ValueError("stream decodes text: make the Engine with a tokenizer (or use generate for ids)")
        ids, sent = [], 0
        for column, _ in self.generate(tokens, num_samples=1, **kwargs):
            if column[0] in self.stop_tokens:
                break
            ids.append(column[0])
            text = self.tokenizer.decode(ids)
            if not text.endswith("\ufffd"):
                yield text[sent:]
                sent = len(text)
        if tail := self.tokenizer.decode(ids)[sent:]:
            yield tail


# --- loading checkpoints --------------------------------------------------------------------------


def find_checkpoint_dir(base_dir, source: str = "base", model_tag: str | None = None) -> Path:
    """<base_dir>/<source's folder>/<model_tag>, the most recently written tag when none is given."""
    if source not in CHECKPOINT_SOURCES:
        raise UserError(f"no checkpoint source {source!r}: use one of {', '.join(CHECKPOINT_SOURCES)}")
    root = Path(base_dir) / CHECKPOINT_SOURCES[source]
    tags = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if model_tag is None:
        if not tags:
            how = {"base": "train one with scripts.pretrain", "sft": "finetune one with scripts.chat_sft",
                   "rl": "train one with scripts.chat_rl"}[source]  # fmt: skip
            raise UserError(f"no checkpoints in {root}: {how} first (or pass another --base-dir)")
        return tags[-1]
    if not (root / model_tag).is_dir():
        hint = ""
        if source == "sft" and (Path(base_dir) / CHECKPOINT_SOURCES["base"] / model_tag).is_dir():
            hint = f" ({model_tag!r} is a base model: finetune it with scripts.chat_sft, or pass --source base)"
        elif source == "base" and (Path(base_dir) / CHECKPOINT_SOURCES["sft"] / model_tag).is_dir():
            hint = f" ({model_tag!r} is a finetuned model: pass --source sft)"
        raise UserError(
            f"no model tag {model_tag!r} in {root}; available: {sorted(p.name for p in tags) or 'none'}{hint}"
        )
    return root / model_tag


def checkpoints_trained_with(base_dir, fingerprint: str) -> list[Path]:
    """The model folders of the base dir (base and SFT) whose latest checkpoint used this tokenizer."""
    found = []
    for folder in CHECKPOINT_SOURCES.values():
        root = Path(base_dir) / folder
        for tag in sorted(root.iterdir()) if root.is_dir() else []:
            ckpts = Checkpoints(tag)
            if ckpts.latest_step() is not None and ckpts.read_metadata().get("tokenizer_fingerprint") == fingerprint:
                found.append(tag)
    return found


def load_model(checkpoint_dir, step: int | None = None, dtype=jnp.float32) -> tuple[GPT, dict]:
    """The GPT of a checkpoint (the latest step unless given), computing in dtype, and its metadata."""
    ckpts = Checkpoints(checkpoint_dir)
    step = ckpts.resolve_step(step)
    meta = ckpts.read_metadata(step)
    model = abstract_model(GPTConfig(**meta["model_config"]), dtype)
    graphdef, abstract = nnx.split(model)
    params = ckpts.restore_params(step, params=nnx.to_pure_dict(abstract)).params
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract), meta


def load_for_inference(base_dir, source: str, model_tag: str | None, step: int | None, dtype=jnp.float32):
    """A checkpoint's model with the base dir's tokenizer, refused if they don't belong together:
    (model, tokenizer, metadata, checkpoint_dir). What sample, chat_cli and base_eval start from."""
    base_dir = Path(base_dir).expanduser()
    checkpoint_dir = find_checkpoint_dir(base_dir, source, model_tag)
    model, meta = load_model(checkpoint_dir, step, dtype)
    tokenizer = get_tokenizer(base_dir)
    check_tokenizer(meta, tokenizer, checkpoint_dir)
    # On stderr, so that stdout holds only the model's text (chat_cli -p answers in pipes).
    print(f"{checkpoint_dir} step {meta['step']} | {model.num_params():,} parameters", file=sys.stderr)
    return model, tokenizer, meta, checkpoint_dir


def prompt_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """A base model's prompt (<|bos|> text), or a chat model's (text as the user's message, then
    <|assistant_start|>)."""
    if chat:
        conversation = [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        return tokenizer.render_for_completion(conversation)
    return tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
