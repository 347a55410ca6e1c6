"""Checkpoint round trips, resharding and the errors a user can hit.

Run: python -m pytest -q tests/test_checkpoint.py
"""

import shutil
import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from nanojax import checkpoint
from nanojax.checkpoint import Checkpoints
from nanojax.common import UserError


class Tiny(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(16, width, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(2)])


def dict_params(seed: int = 0, rows: int = 8):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"blocks": {"w": jax.random.normal(k1, (rows, 6)), "b": jax.random.normal(k2, (rows,))}}


def trained_opt_state(params):
    """An adamw state after one update, so mu/nu/count are not all zeros."""
    tx = optax.adamw(1e-2)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    return tx.update(grads, state, params)[1]


def abstract(tree, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


METADATA = {"step": 7, "val_bpb": np.float32(1.25), "model_config": {"depth": 2}, "loop_state": {"ema": 0.5}}


def save(ckpts, step, params, opt_state=None, loader_state=None, metadata=None):
    return ckpts.save(step, params, opt_state, loader_state or {"pos": step}, metadata or {"step": step})


def test_round_trip_dict(tmp_path):
    params = dict_params()
    opt_state = trained_opt_state(params)
    with Checkpoints(tmp_path / "d2") as ckpts:
        ckpts.save(7, params, opt_state, {"shard": 3, "row": 11}, METADATA)
    r = Checkpoints(tmp_path / "d2").restore(None, params=abstract(params), opt_state=abstract(opt_state))
    assert r.step == 7
    assert_trees_equal(r.params, params)
    assert_trees_equal(r.opt_state, opt_state)  # namedtuples come back as namedtuples
    assert r.loader_state == {"shard": 3, "row": 11}
    assert r.metadata == {**METADATA, "val_bpb": 1.25}


def test_round_trip_nnx_state(tmp_path):
    model = Tiny(8, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    opt_state = trained_opt_state(params)
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 3, params, opt_state)
    # The restore target is built abstractly, as a training script would.
    abstract_model = nnx.eval_shape(lambda: Tiny(8, rngs=nnx.Rngs(1)))
    target = nnx.state(abstract_model, nnx.Param)
    target_opt = jax.eval_shape(lambda: trained_opt_state(nnx.state(Tiny(8, rngs=nnx.Rngs(1)), nnx.Param)))
    r = Checkpoints(tmp_path).restore(3, params=target, opt_state=target_opt)
    assert_trees_equal(r.params, params)
    assert_trees_equal(r.opt_state, opt_state)
    fresh = Tiny(8, rngs=nnx.Rngs(2))
    nnx.update(fresh, r.params)
    np.testing.assert_array_equal(fresh.blocks[1].kernel[...], model.blocks[1].kernel[...])


def test_latest_step_and_max_to_keep(tmp_path):
    params = dict_params()
    with Checkpoints(tmp_path, max_to_keep=2) as ckpts:
        assert ckpts.latest_step() is None
        dropped = [save(ckpts, step, params) for step in (10, 20, 30, 40)]
        ckpts.wait()
        assert dropped == [[], [], [10], [20]]  # what each save said it would remove
        assert ckpts.steps() == [30, 40]
        assert ckpts.latest_step() == 40
    assert Checkpoints(tmp_path).read_metadata() == {"step": 40}  # metadata-only read of the latest


def test_inference_save_and_restore_without_opt_state(tmp_path):
    params = dict_params()
    with Checkpoints(tmp_path) as ckpts:
        ckpts.save(5, params, None, None, {"step": 5, "model_config": {"depth": 2}})
    ckpts = Checkpoints(tmp_path)
    assert ckpts.read_metadata(5)["model_config"] == {"depth": 2}
    r = ckpts.restore_params()  # no target: default device, plain dict
    assert r.opt_state is None and r.metadata["step"] == 5
    assert_trees_equal(r.params, params)
    assert jax.tree.leaves(r.params)[0].sharding == SingleDeviceSharding(jax.devices()[0])
    r = ckpts.restore_params(5, abstract(params))
    assert_trees_equal(r.params, params)
    with pytest.raises(UserError, match="no opt_state"):
        ckpts.restore(5, params=abstract(params), opt_state=abstract(trained_opt_state(params)))


@pytest.mark.parametrize("saved_on,restored_on", [(4, 1), (1, 4)])
def test_resharding(tmp_path, saved_on, restored_on):
    def sharding(n):
        if n == 1:
            return SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(Mesh(np.array(jax.devices()[:n]), ("data",)), PartitionSpec("data"))

    params = jax.device_put(dict_params(), sharding(saved_on))
    opt_state = trained_opt_state(params)
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, params, opt_state)
    target_opt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(restored_on) if x.ndim else None),
        opt_state,
    )
    r = Checkpoints(tmp_path).restore(1, params=abstract(params, sharding(restored_on)), opt_state=target_opt)
    assert_trees_equal(r.params, params)
    assert_trees_equal(r.opt_state, opt_state)
    for leaf in jax.tree.leaves(r.params):
        assert leaf.sharding == sharding(restored_on)


