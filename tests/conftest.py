"""Test setup: 8 simulated CPU devices (set before jax is imported) and the reference vectors."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        raise FileNotFoundError(f"no reference vectors at {REFERENCE.resolve()}: clone next to shared/")
    return REFERENCE.resolve()
