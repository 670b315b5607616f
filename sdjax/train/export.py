"""From a run's workdir to weights: the trained params pytree, a diffusers folder for `sample.py --model`, a
textual-inversion run's embedding file for `sample.py --embedding`, or a LoRA run's LoRA file (`export_lora`) for
`sample.py --lora` (and diffusers, A1111, ComfyUI).

An export is written whole into a fresh sibling of its folder (file) and renamed into place: an interrupted export
leaves the folder as it was, and a new one leaves no file of the old (an old `*.fp16.safetensors` would be
loaded by `variant="fp16"`). Each export holds MARKER (a file: in its safetensors header); a non-empty folder or a file without it is replaced only when asked (overwrite), and never
one that is or is in the run's pretrained weights or its checkpoints.
"""
import json
import os
import shutil
import uuid

import jax
import safetensors
from safetensors.numpy import save_file

from sdjax.train.checkpoint import Checkpointer, checkpoint_dir
from sdjax.train.ldm import ldm_stage, lora_params, textual_inversion
from sdjax.train.run_config import read_config
from sdjax.train.stages import stage_for
from sdjax.weights import lora_files
from sdjax.weights.embedding_files import embedding_files

MARKER = "sdjax_export.json"


def load_params(workdir, step=None, ema=True):
    """{component: params} of the trained parts at `step` (default latest), EMA or raw, on one device."""
    ckpt = Checkpointer(workdir, read_only=True)
    try:
        return ckpt.restore_item("ema_params" if ema else "params", step)
    finally:
        ckpt.close()


def _overlap(a, b):
    """Whether real paths a and b are one another or one holds the other."""
    return os.path.commonpath([a, b]) in (a, b)


def _check_overlap(what, out_dir, config, workdir):
    """ValueError unless `out_dir` keeps clear of the run's `pretrained` weights and checkpoints."""
    out = os.path.realpath(out_dir)
    for name, path in (("pretrained weights", config.get("pretrained")), ("checkpoints", checkpoint_dir(workdir))):
        if path and _overlap(out, os.path.realpath(path)):
            raise ValueError(f"{what} {out_dir}: it overlaps the run's {name} {path}; export elsewhere")


def check_export_dir(out_dir, config, workdir, overwrite=False):
    """ValueError unless an export of the run in `workdir` (its `config`) may write `out_dir`: not the run's
    `pretrained` weights or checkpoints (nor a folder holding them or inside them); when it exists, a folder,
    empty or an earlier export (MARKER), or any folder with overwrite."""
    _check_overlap("export folder", out_dir, config, workdir)
    out = os.path.realpath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"export folder {out_dir}: a file is there, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite and not os.path.isfile(os.path.join(out, MARKER)):
        raise ValueError(f"export folder {out_dir} is not empty and holds no earlier export ({MARKER}): choose "
                         "another, or replace it with --overwrite (export(..., overwrite=True))")


def _write_in_place(out_dir, write):
    """write(folder) into a fresh sibling of out_dir (same parent: the renames are atomic), then renamed into
    out_dir's place; on an error out_dir stays as it was and the sibling goes."""
    out = os.path.realpath(out_dir)
    parent, name = os.path.split(out)
    tag = uuid.uuid4().hex[:8]
    new, old = os.path.join(parent, f".{name}.partial-{tag}"), os.path.join(parent, f".{name}.old-{tag}")
    os.makedirs(new)
    try:
        write(new)
        if os.path.isdir(out):
            os.rename(out, old)
        os.rename(new, out)
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(out):
            os.rename(old, out)
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(workdir, out_dir, step=None, ema=True, overwrite=False):
    """Write a diffusers folder with the trained params (+ the frozen ones rebuilt from the config):
    the whole model for the LDM stage, out_dir/vae for the autoencoder stage; it replaces out_dir whole
    (`check_export_dir` says which may be replaced). With several processes every one must call it (the
    checkpoint restore is collective); process 0 writes. Returns out_dir."""
    config = read_config(workdir)
    check_export_dir(out_dir, config, workdir, overwrite)
    params = jax.device_get(load_params(workdir, step, ema))
    if jax.process_index() == 0:
        def write(folder):
            stage_for(config).export(config, params, folder)
            with open(os.path.join(folder, MARKER), "w") as f:
                json.dump({"workdir": os.path.abspath(workdir), "step": step, "ema": ema}, f)
        _write_in_place(out_dir, write)
    return out_dir


