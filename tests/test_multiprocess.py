"""A two-process run on one machine (jax.distributed on 127.0.0.1, CPU collectives, 2 simulated devices
each) gives the losses of one process with 4 devices: how a multi-host run is known to work before it
meets a cluster."""

import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import TINY_RUN, script_env

REPO = Path(__file__).resolve().parents[1]
# 4 devices in all, each 1 row of 32 tokens: total 512 = 4 micro-steps. Two data readers in both runs.
FLAGS = [*TINY_RUN, "--num-iterations=4", "--data-readers=2", "--eval-tokens=256"]
# CORE at the end, every process scoring every item (tests/data/core_bundle: 3 tasks, 3 items each).
CORE = [f"--core-bundle={REPO / 'tests' / 'data' / 'core_bundle'}", "--core-metric-every=-1",
        "--core-metric-max-per-task=3"]  # fmt: skip


def launch(base, tag, devices, process_id=None, port=None, *extra):
    env = script_env(devices)
    if process_id is not None:
        env |= {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(process_id),
        }
    cmd = [sys.executable, "-m", "scripts.pretrain", *FLAGS, f"--base-dir={base}", f"--model-tag={tag}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(proc) -> tuple[list[float], list[float]]:
    """The logged train losses and CORE metrics of a run that must succeed."""
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    train = [float(m[1]) for m in re.finditer(r"step \d+/\d+ .*?\| loss ([\d.]+)", out)]
    return train, [float(m[1]) for m in re.finditer(r"step \d+ \| CORE metric (-?[\d.]+)", out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(tiny_base):
    port = free_port()
    procs = [launch(tiny_base, "two", 2, i, port, *CORE) for i in (0, 1)]
    (two, two_core), (other, other_core) = (losses(p) for p in procs)
    one, one_core = losses(launch(tiny_base, "one", 4, None, None, *CORE))
    assert len(one) == 4 and other == other_core == []  # one log, process 0's
    np.testing.assert_allclose(two, one, atol=2e-6)
    assert len(one_core) == 1 and two_core == one_core
    assert (tiny_base / "base_checkpoints" / "two" / "4").is_dir()


def test_processes_started_with_different_flags_are_refused_at_the_start(tiny_base):
    """They would hang in a collective (another --num-iterations) or train replicas that differ (--seed)."""
    port = free_port()
    procs = [launch(tiny_base, "mixed", 1, i, port, f"--seed={i}", f"--num-iterations={4 + i}") for i in (0, 1)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, out[-3000:]
        assert "error: the processes of this run were started with different num_iterations, seed: start" in out
    assert not (tiny_base / "base_checkpoints" / "mixed").exists()
