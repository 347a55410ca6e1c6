"""The cached engine against the uncached forward and nanochat's vectors; sampling, tools, scripts.sample.

Run: python -m pytest -q tests/test_engine.py
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanojax import dataset
from nanojax.common import UserError
from nanojax.engine import (
    CalculatorTool,
    Engine,
    bucket,
    cached_greedy,
    calculate,
    decode_chunk,
    decode_step,
    find_checkpoint_dir,
    forward_cached,
    greedy,
    init_cache,
    prefill,
)
from nanojax.model import GPT, GPTConfig
from nanojax.parity import Reference
from nanojax.pretrain import pretrain
from nanojax.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir
from scripts import pretrain as pretrain_script
from scripts import sample

# GQA, a sliding-window layer (window 8) and value embeddings; generation runs past sequence_len.
CONFIG = GPTConfig(sequence_len=16, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


@pytest.fixture(scope="module")
def model():
    """Random weights everywhere (at init c_proj is 0, so attention would not show)."""
    m = GPT(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(m)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
    params = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), params)
    return nnx.merge(graphdef, params)


@nnx.jit
def full_logits(model, idx_BT):
    return model(idx_BT)


def uncached_greedy(model, prompt, n):
    tokens, logits = greedy(lambda idx: full_logits(model, jnp.asarray(idx)), [prompt], n)
    return tokens[0], logits[0]


# --- equality with the full forward and with nanochat ---------------------------------------------


def test_cached_logits_equal_full_forward(model):
    idx = np.random.default_rng(0).integers(0, CONFIG.vocab_size, size=(2, 40)).astype(np.int32)
    full_BTV = np.asarray(full_logits(model, jnp.asarray(idx)))
    cache = init_cache(CONFIG, 2, bucket(40))
    x_BTD, cache = nnx.jit(forward_cached)(model, jnp.asarray(idx[:, :7]), 0, cache)
    np.testing.assert_allclose(model.head(x_BTD), full_BTV[:, :7], atol=1e-5)
    graphdef, params = nnx.split(model)
    for t in range(7, 40):  # one token at a time, past sequence_len (16) and the short window (8)
        logits_BV, cache = decode_step(graphdef, params, jnp.asarray(idx[:, t]), t, cache)
        np.testing.assert_allclose(logits_BV, full_BTV[:, t], atol=1e-5)


def test_cached_greedy_equals_uncached(model):
    prompt = [3, 14, 15, 92, 65]
    ref_tokens, ref_logits = uncached_greedy(model, prompt, 40)
    tokens, logits = cached_greedy(model, prompt, 40)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    results, masks = Engine(model).generate_batch(prompt, num_samples=2, max_tokens=40, temperature=0.0)
    assert results == [prompt + ref_tokens] * 2
    assert masks == [[0] * 5 + [1] * 40] * 2


@pytest.mark.parametrize("name", ["a", "b"])
def test_reference_generation(reference_dir, name):
    ref = Reference(reference_dir / "nanochat_vectors" / f"{name}.json")
    a = ref.arrays
    prompt, n = a["gen_prompt"].tolist(), len(a["gen_long_tokens_step1"])
    for key, prefix in (("gen_tokens", "param/"), ("gen_tokens_step1", "step1/"), ("gen_long_tokens_step1", "step1/")):
        model = nnx.merge(ref.graphdef, ref.params(prefix))
        want = a[key].tolist()
        # Two rows sharing one prefill, as the reference's generate_batch check; n tokens every time
        # so that the three runs share one compilation.
        results, _ = Engine(model).generate_batch(prompt, num_samples=2, max_tokens=n, temperature=0.0)
        assert [r[: len(prompt) + len(want)] for r in results] == [prompt + want] * 2, key
    tokens, logits = cached_greedy(model, prompt, n)
    assert tokens == want
    np.testing.assert_allclose(logits, a["gen_long_logits_step1"], atol=2e-6, rtol=0)


# --- compilation ----------------------------------------------------------------------------------


def test_no_recompiles_within_a_bucket(model):
    engine = Engine(model)

    def run(prompt_len, max_tokens):
        prompt = list(range(1, prompt_len + 1))
        return engine.generate_batch(prompt, max_tokens=max_tokens, temperature=0.7, top_k=5, seed=prompt_len)

    run(3, 5)  # compiles prefill for bucket 16 and decode_chunk for a 16-position cache
    sizes = prefill._cache_size(), decode_chunk._cache_size()
    for prompt_len, max_tokens in ((5, 9), (9, 7), (12, 4), (2, 14)):  # all within 16 positions
        run(prompt_len, max_tokens)
    assert (prefill._cache_size(), decode_chunk._cache_size()) == sizes
    # A second engine on other weights of the same shape reuses the compilations too.
    Engine(GPT(CONFIG, rngs=nnx.Rngs(5))).generate_batch([1, 2], max_tokens=3, temperature=0.5, top_k=5)
    assert (prefill._cache_size(), decode_chunk._cache_size()) == sizes

    cached_greedy(model, [1, 2, 3], 6)
    n = decode_step._cache_size()
    cached_greedy(model, [4, 5, 6, 7, 8, 9, 10], 9)
    assert decode_step._cache_size() == n


# --- sampling -------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model):
    prompt = [7, 8, 9]
    kw = dict(num_samples=4, max_tokens=30, temperature=1.5, seed=3)
    first, masks = Engine(model).generate_batch(prompt, **kw)
    assert Engine(model).generate_batch(prompt, **kw)[0] == first
    # Keys follow the absolute step, so the split into device chunks does not matter.
    assert Engine(model, chunk=3).generate_batch(prompt, **kw)[0] == first
    assert len({tuple(r) for r in first}) > 1  # the samples differ from each other
    assert Engine(model).generate_batch(prompt, **dict(kw, seed=4))[0] != first
    assert all(len(r) == 33 and m == [0] * 3 + [1] * 30 for r, m in zip(first, masks, strict=True))


def test_top_k(model):
    prompt = [20, 21, 22]
    kw = dict(num_samples=4, max_tokens=12, temperature=5.0, seed=0)
    results, _ = Engine(model).generate_batch(prompt, top_k=2, **kw)
    logits_BTV = np.asarray(full_logits(model, jnp.asarray(results)))
    top2_BT2 = np.argsort(logits_BTV, axis=-1)[..., -2:]
    for row, top2_T2 in zip(results, top2_BT2, strict=True):  # each token among the two most likely
        assert all(row[t] in top2_T2[t - 1] for t in range(len(prompt), len(row)))
    assert len({t for row in results for t in row[len(prompt) :]}) > 12  # and not only the most likely
    greedy_tokens, _ = cached_greedy(model, prompt, 12)
    assert Engine(model).generate_batch(prompt, top_k=1, **kw)[0] == [prompt + greedy_tokens] * 4


# --- stop tokens and the calculator tool ----------------------------------------------------------

CHARS = list("0123456789+-*/.()'abcdefghijklmnopqrstuvwxyz ")
VOCAB = SPECIAL_TOKENS + CHARS


class CharTokenizer:
    """One token per character after the special tokens: enough for the engine's tool logic."""

    def encode_special(self, name):
        return VOCAB.index(name)

    def get_bos_token_id(self):
        return VOCAB.index("<|bos|>")

    def encode(self, text):
        return [VOCAB.index(c) for c in text]

    def decode(self, ids):
        return "".join(VOCAB[i] for i in ids)


