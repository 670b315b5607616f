"""Retrain the bundled demo model from scratch: tokenizer, autoencoder, then U-Net + text tower.

    python scripts/build_demo.py --workdir /tmp/sdjax_demo [--out sdjax/demo/model]

Every stage resumes where it stopped (train.py resumes from its workdir; finished stages are skipped).
"""
import argparse
import os
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def captions(n=20000, seed=0):
    """Captions of n training scenes (the tokenizer's corpus)."""
    from sdjax.data import synthetic_shapes as shapes
    rng = np.random.default_rng(seed)
    return [shapes.caption(shapes.sample_spec(rng, "train")) for _ in range(n)]


def train(config, workdir, export_dir, *overrides):
    """Run train.py (resuming from workdir) and export a diffusers folder."""
    if os.path.isdir(export_dir):
        return
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={os.path.join(ROOT, config)}",
           f"--workdir={workdir}", f"--export_dir={export_dir}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def latent_scale(vae_folder, data_config, tokenizer_dir, n=512):
    """1 / std of the trained autoencoder's latent means over n training images (SD's 0.18215 is this)."""
    import jax
    from sdjax.data.input_pipeline import make_iterator
    from sdjax.models.autoencoder import AutoencoderKL
    from sdjax.text.tokenizer import load_tokenizer
    from sdjax.weights.diffusers import load_component
    vae, params = load_component(vae_folder, "vae")
    batches = make_iterator(data_config, load_tokenizer(tokenizer_dir), 64, seed=0)
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode).mean)
    z = np.concatenate([np.asarray(encode(params, next(batches)["images"])) for _ in range(n // 64)])
    return float(1.0 / z.std())


def assemble_init(workdir, tokenizer_dir, vae_export, scale):
    """The LDM stage's starting folder: trained VAE (with its latent scale), random U-Net and text tower."""
    import jax
    from configs.models import demo
    from sdjax.models import registry
    from sdjax.weights.diffusers import load_component, save_folder
    from sdjax.text.tokenizer import load_tokenizer
    out = os.path.join(workdir, "init")
    vocab = len(load_tokenizer(tokenizer_dir))
    cfg = demo.get_config(vocab_size=vocab).to_dict()
    vae, vae_params = load_component(vae_export, "vae")
    modules = {"vae": vae.clone(scaling_factor=scale)}
    params = {"vae": vae_params}
    for i, kind in enumerate(("unet", "text_encoder")):
        modules[kind] = registry.build(kind, cfg[kind])
        params[kind] = registry.init_params(kind, modules[kind], jax.random.key(100 + i))
    save_folder(out, modules, jax.device_get(params), cfg["scheduler"], tokenizer_dir=tokenizer_dir)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/sdjax_demo")
    p.add_argument("--out", default=os.path.join(ROOT, "sdjax", "demo", "model"))
    p.add_argument("--vocab-size", type=int, default=640)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--ldm-steps", type=int, default=None)
    a = p.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    tok = os.path.join(a.workdir, "tokenizer")
    if not os.path.isdir(tok):
        from sdjax.text.bpe import train_tokenizer
        train_tokenizer(captions(), tok, vocab_size=a.vocab_size)
    data_dir = f"--config.data.data_dir={os.path.join(a.workdir, 'tfds')}"
    steps = lambda n: [f"--config.total_steps={n}"] if n else []  # noqa: E731
    vae_export = os.path.join(a.workdir, "vae_export")
    train("configs/train/demo_vae.py", os.path.join(a.workdir, "vae"), vae_export, data_dir, *steps(a.vae_steps))
    init = os.path.join(a.workdir, "init")
    if not os.path.isdir(init):
        from configs.train import demo_vae
        data = demo_vae.get_config().data
        data.data_dir = os.path.join(a.workdir, "tfds")
        scale = latent_scale(vae_export, data, tok)
        print(f"latent scaling factor {scale:.5f}", flush=True)
        assemble_init(a.workdir, tok, vae_export, scale)
    ldm_export = os.path.join(a.workdir, "ldm_export")
    train("configs/train/demo_ldm.py", os.path.join(a.workdir, "ldm"), ldm_export, data_dir,
          f"--config.pretrained={init}", *steps(a.ldm_steps))
    if os.path.abspath(a.out) != os.path.abspath(ldm_export):
        shutil.rmtree(a.out, ignore_errors=True)
        shutil.copytree(ldm_export, a.out)
    print(f"demo model written to {a.out}")


if __name__ == "__main__":
    main()