def test_missing_step_lists_available(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoints in"):
        Checkpoints(tmp_path / "nothing").read_metadata()
    assert not (tmp_path / "nothing").exists()  # a read never creates the directory
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 100, dict_params())
        save(ckpts, 200, dict_params())
    with pytest.raises(UserError, match=r"no checkpoint for step 150 .*available steps: \[100, 200\]"):
        Checkpoints(tmp_path).resolve_step(150)
    assert Checkpoints(tmp_path).resolve_step(np.int64(200)) == 200
    with pytest.raises(UserError, match="step '200' is not a checkpoint's step: give an integer"):
        Checkpoints(tmp_path).resolve_step("200")  # as a library caller may pass it


def test_shape_mismatch(tmp_path):
    params = dict_params(rows=8)
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, params, trained_opt_state(params))
    bigger = dict_params(rows=16)
    with pytest.raises(UserError, match=r"different model shape \(blocks.b: saved \(8,\), wanted \(16,\).*--model-tag"):
        Checkpoints(tmp_path).restore(1, params=abstract(bigger), opt_state=abstract(trained_opt_state(bigger)))
    renamed = {"blocks": {"w": params["blocks"]["w"], "bias": params["blocks"]["b"]}}
    with pytest.raises(UserError, match="blocks.bias not in checkpoint; blocks.b not in the model"):
        Checkpoints(tmp_path).restore_params(1, abstract(renamed))


def test_incomplete_step_is_skipped_and_kept(tmp_path):
    params = dict_params()
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, params)
        save(ckpts, 2, params)
    (tmp_path / "2" / "params" / "manifest.ocdbt").unlink()
    # An interrupted save leaves Orbax's temporary dir; a partial copy leaves a bare step dir.
    shutil.copytree(tmp_path / "1", tmp_path / "3.orbax-checkpoint-tmp-1234")
    (tmp_path / "4" / "params").mkdir(parents=True)
    ckpts = Checkpoints(tmp_path)
    with pytest.warns(UserWarning) as caught:
        assert ckpts.latest_step() == 1
    assert [str(w.message) for w in caught] == [
        f"skipping incomplete checkpoint {tmp_path / '2'}: missing params/manifest.ocdbt",
        f"skipping incomplete checkpoint {tmp_path / '4'}: missing or unreadable _CHECKPOINT_METADATA",
    ]
    with (
        pytest.warns(UserWarning),
        pytest.raises(UserError, match=f"{tmp_path / '2'} is incomplete or corrupt"),
    ):
        ckpts.restore_params(2)
    later = r"later checkpoints \[2, 4\] exist in .* \(incomplete: \[2, 4\]\): move them aside to resume from 1"
    with pytest.warns(UserWarning), pytest.raises(UserError, match=later):  # they would be in the way of saves
        ckpts.restore(1, params=abstract(params), opt_state=None)
    assert (tmp_path / "2").is_dir() and (tmp_path / "4").is_dir()  # never deleted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own setting: a script says each once, not at every listing
        ckpts.steps(), Checkpoints(tmp_path).latest_step()  # two places that list the steps
    assert len(caught) == 2


