"""Checkpoints: one Orbax CheckpointManager with four composite items per step.

    <checkpoint_dir>/<step>/params        pytree of arrays (nnx.State or a dict), OCDBT
                           /opt_state     optax state pytree (absent in inference-only saves)
                           /loader_state  small JSON dict: the data loader's position
                           /metadata      JSON dict: step, val_bpb, model_config, ... (filled by the caller)

    ckpts = Checkpoints(base_dir / "base_checkpoints" / "d4", max_to_keep=3)
    ckpts.save(step, params, opt_state, loader_state, metadata)  # async; ckpts.close() before exit
    r = ckpts.restore(step, params=abstract_params, opt_state=abstract_opt_state)  # training
    r = ckpts.restore_params(step)  # inference; ckpts.read_metadata(step) to size the model first

Restore targets are pytrees of `jax.ShapeDtypeStruct` (or arrays) whose `.sharding` says where each
array goes, so a checkpoint written from 4 devices reads back onto 1 and the reverse.
"""

import json
import logging
import operator
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nanojax.common import UserError, a_few, changed

TREE_ITEMS = ("params", "opt_state")
JSON_ITEMS = ("loader_state", "metadata")
# Files each item cannot be read without. Orbax only guarantees atomicity of its own writes (a
# temporary dir renamed on commit); a step dir copied half-way or pruned by hand still looks
# committed to it, so we check for these ourselves before trusting a step.
REQUIRED_FILES = {name: ("_METADATA", "manifest.ocdbt") for name in TREE_ITEMS}
REQUIRED_FILES |= {name: ("metadata",) for name in JSON_ITEMS}  # JsonCheckpointHandler's file name
# When one array of a damaged checkpoint fails to read, Orbax raises (and we say so in one line) while
# TensorStore's other reads are still in flight: each then fails against Orbax's closed event loop and
# is reported as "unraisable", dozens of tracebacks after the answer. Those reports say nothing new.
_AFTERMATH = ("Event loop is closed", "Encountered error while reading array index")


def _quiet_read_aftermath(report, default=sys.unraisablehook):
    if not str(report.exc_value).startswith(_AFTERMATH):
        default(report)


sys.unraisablehook = _quiet_read_aftermath
# Orbax logs each failure of a background save through absl, a traceback per thread (hundreds of lines
# for a full disk), before the error reaches us and is said in one line, and asyncio then reports the
# same error for each of TensorStore's writes or reads left in flight. Orbax's warnings (a temporary
# folder of an interrupted save being replaced) are its own housekeeping.
logging.getLogger("absl").setLevel(logging.CRITICAL)
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


@dataclass
class Restored:
    """What a restore hands back; the arrays sit where the restore targets' shardings said."""

    step: int
    params: Any
    opt_state: Any | None  # None for inference restores
    loader_state: dict | None  # None for inference restores
    metadata: dict


