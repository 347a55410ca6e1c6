"""Every parity row (forward, grads, greedy generation, optimizer steps) on reference sets a and b."""

import re
import subprocess
import sys

import pytest

from nanojax.common import UserError
from nanojax.parity import run_checks, trajectory_checks


@pytest.mark.parametrize("name", ["a", "b"])
def test_reference_vectors(reference_dir, name):
    rows, skipped = run_checks(reference_dir / "nanochat_vectors" / f"{name}.json")
    names = {r.name for r in rows}
    assert {"logits", "loss_mean", "grad1", "grad2", "step1_fp32", "step2_fp32"} <= names
    assert not skipped
    failed = [(r.name, r.diff, r.tol, r.note) for r in rows if not r.ok]
    assert not failed


def test_script_reports_missing_set(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "scripts.parity", "--vectors", str(tmp_path / "nope.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode != 0
    assert out.stderr.strip().count("\n") == 0 and "no vector set" in out.stderr


@pytest.mark.parametrize(
    "path,message",
    [("nanochat_vectors/a.npz", "is not a vector set's json: pass the json (a.json), not its npz"),
     ("tokenizer_vectors.json", "is not a vector set's json (it has no gpt_config)")],
)  # fmt: skip
def test_a_file_that_is_not_a_vector_set_is_named(reference_dir, path, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run_checks(reference_dir / path)


def test_training_trajectory_matches_nanochat(reference_dir):
    rows, per_step = trajectory_checks(reference_dir / "nanochat_trajectory_d4")
    assert len(per_step) == 20
    assert all(r.ok for r in rows), rows
