"""Multi-process plumbing: joining the cluster, noticing a lost process, and host values every process must
agree on."""
import base64
import contextlib
import json
import logging
import os
import sys
import threading
import time

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # its client: the coordination service's key-value store
from jax.experimental import multihost_utils


# Variables a multi-process launch sets, with the process count: SLURM, Open MPI / PMI (mpirun, Kubernetes
# MPI jobs), and the worker list of a multi-host Cloud TPU slice.
_CLUSTER_SIZE = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def in_cluster(environ=os.environ):
    """Whether this process is one of several that a cluster launcher started (jax.distributed can find them)."""
    sizes = [environ.get(k, "") for k in _CLUSTER_SIZE]
    return any(s.isdigit() and int(s) > 1 for s in sizes) or "," in environ.get("TPU_WORKER_HOSTNAMES", "")


HEARTBEAT_S = 30  # a process silent this long (jax's coordination-service heartbeats) is taken as lost
_LEFT = "sdjax/left/"  # key-value directory: process -> "ok" or the error it stopped with


@contextlib.contextmanager
def joined(coordinator, num_processes, process_id, heartbeat_s=None):
    """The body runs joined to the other processes: with a coordinator address as given; on a SLURM / MPI
    cluster or a multi-host TPU slice, by jax.distributed.initialize() with no arguments (JAX reads the
    cluster's environment); otherwise this is the only process.

    With several, a lost one (killed, crashed, its host down: no heartbeat for heartbeat_s, default
    HEARTBEAT_S) ends this process within about heartbeat_s + 1 s with a message naming it, whatever it waits
    in (a collective with a dead peer may wait forever, or fail naming no one); so does one that stopped with
    an error. jax runs in its recoverable mode for this (its own answer to a lost process is an abort that
    names a "task"); process 0 hosts the coordination service, so its loss is jax's abort still, at once.
    """
    if not (coordinator or in_cluster()):
        yield
        return
    heartbeat_s = heartbeat_s or HEARTBEAT_S
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_s)
    logging.getLogger("sdjax").info("process %d of %d", jax.process_index(), jax.process_count())
    watchdog = _Watchdog(heartbeat_s)
    try:
        yield
    except BaseException as e:
        # the error may be a peer's death seen first (a collective failed): wait for the verdict on the peers
        watchdog.leave(_first_line(e), wait_s=heartbeat_s + 5)
        raise
    watchdog.leave("ok", wait_s=None)


def _first_line(e):
    text = str(e.code if isinstance(e, SystemExit) else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Watchdog:
    """A thread that asks jax's coordination service every second which processes are alive (its heartbeats
    run apart from Python, so a long compile, step or save is no silence) and which have left, and how.

    A process gone without leaving is lost: this one exits(1) with a message naming it (os._exit: the main
    thread may be stuck in a collective). One that left with an error stops this one too, heartbeat_s later."""

    def __init__(self, heartbeat_s):
        self.client, self.heartbeat_s = jax_distributed.global_state.client, heartbeat_s
        self.me, self.count = jax.process_index(), jax.process_count()
        self.left, self.live, self.leaving = {}, set(range(self.count)), False
        self.update, self.stopped = threading.Condition(), threading.Event()
        self.thread = threading.Thread(target=self._run, name="sdjax-watchdog", daemon=True)
        self.thread.start()

    def _run(self):
        everyone, failed_since = list(range(self.count)), None
        while not self.stopped.is_set():
            try:  # (a barrier of the live processes' watchdogs: answered once each has asked or is gone)
                live = set(self.client.get_live_nodes(everyone))
                left = {int(k.rsplit("/", 1)[1]): v for k, v in self.client.key_value_dir_get(_LEFT)}
            except Exception:  # noqa: BLE001 (the coordination service, in process 0, is gone)
                self._exit(f"process 0 of {self.count} (the coordinator) stopped responding; {self._RESTART}")
            lost = [p for p in everyone if p not in live and p not in left]
            failed = [p for p, how in left.items() if how != "ok" and p != self.me]
            if lost:
                self._exit(f"process {lost[0]} of {self.count} stopped responding (no heartbeat for "
                           f"{self.heartbeat_s} s: killed, crashed or its host is down); {self._RESTART}")
            # (a lost process, found within heartbeat_s, may be what failed the other: it is named first)
            failed_since = (failed_since or time.monotonic()) if failed else None
            if failed and not self.leaving and time.monotonic() - failed_since > self.heartbeat_s:
                self.client.key_value_set(f"{_LEFT}{self.me}", f"stopped: process {failed[0]} did", True)
                self._exit(f"process {failed[0]} of {self.count} stopped with an error ({left[failed[0]]}); "
                           "stopping this one too.")
            with self.update:
                self.left, self.live = left, live
                self.update.notify_all()
            self.stopped.wait(1.0)

    _RESTART = "stopping this one too. Restart all processes to resume from the last checkpoint."

    @staticmethod
    def _exit(message):
        os.write(2, f"{os.path.basename(sys.argv[0])}: {message}\n".encode())
        os._exit(1)

    def leave(self, how, wait_s):
        """Say how this process ends ("ok" or its error). With an error, first wait up to wait_s until every
        other process has left too or this thread has exited naming a lost one. Process 0 then waits until
        the others have disconnected (its coordination service ends with it), the others disconnect."""
        self.leaving = True
        self.client.key_value_set(f"{_LEFT}{self.me}", how, True)
        peers = set(range(self.count)) - {self.me}
        with self.update:
            if how != "ok":
                self.update.wait_for(lambda: peers <= set(self.left), timeout=wait_s)
            if self.me == 0:
                self.update.wait_for(lambda: not self.live & peers, timeout=wait_s)
        self.stopped.set()
        self.thread.join()
        if self.me != 0:
            jax.distributed.shutdown()


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