def ids(*tokens):
    """Token ids of special token names and of the characters of other strings."""
    return [VOCAB.index(t) for s in tokens for t in ([s] if s in VOCAB else list(s))]


def chain_model(*sequences):
    """A GPT whose greedy next token after s[i] is s[i+1] in each sequence s, and token 0 (<|bos|>)
    after tokens that lead nowhere. With every block's output projection at zero (as at init) the
    blocks add nothing, so a one-hot embedding and lm_head make a bigram table."""
    config = GPTConfig(sequence_len=32, vocab_size=len(VOCAB), n_layer=1, n_head=1, n_kv_head=1, n_embd=64,
                       window_pattern="L")  # fmt: skip
    model = GPT(config, rngs=nnx.Rngs(0))
    kernel = np.zeros((64, config.padded_vocab_size), np.float32)
    for s in sequences:
        for a, b in zip(s, s[1:], strict=False):
            assert not kernel[a].any(), "each token may lead to one successor"
            kernel[a, b] = 1.0
    model.wte[...] = jnp.eye(config.padded_vocab_size, 64)
    model.lm_head.kernel[...] = jnp.asarray(kernel)
    return model


@pytest.mark.parametrize("chunk", [16, 2])  # 2: the forced output spans several device chunks
def test_tool_call_output_is_forced(chunk):
    bos = ids("<|bos|>")
    call = ids("<|python_start|>", "12+3", "<|python_end|>")
    # The model would answer the call with "x"; after the output it goes on with "y".
    model = chain_model(bos + call + ids("x"), ids("<|output_end|>", "y", "<|assistant_end|>"))
    engine = Engine(model, CharTokenizer(), chunk=chunk)
    columns = list(engine.generate(bos, max_tokens=30, temperature=0.0))
    output = ids("<|output_start|>", "15", "<|output_end|>")
    assert [c[0] for c, _ in columns] == call + output + ids("y", "<|assistant_end|>")
    assert [m[0] for _, m in columns] == [1] * len(call) + [0] * len(output) + [1, 1]


