"""The train step and loop: accumulation, sharding, exact resume, bad input. 8 simulated CPU devices."""

import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_RUN, script_env
from flax import nnx

from nanojax import dataset
from nanojax.checkpoint import Checkpoints
from nanojax.common import Interrupted, UserError, cli
from nanojax.model import GPT, GPTConfig, param_paths
from nanojax.optim import Schedule, setup_groups
from nanojax.pretrain import pretrain
from nanojax.report import append_report
from nanojax.runs import claimed, note_changed_settings
from nanojax.sharding import make_mesh, tree_shardings
from nanojax.tokenizer import Tokenizer, tokenizer_dir
from nanojax.train import (
    OptimSettings,
    TrainState,
    init_state,
    make_train_step,
    platform_attention,
    stack_micro_batches,
)
from scripts.pretrain import parse_args

CONFIG = GPTConfig(sequence_len=16, vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SL")


def batch(seed, A, B, T=16, vocab=96):
    tok = np.random.default_rng(seed).integers(0, vocab, size=(A, B, T + 1)).astype(np.int32)
    return jnp.asarray(tok[..., :-1]), jnp.asarray(tok[..., 1:])


def perturbed(params):
    return jax.tree.map(lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)


def sgd_state(mesh, fsdp=False, loss_chunk=None):
    """The real model with plain SGD (lr 1), so that params - new params = the step's gradient."""
    params = perturbed(nnx.to_pure_dict(nnx.state(GPT(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)))
    tx = optax.sgd(1.0)
    sh = tree_shardings(params, mesh, fsdp)
    graphdef = nnx.graphdef(GPT(CONFIG, rngs=nnx.Rngs(0), loss_chunk=loss_chunk))
    params = jax.device_put(params, sh)
    return TrainState(graphdef, tx, params, tx.init(params), sh, tree_shardings(tx.init(params), mesh, fsdp))


def step_gradients(state, mesh, x, y):
    step = make_train_step(state, mesh)
    after, _, _ = step(jax.tree.map(jnp.copy, state.params), state.opt_state, x, y)
    return jax.tree.map(lambda a, b: np.asarray(a - b), jax.device_get(state.params), jax.device_get(after))


def test_micro_batched_gradients_equal_full_batch():
    mesh = make_mesh(1)
    x, y = batch(0, 1, 4)
    grads = {
        A: step_gradients(sgd_state(mesh), mesh, x.reshape(A, 4 // A, 16), y.reshape(A, 4 // A, 16)) for A in (1, 2, 4)
    }
    for A in (2, 4):
        for g1, gA in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[A]), strict=True):
            np.testing.assert_allclose(gA, g1, atol=1e-6)


@pytest.mark.parametrize("devices,fsdp", [(1, False), (8, False), (8, True)])
def test_fused_loss_step_gives_the_reference_gradients_sharded(devices, fsdp):
    """The opt-in fused cross-entropy (loss_chunk, with ragged chunks) in the sharded train step: the same
    gradients as the plain loss on one device, data parallel and with lm_head sharded by FSDP."""
    x, y = batch(0, 2, 8)
    reference = sgd_state(make_mesh(1))
    want = step_gradients(reference, make_mesh(1), x, y)
    mesh = make_mesh(devices)
    got = step_gradients(sgd_state(mesh, fsdp, loss_chunk=40), mesh, x, y)
    for g, w, p in zip(*map(jax.tree.leaves, (got, want, jax.device_get(reference.params))), strict=True):
        # A gradient read off as params - new params is resolved to an ulp of the params.
        resolution = 2 * np.spacing(np.abs(p).max())
        np.testing.assert_allclose(g, w, atol=1e-6 * float(np.abs(w).max()) + resolution, rtol=1e-4)


@pytest.mark.parametrize("loss_chunk", [None, 40])
def test_masked_loss_is_the_same_on_any_number_of_devices(loss_chunk):
    """Finetuning rows hold different numbers of targets. As nanochat averages one mean per GPU, the step
    takes one mean per device: 8 devices of a row each give the gradients of 8 micro-steps on one."""
    x, y = batch(1, 1, 8)
    drop = np.random.default_rng(0).random(y.shape) < np.linspace(0.1, 0.9, 8)[None, :, None]
    y = jnp.where(drop, -1, y)
    one = make_mesh(1)
    want = step_gradients(sgd_state(one, loss_chunk=loss_chunk), one, x.reshape(8, 1, 16), y.reshape(8, 1, 16))
    eight = make_mesh(8)
    got = step_gradients(sgd_state(eight, loss_chunk=loss_chunk), eight, x, y)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-6)


OPTIM = OptimSettings(setup_groups(64, weight_decay=0.1), Schedule(10))


def initial_params(state):
    # Live projections: at init (c_proj = 0) the lambdas' gradients are pure rounding noise.
    return perturbed(jax.device_get(state.params))


def run_steps(mesh, fsdp, n=3):
    """(params after the first step, the losses of n steps)."""
    state = init_state(CONFIG, OPTIM, mesh, fsdp=fsdp, seed=3)
    state.params = jax.device_put(initial_params(state), state.param_shardings)
    step = make_train_step(state, mesh)
    params, opt_state, losses = state.params, state.opt_state, []
    for i in range(n):
        x, y = batch(i, 2, 8)
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(np.asarray(loss))
        if i == 0:
            first = jax.tree.map(np.array, params)  # copied: the next step donates these buffers
    return first, np.array(losses)


def first_step_gradients():
    state = init_state(CONFIG, OPTIM, make_mesh(1), seed=3)
    x, y = batch(0, 2, 8)
    loss = lambda p: sum(nnx.merge(state.graphdef, p).loss(x[i], y[i]) for i in range(2)) / 2  # noqa: E731
    return jax.jit(jax.grad(loss))(initial_params(state))


@pytest.fixture(scope="module")
def single_device():
    return *run_steps(make_mesh(1), False), first_step_gradients()


@pytest.mark.parametrize("devices,fsdp", [(4, False), (4, True), (8, True)])
def test_sharded_steps_equal_single_device(single_device, devices, fsdp):
    p1, l1, grads = single_device
    pn, ln = run_steps(make_mesh(devices), fsdp)
    np.testing.assert_allclose(ln, l1, atol=1e-5)
    p0 = initial_params(init_state(CONFIG, OPTIM, make_mesh(1), seed=3))
    for path, a, b, g, p in zip(param_paths(p1), *map(jax.tree.leaves, (pn, p1, grads, p0)), strict=True):
        diff = np.abs(np.asarray(a) - np.asarray(b))
        off = diff > 1e-5
        # AdamW's first step is lr * g / (|g| + 1e-10): a gradient at rounding-noise level (a sum that
        # cancels, ~1e-10) becomes an lr-sized step whose size depends on the reduction order.
        off &= np.abs(np.asarray(g)) > 1e-8
        if path.startswith("blocks.") and path.endswith(".kernel"):
            # Muon's cautious weight decay acts where update and param agree in sign: an update element at
            # rounding level can flip that mask, moving the element by lr * wd * |p| (step 0: lr 0.02 x
            # sqrt(max(1, out / in)), wd 0.1).
            d_in, d_out = p.shape
            off &= ~np.isclose(diff, 0.02 * math.sqrt(max(1, d_out / d_in)) * 0.1 * np.abs(p), rtol=1e-2)
        assert not off.any(), path


# --- the loop, end to end on a tiny corpus -----------------------------------------------------


def run(base, *extra):
    return pretrain(parse_args([*TINY_RUN, f"--base-dir={base}", *extra]), base, ["alpha"])[0]


def test_no_tokenizer_is_said_before_any_data_is_prepared(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset, "prepare_data", None)  # never reached
    with pytest.raises(UserError, match="no tokenizer at .*scripts.tok_train"):
        run(tmp_path, "--num-iterations=1")
    assert not (tmp_path / "base_data").exists()


def test_a_resume_names_the_training_settings_it_changes():
    logged = []
    saved = {"total_batch_size": 2048, "matrix_lr": 0.02, "save_every": 5, "device_batch_size": 1, "data": ["a"]}
    note_changed_settings(saved, saved | {"save_every": 10, "device_batch_size": 2, "data": None}, logged.append)
    assert logged == []  # where it saves, how it splits a batch, --data again or not leave the run as it was
    note_changed_settings(saved, saved | {"total_batch_size": 4096, "matrix_lr": 0.03}, logged.append)
    assert logged == [
        "note: resuming with settings the checkpoint was not trained with: total_batch_size 2048 -> 4096, "
        "matrix_lr 0.02 -> 0.03"
    ]


@pytest.mark.parametrize(
    "flag,message",
    [("--eval-every=0", "must be a positive step interval, or -1 for the end only"),
     ("--save-every=-2", "must be a positive step interval"), ("--eval-tokens=0", "must be a positive integer"),
     ("--resume-from-step=-5", "must be a checkpoint's step, or -1 for a fresh run")],
)  # fmt: skip
def test_intervals_and_counts_are_checked(flag, message, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag])
    assert message in capsys.readouterr().err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tokens per optimizer step (grad accumulation) (default: 524288)" in text
    assert "lr multiplier the warmdown ends at (default: 0.0)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_a_fresh_run_moves_only_a_runs_folder_aside(tiny_base, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        parse_args([*TINY_RUN, "--model-tag=../tokenizer"])
    assert "--model-tag: must be a folder name" in capsys.readouterr().err
    notes = tiny_base / "base_checkpoints" / "notes"
    notes.mkdir(parents=True)
    (notes / "todo.txt").write_text("mine")
    monkeypatch.setattr("nanojax.train.init_state", None)  # refused before the model is even made
    with pytest.raises(UserError, match="holds files that no run wrote \\(todo.txt\\): move them out"):
        run(tiny_base, "--num-iterations=1", "--model-tag=notes")
    assert (notes / "todo.txt").read_text() == "mine"


