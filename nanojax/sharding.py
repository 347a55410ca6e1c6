"""Device mesh, parameter and batch placement, multi-host start-up. One device is a mesh of one.

The mesh has a single `data` axis over every device (of every process). Batches split their batch
dimension over it. Parameters and optimizer state are replicated, or with FSDP sharded over the same
axis along their first dimension that divides evenly (the table in `leaf_spec`).
"""

import json
import os
import sys
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nanojax.common import UserError

DATA = "data"


def multi_process_env() -> bool:
    """Whether the environment describes a multi-process run (jax.distributed's variables)."""
    return int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(flags: dict | None = None) -> None:
    """Join a multi-process run when the environment describes one (a no-op for a single process), then
    check that every process was started with the same flags (all but --base-dir, which is per host)."""
    if not multi_process_env():
        return
    address, count = os.environ.get("JAX_COORDINATOR_ADDRESS"), os.environ.get("JAX_NUM_PROCESSES", "?")
    print(f"joining a run of {count} processes through {address} as process {os.environ.get('JAX_PROCESS_ID', '?')}"
          ": it waits for all of them (up to 5 minutes)", flush=True)  # fmt: skip
    try:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
            process_id=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
        )
    except (jax.errors.JaxRuntimeError, ValueError) as e:  # a port in use, a bad process id
        first = str(e).strip().splitlines()[0]
        raise UserError(f"can't join the run through {address} ({first[:200]}): check JAX_COORDINATOR_ADDRESS "
                        "(a free port on process 0's host), JAX_NUM_PROCESSES, JAX_PROCESS_ID") from None  # fmt: skip
    if flags is not None:
        check_same_flags({k: v for k, v in flags.items() if k != "base_dir"})
    if jax.process_index() != 0:
        # Every process runs the same loop: one log (nanochat's print0) is enough. Errors and warnings
        # go to stderr, which every process keeps.
        print(f"process {jax.process_index()} joined: the run's log is process 0's", flush=True)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)


def check_same_flags(flags: dict) -> None:
    """Processes started with different flags would hang in a collective, or train replicas that differ:
    refused at the start, naming the flags, on every process."""
    names = sorted(flags)
    digests = [zlib.crc32(json.dumps(flags[k], sort_keys=True, default=str).encode()) for k in names]
    table = np.asarray(multihost_utils.process_allgather(np.asarray(digests, np.int64)))  # (processes, flags)
    if differ := [name for name, column in zip(names, table.T, strict=True) if len(set(column.tolist())) > 1]:
        raise UserError(f"the processes of this run were started with different {', '.join(differ)}: start every "
                        "process with the same flags")  # fmt: skip


def make_mesh(num_devices: int | None = None) -> Mesh:
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    return Mesh(np.array(devices), (DATA,))


def leaf_spec(shape, mesh: Mesh, fsdp: bool) -> PartitionSpec:
    """Replicated; with FSDP, the first dimension divisible by the mesh size is split over `data`."""
    n = mesh.shape[DATA]
    if fsdp and n > 1:
        for axis, size in enumerate(shape):
            if size % n == 0:
                return PartitionSpec(*([None] * axis), DATA)
    return PartitionSpec()


def tree_shardings(tree, mesh: Mesh, fsdp: bool = False):
    """A NamedSharding for every leaf of a pytree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x.shape, mesh, fsdp)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """(micro_steps, batch, seq): the batch dimension is split over the data axis."""
    return NamedSharding(mesh, PartitionSpec(None, DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local, sharding: NamedSharding):
    """This process's host batch -> one global array (each process holds its own rows)."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))