def test_greedy_answers_tool_calls_as_the_engine_does():
    """Training's and base_eval's chat samples (the uncached `greedy`) feed the calculator's output too."""
    bos = ids("<|bos|>")
    call = ids("<|python_start|>", "12+3", "<|python_end|>")
    model = chain_model(bos + call + ids("x"), ids("<|output_end|>", "y", "<|assistant_end|>"))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda idx: nnx.merge(graphdef, params)(idx))
    stops = ids("<|assistant_end|>", "<|bos|>")
    [plain], _ = greedy(forward, [bos], 12, stop_tokens=stops)
    [tooled], _ = greedy(forward, [bos], 12, stop_tokens=stops, tool=CalculatorTool(CharTokenizer()))
    assert plain == call + ids("x")
    assert tooled == call + ids("<|output_start|>", "15", "<|output_end|>", "y")


def test_refused_tool_call_is_not_answered():
    bos = ids("<|bos|>")
    call = ids("<|python_start|>", "1/0", "<|python_end|>")
    model = chain_model(bos + call + ids("x", "<|assistant_end|>"))
    results, masks = Engine(model, CharTokenizer()).generate_batch(bos, num_samples=2, max_tokens=30, temperature=0.0)
    assert results == [bos + call + ids("x")] * 2  # stopped at <|assistant_end|>, which is dropped
    assert masks == [[0] + [1] * (len(call) + 1)] * 2


def test_stop_tokens_end_generation():
    bos = ids("<|bos|>")
    model = chain_model(bos + ids("ab", "<|bos|>"))  # a cycle: bos a b bos a b ...
    columns = list(Engine(model, CharTokenizer()).generate(bos, max_tokens=30, temperature=0.0))
    assert [c[0] for c, _ in columns] == ids("ab", "<|bos|>")
    text = "".join(Engine(model, CharTokenizer()).stream(bos, max_tokens=30, temperature=0.0))
    assert text == "ab"
    with pytest.raises(ValueError, match="make the Engine with a tokenizer"):
        next(Engine(model).stream(bos))
    for prompt in ([model.config.vocab_size], "ab"):  # an id past the vocabulary; text, not ids
        with pytest.raises(UserError, match="the prompt must be token ids in"):
            next(Engine(model, CharTokenizer()).generate(prompt))


@pytest.mark.parametrize(
    "expr,value",
    [("12+3", "15"), ("1,234 * 2", "2468"), ("2**10", "1024"), ("-(7 // 2) % 5", "2"), ("1/4", "0.25"),
     ("'strawberry'.count('r')", "3"), ('"Hello".upper()', "HELLO"), ("'a b c'.split()", "['a', 'b', 'c']")],
)  # fmt: skip
def test_calculator(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('ls')", "().__class__.__bases__", "x + 1", "open('f').read()", "'a' * 10**9",
     "2**10000", "9**9**9", "(10**99) * (10**99)", "'abc'.__len__()", "'{}'.format(1)", "(1).bit_length()",
     "'a'.count(x)", "[1, 2]", "lambda: 1", "1/0", "1e308 * 10", "(-8) ** 0.5", "'ab'[0]", "1" * 600, "import os",
     "'a'.count(sep='a')", "eval('1')", "'aaaaaaaaaa'" + ".replace('a', 'aaaaaaaaaa')" * 12],
)  # fmt: skip
def test_calculator_refuses(expr):
    assert calculate(expr) is None