def test_loss_falls_and_report_is_written(tiny_base):
    s = run(tiny_base, "--num-iterations=30", "--model-tag=falls", "--embedding-lr=0.5", "--matrix-lr=0.05")
    losses = [loss for _, loss in s["history"].train_loss]
    assert losses[0] == pytest.approx(np.log(300), abs=0.2)
    assert losses[-1] < losses[0] - 0.5  # the corpus is random words: its entropy floor is high
    folder = Path(s["checkpoint_dir"])
    assert (folder / "report.md").is_file() and (folder / "loss.png").stat().st_size > 1000
    assert s["final_val_bpb"] > 0 and s["peak_memory_bytes"] > 0


def test_resume_continues_exactly(tiny_base):
    full = run(tiny_base, "--num-iterations=6", "--save-every=3", "--model-tag=resume")
    folder = Path(full["checkpoint_dir"])
    assert Checkpoints(folder).steps() == [3, 6]
    shutil.rmtree(folder / "6")
    append_report(folder, ["## Base model evaluation, step 6", "", "| CORE | 0.0123 |"])  # as base_eval adds
    resumed = run(tiny_base, "--num-iterations=6", "--save-every=3", "--model-tag=resume", "--resume-from-step=3")
    report = (folder / "report.md").read_text()  # written anew by the resumed run, what was appended kept
    assert report.startswith("# nanojax pretraining report: resume\n") and report.count("| CORE | 0.0123 |") == 1
    assert "![loss](loss.png)\n\n## Base model evaluation, step 6\n" in report
    assert resumed["history"].train_loss == full["history"].train_loss
    # Steps timed: 2-3 before the resume and 5-6 after; each start's first step is mostly compilation.
    assert Checkpoints(folder).read_metadata(6)["loop_state"]["timed_steps"] == 4
    for a, b in zip(jax.tree.leaves(resumed["params"]), jax.tree.leaves(full["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fsdp_checkpoint_restores_on_one_device(tiny_base):
    s = run(tiny_base, "--num-iterations=2", "--model-tag=fsdp", "--fsdp")
    assert any(
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(s["params"])
    )
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), s["params"])
    restored = Checkpoints(s["checkpoint_dir"]).restore_params(params=target).params
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(s["params"]), strict=True):
        assert a.sharding == one
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs_are_one_line_errors(tiny_base):
    with pytest.raises(UserError, match="not divisible"):
        run(tiny_base, "--num-iterations=1", "--total-batch-size=500")
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        run(tiny_base, "--num-iterations=1", "--attention=cudnn")
    one_step = run(tiny_base, "--num-iterations=1", "--model-tag=bad")
    assert one_step["tokens_per_s"] is None  # only its first step, compilation: no steady rate
    for horizon in (8, 7):  # a checkpoint that is not there is named, not the horizon it would end
        with pytest.raises(UserError, match="no checkpoint for step 7"):
            run(tiny_base, f"--num-iterations={horizon}", "--model-tag=bad", "--resume-from-step=7")
    with pytest.raises(UserError, match="already at the run's end .* pass a larger --num-iterations"):
        run(tiny_base, "--num-iterations=1", "--model-tag=bad", "--resume-from-step=1")
    with pytest.raises(UserError, match="another model shape, n_layer 2 \\(this run: 3\\)"):
        run(tiny_base, "--num-iterations=2", "--model-tag=bad", "--resume-from-step=1", "--depth=3")
    reversed_docs = ["".join(reversed(d)) for d in dataset.iter_documents([str(tiny_base / "docs")])]
    other = Tokenizer.train(reversed_docs, 300)  # same vocabulary size, other merges
    other.save(tokenizer_dir(tiny_base / "other"))
    shutil.copytree(tiny_base / "base_data", tiny_base / "other" / "base_data")
    shutil.copytree(tiny_base / "base_checkpoints", tiny_base / "other" / "base_checkpoints")
    with pytest.raises(UserError, match="another tokenizer"):
        run(tiny_base / "other", "--num-iterations=2", "--model-tag=bad", "--resume-from-step=1")
    Tokenizer.train(reversed_docs, 280).save(tokenizer_dir(tiny_base / "other"))
    with pytest.raises(UserError, match="has a 300-token vocabulary, the tokenizer here 280"):
        run(tiny_base / "other", "--num-iterations=2", "--model-tag=bad", "--resume-from-step=1")


