"""Test setup: 8 simulated CPU devices (set before jax is imported), one compilation cache for the whole
suite, Ctrl-C as a terminal delivers it, and the reference vectors."""

import os
import shutil
import signal
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same tiny programs, in the suite's workers and in the scripts they start: JAX's
# persistent cache, shared through the environment (workers and scripts inherit it), cuts the suite's time
# by about a third on 2 cores. The process that made it removes it at the end. (An entry read while another
# process writes it is warned about on stderr and compiled again; JAX's file lock, which a size limit turns
# on, would prevent that but more than doubles the suite's time.)
CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": None,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}
MADE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    MADE_CACHE = tempfile.mkdtemp(prefix="nanojax-tests-xla-cache-")
    os.environ |= CACHE_ENV | {"JAX_COMPILATION_CACHE_DIR": MADE_CACHE}

# A suite started from a background shell (`cmd &`, nohup) inherits SIGINT ignored, and so would the
# programs its tests start: the Ctrl-C tests need Python's handler, which the children then get too.
signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"


def pytest_unconfigure(config):
    if MADE_CACHE:
        shutil.rmtree(MADE_CACHE, ignore_errors=True)


def script_env(devices: int = 1, cache: bool = True) -> dict:
    """The environment of a script a test starts: on the CPU with `devices` simulated devices, the suite's
    compilation cache (not for a test that reads stderr to the letter: see CACHE_ENV), and no other JAX_
    variable (a multi-process test sets its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or (cache and k in CACHE_ENV)}
    return env | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        raise FileNotFoundError(f"no reference vectors at {REFERENCE.resolve()}: clone next to shared/")
    return REFERENCE.resolve()


# A tiny pretraining run: 8 devices x 1 row x 32 tokens per micro-step, 2 micro-steps per step.
TINY_RUN = [
    "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=32", "--device-batch-size=1",
    "--total-batch-size=512", "--eval-tokens=512", "--sample-every=-1", "--eval-every=-1", "--window-pattern=SL",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A base dir with a small corpus of random words (as shards) and a 300-token tokenizer."""
    import numpy as np

    from nanojax import dataset
    from nanojax.tokenizer import Tokenizer, tokenizer_dir

    base = tmp_path_factory.mktemp("base")
    docs = base / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "=", "+", "(", ")", ":", "\n"]
    for i in range(400):  # several loader chunks (128 documents each), so two data readers both get some
        (docs / f"{i}.txt").write_text(" ".join(rng.choice(words, size=rng.integers(10, 100))))
    dataset.prepare_data([str(docs)], base)
    Tokenizer.train(dataset.iter_documents([str(docs)]), 300).save(tokenizer_dir(base))
    return base
