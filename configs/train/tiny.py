"""The tiny SD architecture (configs/models/tiny.py; `tiny.py:sdxl`: the tiny SDXL one, configs/models/tiny_xl.py)
trained from scratch on 32x32 captioned shapes: seconds per step on a CPU. `tiny.py:lora` / `tiny.py:sdxl,lora`:
a LoRA of it instead (sdjax.train.ldm.lora_params; set `pretrained` to adapt a trained model)."""
import ml_collections

from configs.models import tiny, tiny_xl
from sdjax.data import input_pipeline
from sdjax.train.ldm import dreambooth, lora_params, periodic_eval, textual_inversion


MODELS = {"": tiny.get_config, "sdxl": tiny_xl.get_config}


def get_config(arg=""):
    model, _, lora = arg.partition(",") if arg != "lora" else ("", ",", "lora")
    if model not in MODELS or lora not in ("", "lora"):
        raise ValueError(f"tiny config: the argument is one of {sorted(MODELS)}, optionally with ',lora' "
                         f"('lora' alone: the SD one), got {arg!r}")
    c = ml_collections.ConfigDict()
    c.model = MODELS[model]()        # unet / vae / text_encoder(s) / scheduler in diffusers keys
    c.model.vae.sample_size = 32
    # The VAE is random and frozen: its posterior mean has std ~0.44 on shapes (its variance ~1 is
    # pure noise), so train on the mean, scaled to about unit variance.
    c.model.vae.scaling_factor = 2.0
    c.model.unet.sample_size = 16    # 32x32 images, VAE factor 2
    c.pretrained = ""                # a diffusers folder or single file to start from instead of `model`
    c.tokenizer = ""                 # a CLIPTokenizer folder; "" = the bundled CLIP vocabulary
    c.train_text_encoder = False
    c.textual_inversion = textual_inversion.default_config()  # placeholder "<cat-toy>": train its embedding only
    c.dreambooth = dreambooth.default_config()  # instance_data_dir + instance_prompt: DreamBooth (dreambooth.py)
    if lora:
        c.lora = lora_params.default_config()
    c.data = input_pipeline.default_config()  # fields: see sdjax.data.input_pipeline.default_config
    c.data.update(source="shapes", image_size=32, random_flip=False,  # a flip would contradict "on the left"
                  num_threads=2, shapes=dict(num_train=5000, num_test=200, num_heldout=200, seed=0))
    c.batch_size = 16
    c.total_steps = 1000
    c.seed = 0
    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=20, schedule="cosine", decay_steps=0,  # 0: total_steps
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip_norm=1.0, grad_accum_steps=1))
    c.ema_decay = 0.99
    c.ema_warmup = False             # True: decay min(ema_decay, (1 + n) / (10 + n)) at step n
    c.loss = ml_collections.ConfigDict(dict(
        prediction_type="", min_snr_gamma=5.0, offset_noise=0.0, caption_dropout=0.1, latent="mean"))
    # matmul: jax_default_matmul_precision ("" keeps jax's: on GPU/TPU bf16 passes / TF32 for float32
    # matmuls; "highest" for full float32)
    c.precision = ml_collections.ConfigDict(dict(compute_dtype="float32", matmul=""))
    c.deterministic = False          # GPU: --xla_gpu_deterministic_ops (bit-reproducible, slower scatters/reductions)
    c.remat = False
    c.attention = "auto"             # sdjax.models.attention.IMPLEMENTATIONS; auto: flash kernels on GPU/TPU
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_shard_size=2 ** 14))
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.log_every = 10
    c.max_bad_steps = 20
    c.sample = ml_collections.ConfigDict(dict(
        every=0, prompts=("a red circle", "a large blue square on the left"), num_steps=20,
        guidance_scale=3.0, seed=0))
    c.eval = periodic_eval.default_config()  # every N steps: FID / CLIP score of a captions subset (periodic_eval.py)
    return c