def test_a_damaged_optimizer_state_is_one_line_on_stderr(tiny_base):
    # Orbax's reads still in flight when the first one fails report "Event loop is closed" after the error.
    run(tiny_base, "--num-iterations=1", "--model-tag=torn")
    step_dir = tiny_base / "base_checkpoints" / "torn" / "1"
    biggest = max((step_dir / "opt_state").rglob("d/*"), key=lambda f: f.stat().st_size)
    os.truncate(biggest, 100)
    cmd = [sys.executable, "-m", "scripts.pretrain", *TINY_RUN, f"--base-dir={tiny_base}", "--num-iterations=2",
           "--model-tag=torn", "--resume-from-step=1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=script_env(cache=False), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2
    assert re.fullmatch(f"error: checkpoint at {step_dir} could not be read, .*available: none\\)\n", done.stderr)


def test_failed_start_keeps_the_earlier_run_and_samples_never_cost_a_checkpoint(tiny_base, capsys):
    folder = tiny_base / "base_checkpoints" / "kept"
    run(tiny_base, "--num-iterations=1", "--model-tag=kept")
    with pytest.raises(UserError, match="data readers"):  # 8 rows over 3 readers: fails before any step
        run(tiny_base, "--num-iterations=1", "--model-tag=kept", "--data-readers=3")
    assert Checkpoints(folder).steps() == [1] and not list(folder.parent.glob("kept-previous-*"))
    # A prompt longer than the rotary table: the final samples fail, the final checkpoint is written anyway.
    args = parse_args([*TINY_RUN, f"--base-dir={tiny_base}", "--num-iterations=2", "--model-tag=kept"])
    pretrain(args, tiny_base, ["alpha " * 400])
    assert "samples skipped: sequence of" in capsys.readouterr().out
    assert Checkpoints(folder).steps() == [2] and len(list(folder.parent.glob("kept-previous-*"))) == 1


def test_ids_outside_the_vocab_are_refused_before_the_device_sees_them():
    """jnp's gathers clamp an input id past the table, and a target past it gives a silent nan loss."""
    ok = np.array([[0, 5, 9]]), np.array([[5, 9, -1]])
    x, y = stack_micro_batches(iter([ok, ok]), 2, vocab_size=10)
    assert x.shape == y.shape == (2, 1, 3)
    for bad, what in [((ok[0], ok[1] + 1), "target id 10"), ((ok[0] - 1, ok[1]), "input id -1")]:
        with pytest.raises(UserError, match=f"the data holds {what}, outside the model's vocab of 10 tokens: token"):
            stack_micro_batches(iter([ok, bad]), 2, vocab_size=10)


def test_core_needs_a_bundle_checked_before_training(tiny_base, tmp_path, monkeypatch, capsys):
    class ModelMade(Exception):
        pass

    def init_state(*args, **kwargs):
        raise ModelMade

    monkeypatch.setattr("nanojax.train.init_state", init_state)
    with pytest.raises(UserError, match=f"no core.yaml in {tmp_path}: a CORE bundle holds core.yaml"):
        run(tiny_base, "--num-iterations=1", f"--core-bundle={tmp_path}")  # refused before the model is made
    with pytest.raises(ModelMade):  # no bundle in the base dir: a note, and the run goes on
        run(tiny_base, "--num-iterations=1")
    assert f"CORE is not evaluated: no task bundle at {tiny_base / 'eval_bundle'}" in capsys.readouterr().out
    with pytest.raises(ModelMade):  # never: the bundle is not even read
        run(tiny_base, "--num-iterations=1", f"--core-bundle={tmp_path}", "--core-metric-every=0")
    assert "CORE" not in capsys.readouterr().out


def test_one_run_at_a_time_per_model_tag(tiny_base, monkeypatch):
    monkeypatch.setattr("nanojax.train.init_state", None)  # refused before the model is even made
    with claimed(tiny_base / "base_checkpoints" / "busy"):
        with pytest.raises(UserError, match=f"another run \\(process {os.getpid()}\\) is training into .*busy: wait"):
            run(tiny_base, "--num-iterations=1", "--model-tag=busy")


def test_too_little_disk_for_the_checkpoints_is_said_at_the_start(tiny_base, monkeypatch, capsys):
    monkeypatch.setattr("nanojax.runs.shutil.disk_usage", lambda _: SimpleNamespace(free=2**20))
    run(tiny_base, "--num-iterations=1", "--model-tag=disk", "--keep-checkpoints=2", "--eval-every=1")
    out = capsys.readouterr().out
    assert re.search(r"note: 1 MiB free in \S+, less than 3 checkpoints of [1-9]\d* MiB: saves may fail", out)
    assert out.index("note: 1 MiB free") < out.index("step 00001")
    assert re.search(r"step 00001 \| val bpb \d\.\d{4} over [1-9][\d,]* tokens\n", out)  # how much it read
    assert out.index("step 00000 | val bpb") < out.index("step 00001/")  # the untrained model's, first
    assert f"step 00001 | checkpoint {tiny_base / 'base_checkpoints' / 'disk' / '1'}\n" in out


def test_ctrl_c_saves_the_step_in_flight_and_a_second_stops_at_once(tiny_base, monkeypatch, capsys):
    def ctrl_c_at(step, times):
        def on_metrics(at, metrics):
            if at == step:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)

        return on_metrics

    folder, handler = tiny_base / "base_checkpoints" / "ctrl_c", signal.getsignal(signal.SIGINT)
    monkeypatch.setattr("nanojax.pretrain.wandb_logger", lambda *_: ctrl_c_at(3, 1))
    with pytest.raises(Interrupted, match="stopped at step 3, saved: resume with --resume-from-step 3"):
        run(tiny_base, "--num-iterations=6", "--save-every=-1", "--model-tag=ctrl_c")  # saves only at its end
    assert Checkpoints(folder).steps() == [3] and "Ctrl-C again to stop at once" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's is gone
    monkeypatch.setattr("nanojax.pretrain.wandb_logger", lambda *_: ctrl_c_at(5, 2))
    with pytest.raises(Interrupted, match="interrupted at step 5: resume with --resume-from-step 4"):
        run(tiny_base, "--num-iterations=6", "--save-every=2", "--model-tag=ctrl_c", "--resume-from-step=3")
    assert Checkpoints(folder).steps() == [3, 4]


