"""A lost process (issue 30, item 10): two train.py processes on 127.0.0.1 (gloo); kill -9 one mid-run, the other
stops by itself within 60 s naming it; both restarted, the run resumes from the last checkpoint and finishes."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.long_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 10
OVERRIDES = ("model.vae.sample_size=16", "model.unet.sample_size=8", "data.image_size=16", "batch_size=4",
             "total_steps=6", "log_every=1", "checkpoint_every=2", "optimizer.warmup_steps=2",
             "data.shapes.num_train=64", "data.shapes.num_test=8", "data.shapes.num_heldout=8")


def start_both(workdir, tmp_path):
    """train.py as processes 0 and 1 of a 2-process run on a free port; Popen objects, output in files."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # the restart loads the programs
    args = [sys.executable, "train.py", "--config=configs/train/tiny.py", f"--workdir={workdir}",
            f"--config.data.data_dir={tmp_path / 'tfds'}", *[f"--config.{o}" for o in OVERRIDES],
            "--cpu_collectives=gloo", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
            f"--heartbeat_timeout={HEARTBEAT_S}"]
    runs = len(list(tmp_path.glob("out*")))
    return [subprocess.Popen([*args, f"--process_id={i}"], cwd=ROOT, env=env, stderr=subprocess.STDOUT,
                             stdout=open(tmp_path / f"out{runs + i}.txt", "w")) for i in range(2)]


def logged(workdir):
    """[(step, loss)] of metrics.jsonl in the order written (a resumed run appends)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def checkpoints(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def test_a_lost_process_stops_the_other_and_both_resume(tmp_path):
    """Before: process 0 waited until jax's shutdown barrier failed (80 s here, heartbeat 100 s) and aborted
    (SIGABRT) with jax's text. Process 1 is killed once step 3 is logged and a checkpoint written."""
    workdir = tmp_path / "run"
    procs = start_both(workdir, tmp_path)
    try:
        deadline = time.time() + 600
        while not (checkpoints(workdir) and logged(workdir) and logged(workdir)[-1][0] >= 3):
            assert time.time() < deadline and all(p.poll() is None for p in procs), (tmp_path / "out0.txt").read_text()
            time.sleep(0.1)
        procs[1].kill()
        killed = time.time()
        rc = procs[0].wait(timeout=120)
        took = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    out = (tmp_path / "out0.txt").read_text()
    print(f"process 0 stopped {took:.1f} s after process 1 was killed (heartbeat timeout {HEARTBEAT_S} s)")
    assert rc == 1 and took < 60, (rc, took, out[-3000:])
    assert "train.py: process 1 of 2 stopped responding" in out, out[-3000:]

    first = logged(workdir)
    resumed_from = checkpoints(workdir)[-1]
    assert resumed_from < first[-1][0] < 6  # the restart runs a logged step again (compared below) and ends at 6
    procs = start_both(workdir, tmp_path)
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, (tmp_path / f"out{2 + i}.txt").read_text()[-3000:]
    assert f"at step {resumed_from}" in (tmp_path / "out2.txt").read_text()
    rows = logged(workdir)
    again = dict(rows[len(first):])
    assert sorted(again) == list(range(resumed_from + 1, 7)) and checkpoints(workdir)[-1] == 6
    # the steps run twice (after the checkpoint, before the kill) have the same losses, bit for bit
    assert all(again[step] == loss for step, loss in first if step > resumed_from), (first, rows[len(first):])