def test_truncated_file_is_reported(tmp_path):
    params = {"w": jnp.arange(64 * 256, dtype=jnp.float32).reshape(64, 256)}  # big enough not to be inlined
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, params)
        save(ckpts, 2, params)
    files = [f for f in (tmp_path / "2" / "params").rglob("*") if f.is_file() and "/d/" in str(f)]
    biggest = max(files, key=lambda f: f.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)
    with pytest.raises(UserError, match=rf"{tmp_path / '2'} could not be read.*available: \[1\]"):
        Checkpoints(tmp_path).restore_params(2, abstract(params))
    assert_trees_equal(Checkpoints(tmp_path).restore_params(1, abstract(params)).params, params)

    (tmp_path / "1" / "metadata" / "metadata").write_text('{"step": ')
    with pytest.raises(UserError, match=rf"{tmp_path / '1'} could not be read"):
        Checkpoints(tmp_path).read_metadata(1)


def test_only_the_aftermath_of_a_failed_read_is_silenced():
    """TensorStore reads still in flight after a damaged checkpoint failed report as unraisable errors;
    those are dropped, anything else reaches Python's hook."""
    reported = []
    for error in (RuntimeError("Event loop is closed"), Exception("Encountered error while reading array index: 0")):
        checkpoint._quiet_read_aftermath(SimpleNamespace(exc_value=error), default=reported.append)
    assert reported == []
    other = SimpleNamespace(exc_value=ValueError("something else"))
    checkpoint._quiet_read_aftermath(other, default=reported.append)
    assert reported == [other]


def test_refuses_to_overwrite_or_fork(tmp_path):
    params = dict_params()
    opt_state = trained_opt_state(params)
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, params, opt_state)
        save(ckpts, 2, params, opt_state)
        with pytest.raises(UserError, match="already exists"):
            save(ckpts, 2, params, opt_state)
    with pytest.raises(UserError, match=r"later checkpoints \[2\] exist .*: resume from the latest, 2, or move it"):
        Checkpoints(tmp_path).restore(1, params=abstract(params), opt_state=abstract(opt_state))


def test_a_failed_write_is_one_line_naming_the_step_and_what_is_left(tmp_path):
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, dict_params())
        ckpts.wait()

        def full_disk(*args, **kwargs):
            raise ValueError("wrapper") from OSError(28, "No space left on device")

        ckpts._manager.save = full_disk
        with pytest.raises(UserError, match=r"step 2 could not be written .*No space left.* checkpoints: \[1\]"):
            save(ckpts, 2, dict_params())


def test_non_finite_values_read_back_are_damage(tmp_path):
    params = dict_params()
    params["blocks"]["b"] = params["blocks"]["b"].at[3].set(jnp.nan)  # as a flipped exponent bit reads
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, params)
    with pytest.raises(UserError, match=r"1 holds non-finite values \(params.blocks.b\), so its files are damaged"):
        Checkpoints(tmp_path).restore_params(1, abstract(params))


def test_arrays_may_be_donated_after_save_returns(tmp_path):
    params = dict_params()
    expected = jax.tree.map(np.asarray, params)
    target = abstract(params)
    with Checkpoints(tmp_path) as ckpts:
        save(ckpts, 1, params)
        jax.tree.map(lambda x: x.delete(), params)  # what a donated train step does to the buffers
    assert_trees_equal(Checkpoints(tmp_path).restore_params(1, target).params, expected)