def test_ctrl_c_in_code_whose_exceptions_python_ignores_is_not_lost():
    """jax's garbage-collection callback runs often while jax starts up; a Ctrl-C landing in it was swallowed
    ("Exception ignored in ...") and the run went on."""
    program = """if True:
        import gc, time
        from nanojax.common import cli

        def callback(phase, info):
            gc.callbacks.remove(callback)
            raise KeyboardInterrupt  # as a Ctrl-C landing here does

        @cli
        def main():
            gc.callbacks.append(callback)
            gc.collect()
            time.sleep(30)
            print("went on")

        main()
    """
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


def test_a_piped_log_comes_line_by_line():
    """Not in blocks of 8 KB at the end: a run piped to tee shows its progress as it goes."""
    program = """if True:
        import time
        from nanojax.common import cli

        @cli
        def main():
            print("step 1")
            time.sleep(30)

        main()
    """
    proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "step 1\n"  # while the program still runs
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("keep", [False, True])
def test_freed_memory_is_kept_for_the_next_step(keep):
    """A 256 MB block freed and allocated again: by default glibc hands it back and the second use faults
    every page in again (as XLA's temporaries did, each step); kept, the second use faults none."""
    program = f"""if True:
        import ctypes, resource
        from nanojax.common import keep_freed_memory

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype = ctypes.c_void_p
        if {keep}:
            keep_freed_memory()

        def use_and_free():  # malloc'd, every page touched, freed (numpy would ask for huge pages)
            block = libc.malloc(2**28)
            ctypes.memset(block, 1, 2**28)
            libc.free(ctypes.c_void_p(block))

        use_and_free()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        use_and_free()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
    faults = int(subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout)
    pages = 2**28 // 4096
    assert (faults < pages // 10) if keep else (faults > pages // 2)


def test_out_of_memory_is_one_line(capsys):
    @cli
    def main():
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 264124171396 bytes.\nmore")

    with pytest.raises(SystemExit):
        main()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory (RESOURCE_EXHAUSTED" in err and "--device-batch-size" in err


def test_attention_auto_is_ours_on_cpu():
    """cuDNN's flash attention is picked on GPUs only; on CPU auto means ours, and xla is taken as asked."""
    assert platform_attention("auto", "bfloat16", 128) == "nanojax"
    assert platform_attention("xla", "float32", 64) == "xla"
    with pytest.raises(UserError, match="this has cpu, bfloat16, 128"):
        platform_attention("cudnn", "bfloat16", 128)


