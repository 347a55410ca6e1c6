"""Test setup: 8 simulated CPU devices (set before jax is imported), Ctrl-C as a terminal delivers it,
and the reference vectors."""

import os
import signal

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A suite started from a background shell (`cmd &`, nohup) inherits SIGINT ignored, and so would the
# programs its tests start: the Ctrl-C tests need Python's handler, which the children then get too.
signal.signal(signal.SIGINT, signal.default_int_handler)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"


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
