"""Fine-tuning a full-size Stable Diffusion on a TPU slice or a GPU node: `configs/train/finetune.py:MODEL,TARGET`.

    python -m sdjax.train.memory --config configs/train/finetune.py:sd15,v5e-16      # per-device memory, here
    python train.py --config configs/train/finetune.py:sd15,v5e-16 --workdir gs://bucket/run \\
        --config.pretrained=/path/to/stable-diffusion-v1-5 --config.data.source=jsonl --config.data.path=...

MODEL: sd15 (512², epsilon), sd21 (768², v-prediction) or sdxl (the SDXL base, 1024², epsilon; the
micro-conditioning from each example's size and crop); sd15_lora / sdxl_lora: a LoRA of the U-Net's attention
(rank 16; the frozen U-Net in bfloat16) instead, for the one GPU or TPU chip people have. TARGET: a row of TARGETS (the
devices jax sees there, their memory, and the per-device batch that fits it, as `sdjax.train.memory` measured: the
table in the README). Every device holds an FSDP shard of the weights, optimizer and EMA; the U-Net recomputes
activations in the backward pass (remat) and computes in bfloat16 over float32 master weights.
"""
from configs.models import sd15, sd21, sdxl
from configs.train import tiny
from sdjax.train.ldm import lora_params

# devices: what jax.devices() lists (a v5p-8 has 4 chips of 2 cores each, one device per chip);
# hbm_gib: memory per device; batch: per-device batch for each model
TARGETS = {
    "v5e-16": dict(devices=16, hbm_gib=16, batch=dict(sd15=4, sd21=2)),  # SDXL at 1024²: 18.6 GiB per example
    "v5p-8": dict(devices=4, hbm_gib=95, batch=dict(sd15=16, sd21=8, sdxl=4)),
    "h100x8": dict(devices=8, hbm_gib=80, batch=dict(sd15=16, sd21=8, sdxl=2)),
    # one GPU of 24 GB (RTX 3090 / 4090, A10G, L4); SDXL's LoRA takes 30.4 GiB at batch 1 (README): one of 48 GB
    # (L40S, RTX 6000 Ada, A6000)
    "gpu24": dict(devices=1, hbm_gib=24, batch=dict(sd15_lora=8)),
    "gpu48": dict(devices=1, hbm_gib=48, batch=dict(sdxl_lora=1)),
    "v5e-1": dict(devices=1, hbm_gib=16, batch=dict(sd15_lora=4)),  # one TPU v5e chip
}
MODELS = {"sd15": (sd15.get_config, 512), "sd21": (sd21.get_config, 768), "sdxl": (sdxl.get_config, 1024),
          "sd15_lora": (sd15.get_config, 512), "sdxl_lora": (sdxl.get_config, 1024)}


def get_config(arg="sd15,v5e-16"):
    name, target_name = arg.split(",")
    if name not in MODELS or target_name not in TARGETS:
        raise ValueError(f"finetune config: want MODEL,TARGET with MODEL in {sorted(MODELS)} and TARGET in "
                         f"{sorted(TARGETS)}, got {arg!r}")
    model, size = MODELS[name]
    target = TARGETS[target_name]
    if name not in target["batch"]:
        raise ValueError(f"finetune config: {name} does not fit {target_name} ({target['hbm_gib']} GiB per device) "
                         f"even at one example per device; use one of "
                         f"{sorted(t for t, v in TARGETS.items() if name in v['batch'])}")
    c = tiny.get_config()
    c.model = model()                # the architecture (for the memory estimate); training reads `pretrained`
    c.pretrained = ""                # the diffusers folder or single file to fine-tune (set on the command line)
    c.target = dict(name=target_name, devices=target["devices"], hbm_gib=target["hbm_gib"])
    c.data.update(source="jsonl", path="", image_size=size, random_flip=True, num_threads=16, num_workers=8)
    c.batch_size = target["batch"][name] * target["devices"]
    c.total_steps = 20000
    c.optimizer.update(learning_rate=1e-5, warmup_steps=500, schedule="constant", weight_decay=1e-2)
    c.ema_decay = 0.9999
    c.ema_warmup = True
    c.loss.update(prediction_type="", min_snr_gamma=5.0, caption_dropout=0.1, latent="sample")
    c.precision.compute_dtype = "bfloat16"
    c.remat = True
    c.mesh.update(data=1, fsdp=-1)   # weights, optimizer and EMA sharded over every device
    c.checkpoint_every = 1000
    c.log_every = 50
    c.sample.update(every=0, num_steps=30, guidance_scale=7.5,
                    prompts=("a photograph of an astronaut riding a horse", "a castle on a hill at sunset"))
    if name.endswith("_lora"):  # diffusers' LoRA scripts' settings: the attention projections, lr 1e-4
        c.lora = lora_params.default_config()
        c.lora.update(rank=16, alpha=16.0, base_dtype="bfloat16")
        c.optimizer.update(learning_rate=1e-4, warmup_steps=0)
        c.total_steps, c.checkpoint_every = 5000, 500
        c.ema_decay = 0.999
    return c
