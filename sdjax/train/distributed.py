"""Multi-process plumbing: joining the cluster, and host values every process must agree on."""
import base64
import json
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils


# Variables a multi-process launch sets, with the process count: SLURM, Open MPI / PMI (mpirun, Kubernetes
# MPI jobs), and the worker list of a multi-host Cloud TPU slice.
_CLUSTER_SIZE = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def in_cluster(environ=os.environ):
    """Whether this process is one of several that a cluster launcher started (jax.distributed can find them)."""
    sizes = [environ.get(k, "") for k in _CLUSTER_SIZE]
    return any(s.isdigit() and int(s) > 1 for s in sizes) or "," in environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(coordinator, num_processes, process_id):
    """Join the other processes: with a coordinator address as given; on a SLURM / MPI cluster or a multi-host
    TPU slice, by jax.distributed.initialize() with no arguments (JAX reads the cluster's environment);
    otherwise this is the only process."""
    if coordinator:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif in_cluster():
        jax.distributed.initialize()
    else:
        return
    logging.getLogger("sdjax").info("process %d of %d", jax.process_index(), jax.process_count())


def _jsonable(obj):
    """bytes (e.g. a grain iterator state) are stored as {"__bytes__": base64}."""
    return {"__bytes__": base64.b64encode(obj).decode()} if isinstance(obj, bytes) else obj


def _from_jsonable(obj):
    return base64.b64decode(obj["__bytes__"]) if isinstance(obj, dict) and "__bytes__" in obj else obj


def gather_json(obj):
    """[obj of process 0, obj of process 1, ...] on every process; obj: JSON-able or bytes."""
    text = json.dumps(_jsonable(obj)).encode()
    if jax.process_count() == 1:
        return [_from_jsonable(json.loads(text))]
    lengths = multihost_utils.process_allgather(np.asarray([len(text)], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[:len(text)] = np.frombuffer(text, np.uint8)
    rows = multihost_utils.process_allgather(padded)
    return [_from_jsonable(json.loads(bytes(r[:int(n)]).decode())) for r, n in zip(rows, np.ravel(lengths))]

