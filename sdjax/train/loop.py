"""The training loop: wire config, models, data, state, step, checkpoints and logs together; resume, stop cleanly."""
import dataclasses
import logging
import queue
import signal
import threading
import time

import jax
from jax.experimental import multihost_utils

from sdjax.models import attention
from sdjax.text.tokenizer import batch_tokenizers
from sdjax.train import config as config_lib, distributed, run_config
from sdjax.train.ldm import lora_params
from sdjax.train.checkpoint import Checkpointer
from sdjax.train.ldm import dreambooth, periodic_eval
from sdjax.train.ldm.textual_inversion import caption_tokenizers, model_params
from sdjax.train.metrics_log import MetricsLogger
from sdjax.train.sharding import compile_step, global_batch, make_mesh, tree_shardings
from sdjax.train.stages import stage_for
from sdjax.train.state import create_state

log = logging.getLogger("sdjax.train")


class TrainingDiverged(RuntimeError):
    """Loss or gradients were not finite for max_bad_steps steps in a row."""


def pipeline_iterator(config, tokenizers, batch_size, seed, process_index, process_count):
    """The real input pipeline (sdjax.data): a checkpointable iterator of this process's batches."""
    from sdjax.data.input_pipeline import make_iterator, prepare
    from sdjax.data.shards import SOURCES as STREAMED
    if process_count > 1 and config.data.source not in ("cache", *STREAMED):  # build it once, then all read it
        if process_index == 0:
            prepare(config.data)
        multihost_utils.sync_global_devices("sdjax data prepared")
    return make_iterator(config.data, tokenizers, batch_size, seed, process_index, process_count)


def check_data(data_config):
    """ValueError / FileNotFoundError for a bad `config.data` (e.g. a missing folder), before anything slow."""
    from sdjax.data import captions, input_pipeline, shards
    cfg = input_pipeline.resolve_config(data_config)
    if cfg.source == "cache":
        from sdjax.data import cache
        cache.CacheSource(cfg.path)  # (its manifest)
    elif cfg.source in shards.SOURCES:
        shards.list_shards(cfg.path, cfg.source)
    elif cfg.source != "shapes":
        captions.captions_config(cfg.path, cfg.source)


@dataclasses.dataclass
class Run:
    """Everything set up for training: the compiled step and what it runs on."""
    config: object
    pretrained: object
    mesh: object
    state: object
    frozen: dict
    step_fn: object
    data: object
    checkpointer: Checkpointer
    config_changes: dict  # {field: (old, new)}: changes to what defines the run that --allow_config_change let through


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


@dataclasses.dataclass
class StepPlan:
    """The train step and its layout, from shapes alone (what setup and the memory estimate share)."""
    init: object          # trainable params -> fresh TrainState
    abstract: object      # the TrainState as ShapeDtypeStructs
    state_sharding: object
    frozen_sharding: object
    step_fn: object       # jitted train_step(state, frozen, batch) with those shardings, state donated


def plan_step(stage, config, pre, mesh):
    """StepPlan for `pre` (params may be arrays or ShapeDtypeStructs) on `mesh`."""
    names = stage.trainable_names(config)
    trainable = {k: v for k, v in pre.params.items() if k in names}
    frozen = {k: v for k, v in pre.params.items() if k not in names}
    tx, schedule = stage.make_optimizer(config)
    init = lambda p: create_state(p, tx, config.seed)  # noqa: E731
    abstract = jax.eval_shape(init, trainable)
    state_sh = tree_shardings(abstract, mesh, config.mesh.min_shard_size)
    frozen_sh = tree_shardings(frozen, mesh, config.mesh.min_shard_size)
    step = attention.scoped(stage.make_train_step(pre, config, tx, schedule, mesh), config.get("attention", "auto"),
                            mesh)
    return StepPlan(init, abstract, state_sh, frozen_sh, compile_step(step, mesh, state_sh, frozen_sh))