def _exported_file(path):
    """Whether the file at `path` is an earlier export: a safetensors file whose header holds MARKER."""
    try:
        with safetensors.safe_open(path, "np") as f:
            return MARKER in (f.metadata() or {})
    except (OSError, safetensors.SafetensorError):
        return False


def _check_file(what, path, config, workdir, overwrite):
    """ValueError unless an export may write the .safetensors file `path`: in an existing folder, not in the run's
    pretrained weights or checkpoints; when it exists, an earlier export (MARKER in its header), or any with
    overwrite."""
    if not path.endswith(".safetensors"):
        raise ValueError(f"{what} {path}: a .safetensors file is written; name one")
    _check_overlap(what, path, config, workdir)
    if os.path.isdir(path):
        raise ValueError(f"{what} {path}: a folder is there; name a file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ValueError(f"{what} {path}: no folder {os.path.dirname(os.path.abspath(path))}")
    if os.path.exists(path) and not overwrite and not _exported_file(path):
        raise ValueError(f"{what} {path}: the file exists and is no earlier export ({MARKER} in its header): choose "
                         "another, or replace it with --overwrite")


def _write_file(tensors, path, header, workdir, step, ema):
    """Write a .safetensors file whole or not at all (a sibling renamed into place), MARKER in its header."""
    header = {**header, MARKER: json.dumps({"workdir": os.path.abspath(workdir), "step": step, "ema": ema})}
    partial = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        save_file(tensors, partial, metadata=header)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def check_embedding_export(path, config, workdir, overwrite=False):
    """ValueError unless the textual-inversion run in `workdir` (its `config`) may write its embedding to `path`
    (_check_file)."""
    if not textual_inversion.enabled(config):
        raise ValueError(f"--export_embedding {path}: the run trains no embedding (set textual_inversion.placeholder)")
    _check_file("--export_embedding", path, config, workdir, overwrite)


def export_embedding(workdir, path, fmt="a1111", step=None, ema=True, overwrite=False):
    """Write the embedding a textual-inversion run learned to `path` in `fmt` (embedding_files.FORMATS; SDXL in
    diffusers': also the second tower's file, `_2` before the extension), each file replaced whole or not at all
    (`check_embedding_export` says which may be). Every process calls it; process 0 writes. Returns the paths."""
    config = read_config(workdir)
    check_embedding_export(path, config, workdir, overwrite)
    vectors = jax.device_get(load_params(workdir, step, ema))[textual_inversion.COMPONENT]
    root, ext = os.path.splitext(path)
    files = {root + suffix + ext: tensors for suffix, tensors in
             embedding_files(vectors, config.textual_inversion.placeholder, fmt).items()}
    for target in files:
        check_embedding_export(target, config, workdir, overwrite)
    for target, tensors in files.items() if jax.process_index() == 0 else ():
        _write_file(tensors, target, {}, workdir, step, ema)
    return list(files)


def check_lora_file(path, config, workdir, fmt="diffusers", overwrite=False):
    """ValueError unless the LoRA of the run in `workdir` (its `config`) may be written to `path` in `fmt`
    (_check_file)."""
    what = "LoRA export"
    if not lora_params.enabled(config):
        raise ValueError(f"{what} {path}: the run trains no LoRA (its config has no `lora` section); export the "
                         "model with --export_dir")
    if fmt not in lora_files.WRITE_FORMATS:
        raise ValueError(f"{what} {path}: the format must be one of {lora_files.WRITE_FORMATS}, got {fmt!r}")
    _check_file(what, path, config, workdir, overwrite)


def export_lora(workdir, path, fmt="diffusers", step=None, ema=True, overwrite=False):
    """Write the LoRA of the run in `workdir` (its adapters at `step`, default the latest, EMA or raw) to the
    .safetensors file `path` as `fmt` writes it ("diffusers": PEFT's names, its config in the header; "kohya": A1111's
    and ComfyUI's), whole or not at all (`check_lora_file` says what may be replaced). With several processes every
    one must call it; process 0 writes. Returns path."""
    config = read_config(workdir)
    check_lora_file(path, config, workdir, fmt, overwrite)
    adapters = jax.device_get(load_params(workdir, step, ema))["lora"]
    if jax.process_index() == 0:
        tensors, header = ldm_stage.lora_file(config, adapters, fmt)
        _write_file(tensors, path, header, workdir, step, ema)
    return path