# --- scripts.sample end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A base dir with a ~300-token tokenizer and a two-step depth-1 checkpoint (tag tiny)."""
    base = tmp_path_factory.mktemp("base")
    docs = base / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "def", "return", "x", "=", "+", "(", ")", ":", "\n"]
    for i in range(20):
        (docs / f"{i}.txt").write_text(" ".join(rng.choice(words, size=rng.integers(20, 200))))
    dataset.prepare_data([str(docs)], base)
    Tokenizer.train(dataset.iter_documents([str(docs)]), 300).save(tokenizer_dir(base))
    args = pretrain_script.parse_args([
        "--depth=1", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--device-batch-size=1",
        "--total-batch-size=256", "--num-iterations=2", "--eval-tokens=256", "--eval-every=-1",
        "--sample-every=-1", "--window-pattern=L", "--model-tag=tiny", f"--base-dir={base}",
    ])  # fmt: skip
    pretrain(args, base, ["alpha"])
    return base


def test_sample_script(trained, capsys):
    sample.main([f"--base-dir={trained}", "--prompt", "alpha beta", "--prompt", "def", "--max-tokens=8",
                 "--temperature=0"])  # fmt: skip
    out, err = capsys.readouterr()
    assert "tiny step 2" in err and "alpha beta" in out and "def" in out  # the checkpoint line goes to stderr
    sample.main([f"--base-dir={trained}", "--prompt", "x =", "--num-samples=3", "--max-tokens=5", "--step=2"])
    out = capsys.readouterr().out
    assert all(f"[{i}] x =" in out for i in range(3))


def test_sample_script_sft_source(trained, capsys):
    sft = trained / "chatsft_checkpoints"
    if not sft.exists():
        shutil.copytree(trained / "base_checkpoints", sft)
    sample.main([f"--base-dir={trained}", "--source=sft", "--prompt", "alpha?", "--max-tokens=4"])
    assert "alpha?" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,message",
    [(["--model-tag=nope"], "no model tag 'nope'"), (["--step=7"], "no checkpoint for step 7"),
     (["--source=sft", "--base-dir={empty}"], "no checkpoints in"),
     (["--base-dir={empty}/typo"], "no checkpoints in")],
)  # fmt: skip
def test_sample_script_errors(trained, tmp_path, capsys, flags, message):
    flags = [f.format(empty=tmp_path) for f in flags]
    with pytest.raises(SystemExit):
        sample.main([f"--base-dir={trained}", *flags])
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "typo").exists()  # reading a base dir never creates one


def test_a_tag_of_the_other_source_is_named_in_the_error(tmp_path):
    (tmp_path / "base_checkpoints" / "t").mkdir(parents=True)
    with pytest.raises(UserError, match="'t' is a base model: finetune it with scripts.chat_sft, or pass --source"):
        find_checkpoint_dir(tmp_path, "sft", "t")
    with pytest.raises(UserError, match="no checkpoint source 'chat': use one of base, sft"):
        find_checkpoint_dir(tmp_path, "chat", "t")


def test_sample_script_refuses_a_long_prompt_before_echoing_it(trained, capsys):
    with pytest.raises(SystemExit):
        sample.main([f"--base-dir={trained}", "--prompt", "alpha " * 400, "--max-tokens=8"])
    out, err = capsys.readouterr()
    assert "exceed the rotary table" in err and "alpha" not in out


def test_sample_script_refuses_other_tokenizer(trained, tmp_path, capsys):
    shutil.copytree(trained / "base_checkpoints", tmp_path / "base_checkpoints")
    Tokenizer.train(["gamma delta epsilon " * 50], 300).save(tokenizer_dir(tmp_path))  # 282 tokens, the model 295
    with pytest.raises(SystemExit):
        sample.main([f"--base-dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "has a 295-token vocabulary, the tokenizer here 282" in err and err.strip().count("\n") == 0
