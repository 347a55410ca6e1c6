"""Evaluation metrics (SPEC 7): bits per byte, independent of the tokenizer's vocabulary size."""

import math

import jax.numpy as jnp


def bpb_sums(loss_BT, targets_BT, token_bytes):
    """(nats over targets that are real bytes, their byte count): sum over batches, then `bits_per_byte`."""
    nbytes_BT = jnp.where(targets_BT >= 0, jnp.asarray(token_bytes)[jnp.maximum(targets_BT, 0)], 0)
    counted_BT = nbytes_BT > 0  # special tokens (0 bytes) and ignored targets don't count
    return jnp.where(counted_BT, loss_BT, 0.0).sum(), nbytes_BT.sum()


def bits_per_byte(total_nats, total_bytes) -> float:
    total_bytes = float(total_bytes)
    return float(total_nats) / (math.log(2) * total_bytes) if total_bytes > 0 else float("inf")
