"""Device mesh ("data", "fsdp"), layout rules (params by shape along "fsdp", batches along both axes), and the
train step jitted with them."""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH = P(AXES)  # the batch dimension is split over every device


def mesh_shape(data, fsdp, num_devices):
    """(data, fsdp) sizes with at most one -1 meaning "the rest"; errors name the device count."""
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of data, fsdp may be -1")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if known < 1 or num_devices % known:
            raise ValueError(f"mesh: {known} does not divide the {num_devices} devices")
        rest = num_devices // known
        data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
    if data * fsdp != num_devices:
        raise ValueError(f"mesh: data x fsdp = {data} x {fsdp} != {num_devices} devices")
    return data, fsdp


def make_mesh(data=-1, fsdp=1, devices=None):
    """Mesh over `devices` (default all, every process) with axes ("data", "fsdp")."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(data, fsdp, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def param_spec(shape, fsdp_size, min_size):
    """PartitionSpec of one array: its largest dim divisible by fsdp_size goes on "fsdp" (last wins
    a tie), when the array has >= min_size elements and fsdp_size > 1; else replicated."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    fits = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not fits:
        return P()
    _, axis = max(fits)
    return P(*(None,) * axis, "fsdp")


def tree_shardings(tree, mesh, min_size):
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs by the param_spec rule."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp, min_size)), tree)


def batch_sharding(mesh):
    """Sharding of a batch array: leading dim over all devices."""
    return NamedSharding(mesh, BATCH)


def global_batch(local_batch, mesh):
    """Process-local numpy batch {name: [b, ...]} -> global jax arrays {name: [b * processes, ...]}."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def compile_step(train_step, mesh, state_shardings, frozen_shardings):
    """jit with explicit shardings: state (donated) and frozen params by the rules, batch over all devices."""
    batch = NamedSharding(mesh, BATCH)
    return jax.jit(train_step, in_shardings=(state_shardings, frozen_shardings, batch),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
