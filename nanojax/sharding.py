"""Device mesh, parameter and batch placement, multi-host start-up. One device is a mesh of one.

The mesh has a single `data` axis over every device (of every process). Batches split their batch
dimension over it. Parameters and optimizer state are replicated, or with FSDP sharded over the same
axis along their first dimension that divides evenly (the table in `leaf_spec`).
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def initialize_distributed() -> None:
    """Join a multi-process run when the environment describes one (a no-op for a single process)."""
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ.get("JAX_COORDINATOR_ADDRESS"),
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in os.environ else None,
            process_id=int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
        )


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