def setup(config, workdir, make_data=pipeline_iterator, devices=None, pretrained=None, allow_config_change=False):
    """Build models, mesh, state (restored from the latest checkpoint in workdir if any) and the jitted step.

    pretrained: a Pretrained to train instead of what the config names (tests use toy models).
    allow_config_change: resume even with changes to what defines the run (sdjax.train.run_config).
    """
    stage = stage_for(config)
    stage.check(config)
    changed, pending = run_config.check_resume(config, workdir, allow_config_change)  # before anything slow
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    pindex, pcount = jax.process_index(), jax.process_count()
    config_lib.check_batch(config, mesh.size, pcount)
    if make_data is pipeline_iterator:  # tests' fake data have no data config to check
        check_data(config.data)
    pre = pretrained or stage.load(config)
    if config.get("data", {}).get("source") == "cache":
        from sdjax.train.ldm import cache
        cache.check(config.data.path, pre, config)
    config = stage.resolve(config, pre)
    changed.update(run_config.check_resume(config, workdir, allow_config_change, pending)[0])
    if pindex == 0:
        run_config.save_config(config, workdir)
    pre = dataclasses.replace(pre, params=jax.device_get(pre.params))
    plan = plan_step(stage, config, pre, mesh)
    names = stage.trainable_names(config)
    frozen = jax.device_put({k: v for k, v in pre.params.items() if k not in names}, plan.frozen_sharding)
    if dreambooth.enabled(config):  # its instance and class images (generated here when missing)
        make_data = dreambooth.data_maker(config, pre, workdir)
    data = make_data(config, caption_tokenizers(config, batch_tokenizers(pre)), config.batch_size // pcount,
                     config.seed, pindex, pcount)
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    if ckpt.latest_step() is None:
        trainable = {k: v for k, v in pre.params.items() if k in names}
        state = jax.jit(plan.init, out_shardings=plan.state_sharding)(
            jax.device_put(trainable, plan.state_sharding.params))
    else:
        state, data_states = ckpt.restore_newest(_with_shardings(plan.abstract, plan.state_sharding))
        log.info("resumed from %s at step %d", workdir, int(jax.device_get(state.step)))
        if data_states["process_count"] == pcount:
            data.set_state(data_states["states"][pindex])
        elif hasattr(data, "continue_from"):  # the pipeline's: the old processes' unread examples come next
            log.info("checkpoint written by %d processes, this run has %d: the data is re-split where they stopped",
                     data_states["process_count"], pcount)
            data.continue_from(data_states["states"])
        else:
            log.warning("checkpoint was written by %d processes, this run has %d: the data order restarts",
                        data_states["process_count"], pcount)
    return Run(config, pre, mesh, state, frozen, plan.step_fn, data, ckpt, changed)


def save(run, data_state):
    """Checkpoint the state and every process's data iterator position after the last step (all processes
    must call)."""
    states = distributed.gather_json(data_state)
    run.checkpointer.save(run.state, {"process_count": jax.process_count(), "states": states})


_NOT_AVERAGED = ("finite", "bad_steps", "total_bad_steps", "learning_rate")


class _Window:
    """Running means of the metrics between two log lines, plus throughput."""

    def __init__(self):
        self.sums, self.count, self.t0 = {}, 0, time.perf_counter()

    def add(self, metrics):
        if metrics["finite"]:
            for k in (k for k in metrics if k not in _NOT_AVERAGED):  # loss, grad_norm (+ a stage's own)
                self.sums[k] = self.sums.get(k, 0.0) + float(metrics[k])
            self.count += 1

    def summary(self, steps, batch_size):
        dt = time.perf_counter() - self.t0
        out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        out.update(steps_per_s=steps / dt, images_per_s=steps * batch_size / dt)
        return out


def sampled_params(run):
    """The models' params of the run's frozen and current EMA params (textual inversion: its rows in the tables; LoRA:
    the adapters merged)."""
    params = model_params(run.config, run.pretrained, {**run.frozen, **run.state.ema_params})
    return lora_params.model_params(run.config, params)


def sample_images(pipe, run, step, logger):
    """Generate the config's sample prompts with the current EMA params, as they are sharded over the run's mesh
    (no gathered copy), and log them. Every process takes part; process 0 logs."""
    pipe.params = sampled_params(run)
    c = run.config.sample
    images = pipe.generate(list(c.prompts), num_steps=c.num_steps, guidance_scale=c.guidance_scale,
                           seed=c.seed, progress=False)
    logger.images(step, images, tuple(c.prompts))


class _Prefetch:
    """The next batches read, assembled and put on the devices by a thread while the current step runs.

    Each item carries the data iterator's state after its batch: what a checkpoint taken after that step
    records (the thread has read further)."""

    def __init__(self, data, mesh, depth=2):
        self.data, self.mesh = data, mesh
        self.items, self.done = queue.Queue(depth), threading.Event()
        self.thread = threading.Thread(target=self._fill, name="sdjax-prefetch", daemon=True)
        self.thread.start()

    def _fill(self):
        try:
            while not self.done.is_set():
                item = (global_batch(next(self.data), self.mesh), self.data.get_state(),
                        getattr(self.data, "skipped", 0))
                while not self.done.is_set():
                    try:
                        self.items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # noqa: BLE001 (handed to the loop, which raises it)
            self.items.put(e)

    def next(self):
        """(global batch, data state after it, examples skipped so far)."""
        item = self.items.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.done.set()
        while self.thread.is_alive():
            try:
                self.items.get(timeout=0.1)
            except queue.Empty:
                pass
        self.thread.join()


