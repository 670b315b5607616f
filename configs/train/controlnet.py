"""ControlNet training (sdjax.train.ldm.controlnet_stage): `configs/train/controlnet.py` (the tiny model, on a CPU in
seconds) or `configs/train/controlnet.py:MODEL,TARGET` (MODEL sd15 at 512² or sdxl at 1024², diffusers'
train_controlnet.py / train_controlnet_sdxl.py settings: AdamW at 1e-5 constant, no EMA; TARGET a row of TARGETS,
as `python -m sdjax.train.memory` measured it: the README's table).

    python train.py --config configs/train/controlnet.py:sd15,gpu24 --workdir runs/canny \\
        --config.pretrained=/path/to/stable-diffusion-v1-5 --config.data.path=fill50k/train.jsonl \\
        --export_dir runs/canny/controlnet

The data: (image, conditioning image, caption) examples, data.conditioning_image naming the JSONL / CSV / parquet
column of the conditioning images (webdataset: `{key}.cond.png` members; a folder: `{stem}.cond.png` beside each
image). The ControlNet starts from the base U-Net (from_unet) or from controlnet.init, a ControlNet folder.
"""
from configs.models import sd15, sdxl
from configs.train import tiny
from sdjax.train.ldm import controlnet_stage

# devices: what jax.devices() lists; hbm_gib: memory per device; batch: per-device batch for each model
TARGETS = {
    "gpu24": dict(devices=1, hbm_gib=24, batch=dict(sd15=2)),  # one GPU of 24 GB (RTX 3090 / 4090, A10G, L4)
    # sd15: 39.3 GiB per device, sdxl: 43.3 GiB (README)
    "h100x8": dict(devices=8, hbm_gib=80, batch=dict(sd15=16, sdxl=2)),
}
MODELS = {"sd15": (sd15.get_config, 512), "sdxl": (sdxl.get_config, 1024)}


def get_config(arg=""):
    c = tiny.get_config()
    c.stage = "controlnet"
    c.controlnet = controlnet_stage.default_config()
    c.controlnet.conditioning_embedding_out_channels = (8, 16)  # the tiny VAE's factor 2: one strided convolution
    c.data.update(source="jsonl", path="", image_size=32, random_flip=False, conditioning_image="conditioning_image")
    c.batch_size, c.total_steps = 4, 200
    c.loss.update(prediction_type="", min_snr_gamma=0.0, caption_dropout=0.0, latent="sample")
    c.optimizer.update(learning_rate=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-2)
    c.ema_decay = 0.0  # diffusers' scripts keep no average: the export is the trained weights
    c.checkpoint_every, c.log_every = 100, 10
    if not arg:
        return c
    name, _, target_name = arg.partition(",")
    if name not in MODELS or target_name not in TARGETS or name not in TARGETS[target_name]["batch"]:
        fits = sorted(t for t, v in TARGETS.items() if name in v["batch"])
        raise ValueError(f"controlnet config: the argument is '' (the tiny model) or MODEL,TARGET with MODEL in "
                         f"{sorted(MODELS)} and TARGET one of {fits or sorted(TARGETS)} for it, got {arg!r}")
    model, size = MODELS[name]
    target = TARGETS[target_name]
    c.model = model()  # the architecture (for the memory estimate); training reads `pretrained`
    c.controlnet = controlnet_stage.default_config()
    c.target = dict(name=target_name, devices=target["devices"], hbm_gib=target["hbm_gib"])
    c.data.update(image_size=size, num_threads=16, num_workers=8)
    c.batch_size = target["batch"][name] * target["devices"]
    c.total_steps, c.checkpoint_every, c.log_every = 20000, 1000, 50
    c.optimizer.update(learning_rate=1e-5, grad_clip_norm=1.0)
    c.precision.compute_dtype = "bfloat16"
    c.remat = True
    c.mesh.update(data=1, fsdp=-1)  # the ControlNet, its optimizer and the frozen base sharded over every device
    return c