class Checkpoints:
    """Save and restore training state in `directory`, one step-numbered subdirectory per save."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = None):
        self.directory = Path(directory).expanduser().resolve()
        self._max_to_keep = max_to_keep
        self._saving: int | None = None  # the step of the latest save, whose errors surface later
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for name in TREE_ITEMS:  # registered up front so a fresh manager can read item metadata
            registry.add(name, ocp.args.StandardSave)
            registry.add(name, ocp.args.StandardRestore)
        for name in JSON_ITEMS:
            registry.add(name, ocp.args.JsonSave)
            registry.add(name, ocp.args.JsonRestore)
        # create=False: reading a mistyped --model-tag must not leave an empty directory behind.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # ---- listing ---------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _step_dirs(self) -> list[int]:
        """Every directory named like a step. Orbax's in-flight temporaries ("<step>.orbax-checkpoint-
        tmp-<time>") are not digits-only, so they never count."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def _problem(self, step: int) -> str | None:
        """Why step's directory is not a complete checkpoint, or None if it looks complete."""
        path = self.step_dir(step)
        try:  # Orbax writes the commit timestamp into this file as the last act of a save
            info = json.loads((path / "_CHECKPOINT_METADATA").read_text())
        except (OSError, ValueError):
            return "missing or unreadable _CHECKPOINT_METADATA"
        if not info.get("commit_timestamp_nsecs"):
            return "the save never committed"
        items = info.get("item_handlers") or {}
        for name in ("params", "metadata"):
            if name not in items:
                return f"no {name} item"
        for name in items:
            for file in REQUIRED_FILES.get(name, ()):
                if not (path / name / file).is_file():
                    return f"missing {name}/{file}"
        return None

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending; warns about (and keeps) incomplete ones."""
        complete = []
        for step in self._step_dirs():
            problem = self._problem(step)
            if problem is None:
                complete.append(step)
            else:
                # Said once a process (Python's default for a warning from one place), not at every listing.
                warnings.warn(f"skipping incomplete checkpoint {self.step_dir(step)}: {problem}", stacklevel=1)
        return complete

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def resolve_step(self, step: int | None = None) -> int:
        """`step`, or the latest complete step when None; a UserError naming the choices otherwise."""
        if step is not None:
            try:
                step = operator.index(step)  # ints, numpy's too; not "200" or 200.0
            except TypeError:
                raise UserError(f"step {step!r} is not a checkpoint's step: give an integer (None: latest)") from None
        available = self.steps()
        if step is None:
            if not available:
                raise UserError(
                    f"no complete checkpoints in {self.directory}: name a model folder a run saved checkpoints in, "
                    "or train a model first"
                )
            return available[-1]
        if step in available:
            return step
        if self.step_dir(step).is_dir():
            raise UserError(
                f"checkpoint at {self.step_dir(step)} is incomplete or corrupt ({self._problem(step)}); "
                f"pick another step: available steps are {available or 'none'}"
            )
        raise UserError(f"no checkpoint for step {step} in {self.directory}; available steps: {available or 'none'}")

    # ---- saving ----------------------------------------------------------------------------

    def save(self, step: int, params, opt_state, loader_state: dict | None, metadata: dict) -> list[int]:
        """Start an async save; returns once arrays are copied off-device (safe to donate them), with
        the steps that max_to_keep removes once it is written."""
        path = self.step_dir(step)
        # Orbax never overwrites (and an async save is not on disk yet, hence all_steps); say so here.
        if path.exists() or step in self._manager.all_steps():
            raise UserError(f"a checkpoint for step {step} already exists at {path}; move it aside first")
        # Round-trip through json now: fails early on a non-JSON value (not in the background
        # thread) and snapshots the dicts so the caller may mutate them while the save runs.
        items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(_as_json(metadata))}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if loader_state is not None:
            items["loader_state"] = ocp.args.JsonSave(_as_json(loader_state))
        self.wait()  # the previous save's errors, if any, under its own step
        self._saving = step
        self.directory.mkdir(parents=True, exist_ok=True)
        # force=True: Orbax silently skips (returns False) a step below its latest; we never want that.
        kept = sorted({*self._manager.all_steps(), step})  # steps only grow (a resume refuses later ones)
        self._written(lambda: self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        return kept[: -self._max_to_keep] if self._max_to_keep else []

    def wait(self) -> None:
        """Block until pending async saves are committed (and old ones pruned); raises their errors."""
        self._written(self._manager.wait_until_finished)

    def close(self) -> None:
        self._written(self._manager.close)  # waits for pending saves first

    def _written(self, fn) -> None:
        """Run a save or a wait for one: a save that failed (a full disk, a read-only folder), now or in
        the background, is one line naming it and what is left."""
        try:
            fn()
        except UserError:
            raise
        except Exception as e:
            if self._saving is None:
                raise
            raise UserError(
                f"the checkpoint of step {self._saving} could not be written to {self.directory} ({_root_cause(e)}): "
                f"free some space or pass another --base-dir; complete checkpoints: {self.steps() or 'none'}"
            ) from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- restoring -------------------------------------------------------------------------

    def read_metadata(self, step: int | None = None) -> dict:
        """The JSON metadata alone (e.g. to build the model config before building the model)."""
        step = self.resolve_step(step)
        return self._read(step, metadata=ocp.args.JsonRestore()).metadata

    def restore(self, step: int | None, *, params, opt_state) -> Restored:
        """Everything needed to resume training, placed as the abstract targets' shardings say.

        Refuses when later step directories exist: the resumed run would collide with them on save
        (and Orbax's max_to_keep would prune by save order), so the user must move them aside."""
        step = self.resolve_step(step)
        later = [s for s in self._step_dirs() if s > step]
        if later:
            latest = self.latest_step()
            hint = f"resume from the latest, {latest}, or " if latest != step else ""
            incomplete = [s for s in later if self._problem(s)]  # still in the way of this run's saves
            raise UserError(
                f"resuming from step {step} but later checkpoints {later} exist in {self.directory}"
                f"{f' (incomplete: {incomplete})' if incomplete else ''}: {hint}"
                f"move {'them' if len(later) > 1 else 'it'} aside to resume from {step}"
            )
        saved = set(self._item_names(step))
        for name in ("opt_state", "loader_state"):
            if name not in saved:
                raise UserError(
                    f"checkpoint at {self.step_dir(step)} has no {name} (an inference-only save); "
                    "it can be sampled from but not resumed"
                )
        self._check_shapes(step, "params", params)
        self._check_shapes(step, "opt_state", opt_state)
        r = self._read(
            step,
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            loader_state=ocp.args.JsonRestore(),
            metadata=ocp.args.JsonRestore(),
        )
        self._check_finite(step, {"params": r.params, "opt_state": r.opt_state})
        return Restored(step, r.params, r.opt_state, r.loader_state, r.metadata)

    def restore_params(self, step: int | None = None, params=None) -> Restored:
        """Params + metadata for inference. Without a target, arrays land on the default device as
        a nested dict keyed by strings, as they were saved."""
        step = self.resolve_step(step)
        if params is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            saved = self._guarded(step, lambda: self._manager.item_metadata(step)["params"].tree)
            params = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        else:
            self._check_shapes(step, "params", params)
        r = self._read(step, params=ocp.args.StandardRestore(_abstract(params)), metadata=ocp.args.JsonRestore())
        self._check_finite(step, {"params": r.params})
        return Restored(step, r.params, None, None, r.metadata)

    # ---- internals -------------------------------------------------------------------------

    def _item_names(self, step: int) -> list[str]:
        info = json.loads((self.step_dir(step) / "_CHECKPOINT_METADATA").read_text())
        return list(info["item_handlers"])

    def _guarded(self, step: int, fn):
        """Run an Orbax read; any failure below it means the files are damaged: say which, keep them."""
        try:
            return fn()
        except UserError:
            raise
        except Exception as e:
            others = [s for s in self.steps() if s != step]
            raise UserError(
                f"checkpoint at {self.step_dir(step)} could not be read, it may be corrupt or half-written "
                f"({_root_cause(e)}); restore another step (available: {others or 'none'})"
            ) from e

    def _read(self, step: int, **items) -> ocp.args.Composite:
        return self._guarded(step, lambda: self._manager.restore(step, args=ocp.args.Composite(**items)))

    def _check_finite(self, step: int, trees: dict) -> None:
        """Training never saves a nan or an inf (it stops first), so one read back means damaged files
        that Orbax read without complaint (it keeps no checksums): a flipped bit, say."""
        leaves = jax.tree_util.tree_flatten_with_path(trees)[0]
        leaves = [(path, x) for path, x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
        finite = jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([x for _, x in leaves])
        bad = [".".join(_key_name(k) for k in path) for (path, _), ok in zip(leaves, finite, strict=True) if not ok]
        if bad:
            others = [s for s in self.steps() if s != step]
            raise UserError(
                f"checkpoint at {self.step_dir(step)} holds non-finite values ({a_few(bad)}), so its files are "
                f"damaged; restore another step (available: {others or 'none'})"
            )

    def _check_shapes(self, step: int, name: str, target) -> None:
        """Compare saved and wanted shapes leaf by leaf, for a message better than Orbax's."""
        saved = _shapes(self._guarded(step, lambda: self._manager.item_metadata(step)[name].tree))
        wanted = _shapes(target)
        diffs = changed(saved, wanted, "wanted")
        diffs += [f"{k} not in checkpoint" for k in wanted if k not in saved]
        diffs += [f"{k} not in the model" for k in saved if k not in wanted]
        if not diffs:
            return
        summary = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        where = self.step_dir(step)
        if name == "params":
            raise UserError(
                f"checkpoint at {where} was saved for a different model shape ({summary}); "
                "pass the matching --depth/--aspect-ratio/--head-dim/--max-seq-len or a different --model-tag"
            )
        raise UserError(
            f"checkpoint at {where} holds {name} of a different structure ({summary}); resume with the "
            "optimizer settings it was saved with, or start a new run with a different --model-tag"
        )


def _root_cause(e: Exception) -> str:
    """Orbax wraps TensorStore's error (which names the file and the reason) in vaguer ones."""
    while e.__cause__ or e.__context__:
        e = e.__cause__ or e.__context__
    line = (str(e).strip().splitlines() or [""])[0]
    if len(line) > 300:  # its start says what was read or written, its end why it failed
        line = f"{line[:120]} ... {line[-160:]}"
    return f"{type(e).__name__}: {line}"


def _key_name(k) -> str:
    """One path element as Orbax stores it: dict keys, attribute names and indices all become str."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _abstract(tree):
    """Restore targets: leaves with no sharding (plain eval_shape output) go to the default device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None) or device),
        tree,
    )


def _as_json(obj):
    """A JSON-only deep copy; numpy/jax scalars become Python numbers, anything else non-JSON raises."""

    def scalar(o):
        if hasattr(o, "item") and getattr(o, "size", 1) == 1:
            return o.item()
        raise TypeError(f"checkpoint metadata must be JSON: got {type(o).__name__} {o!r:.80}")

    return json.loads(json.dumps(obj, default=scalar))