def _preempted(term, step):
    """Whether to save and stop: SIGTERM seen here (one process), or, with several, at a step all processes
    agree on (jax's preemption sync point; no collective on other steps)."""
    if jax.process_count() == 1:
        return term["seen"]
    try:
        return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # jax_enable_preemption_service off: no preemption handling
        return False


def train(config, workdir, make_data=pipeline_iterator, devices=None, pretrained=None, allow_config_change=False):
    """Train to config.total_steps, resuming from workdir; returns the final TrainState.

    The host never waits for the device between steps: the next batch is prepared on a thread while the
    step runs, and metrics stay on the device until a log or checkpoint step fetches them. Checkpoints
    every checkpoint_every steps and at the end; SIGTERM saves and returns early; max_bad_steps
    non-finite steps in a row raise TrainingDiverged at the next log or checkpoint step (the guarded
    update leaves the state as it was meanwhile; the last checkpoint is kept). allow_config_change: see setup;
    the changes it let through are a row of metrics.jsonl.
    """
    run = setup(config, workdir, make_data, devices, pretrained, allow_config_change)
    config = run.config
    logger = MetricsLogger(workdir, enabled=jax.process_index() == 0)
    if run.config_changes:
        logger.record(int(jax.device_get(run.state.step)), config_change=run.config_changes)
    sampling = bool(config.get("sample")) and config.sample.every > 0
    pipe = evaluator = None
    if sampling or periodic_eval.enabled(config):
        from sdjax.pipeline import StableDiffusion
        pipe = StableDiffusion(dataclasses.replace(run.pretrained, params=sampled_params(run)), run.mesh)
    if periodic_eval.enabled(config):  # its captions read and scoring networks loaded once
        evaluator = periodic_eval.Evaluator(config.eval, run.mesh)
    term = {"seen": False}
    single = jax.process_count() == 1  # several processes: jax's preemption notifier handles SIGTERM
    previous = signal.signal(signal.SIGTERM, lambda *_: term.update(seen=True)) if single else None
    step, window = int(jax.device_get(run.state.step)), _Window()
    last_log, pending, data_state, skipped = step, [], run.data.get_state(), 0
    batches = _Prefetch(run.data, run.mesh)

    def flush():
        """Fetch the pending steps' metrics (one transfer), check them in order; the last step's metrics."""
        fetched = jax.device_get(pending)
        first = step - len(pending) + 1
        for i, metrics in enumerate(fetched):
            window.add(metrics)
            if metrics["bad_steps"] >= config.max_bad_steps:
                at = first + i
                raise TrainingDiverged(
                    f"loss or gradients were NaN/inf for {int(metrics['bad_steps'])} steps in a row "
                    f"(steps {at - int(metrics['bad_steps']) + 1}..{at}); stopped without saving. "
                    f"Last checkpoint: step {run.checkpointer.latest_step()} in {workdir}")
        pending.clear()
        return fetched[-1]

    try:
        while step < config.total_steps:
            batch, next_state, next_skipped = batches.next()
            run.state, metrics = run.step_fn(run.state, run.frozen, batch)
            step += 1
            data_state, skipped = next_state, next_skipped
            pending.append(metrics)
            log_now = step % config.log_every == 0 or step == config.total_steps
            checkpoint_now = step % config.checkpoint_every == 0 or step == config.total_steps
            stop = _preempted(term, step)
            last = flush() if log_now or checkpoint_now or stop else None
            if log_now:
                logger.write(step, {**window.summary(step - last_log, config.batch_size),
                                    "learning_rate": last["learning_rate"],
                                    "examples_seen": step * config.batch_size,
                                    "bad_steps_total": last["total_bad_steps"], "data_skipped": skipped})
                window, last_log = _Window(), step
            # Scheduled saves skip non-finite steps, so a bad streak never rotates out good checkpoints.
            if (checkpoint_now and (last["finite"] or step == config.total_steps)) or stop:
                save(run, data_state)
            if sampling and step % config.sample.every == 0:
                sample_images(pipe, run, step, logger)
            if evaluator and step % config.eval.every == 0:  # the EMA params, as sampled
                pipe.params = sampled_params(run)
                logger.write(step, evaluator(pipe))
            if stop:
                log.warning("SIGTERM: saved step %d, stopping", step)
                break
    finally:
        batches.close()
        if single:
            signal.signal(signal.SIGTERM, previous)
        logger.close()
        run.checkpointer.close()  # waits for the last save: OSError if its write failed
    return run.state