def test_zero_iterations_is_refused(tiny_base):
    with pytest.raises(UserError, match="--num-iterations 0: give a positive count, or -1"):
        run(tiny_base, "--num-iterations=0")


@pytest.mark.parametrize("flag", ["--depth=0", "--loss-chunk=-4", "--device-batch-size=eight"])
def test_sizes_must_be_positive_integers(flag, capsys):
    with pytest.raises(SystemExit):
        parse_args([flag])
    assert f"argument {flag.split('=')[0]}: must be a positive integer" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_base):
    huge_lrs = ["--unembedding-lr=1e38", "--embedding-lr=1e38", "--matrix-lr=1e38"]
    with pytest.raises(UserError, match=r"loss became \w+ at step (\d+); its last good checkpoint, step \d+, is in"):
        run(tiny_base, "--num-iterations=8", "--save-every=1", "--model-tag=nan", *huge_lrs)
    ckpts = Checkpoints(tiny_base / "base_checkpoints" / "nan")
    assert ckpts.steps()
    # A run that saved nothing does not point at the checkpoints of an earlier run in its folder.
    with pytest.raises(UserError, match=r"at step \d+; this run saved no checkpoint: start it again with lower"):
        run(tiny_base, "--num-iterations=8", "--save-every=-1", "--model-tag=nan", *huge_lrs)
    restored = ckpts.restore_params()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
