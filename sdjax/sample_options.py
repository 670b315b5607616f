"""The model and sampling options of sample.py, shared with `python -m sdjax.eval`: the command-line arguments, the
model loaded with its LoRAs and embeddings, and `generate`'s keyword arguments from them."""
import argparse
import inspect
import math
import os
import time

from sdjax import compile_cache, host_memory
from sdjax.demo import DEMO_MODEL


def finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def lora_arg(text):
    """--lora PATH[:SCALE] -> (path, scale): the scale after the last colon, when it reads as a number (a path may hold
    colons: C:\\loras\\x.safetensors)."""
    path, _, scale = text.rpartition(":")
    try:
        return (path, finite_float(scale)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def add_model_arguments(p):
    """--model and what loads with it: weights' variant and VAE, dtype, attention, LoRAs, embeddings, the cache."""
    p.add_argument("--model", default=None, help="diffusers folder or single-file checkpoint (default: the bundled demo model)")
    p.add_argument("--config-name", default=None, help="architecture of a single file when shapes can't tell (sd15, sd21, sd21-base, ...)")
    p.add_argument("--variant", default=None, help="weight files of a diffusers folder: fp16, non_ema, ema, ...")
    p.add_argument("--vae", default=None, help="replacement VAE: a diffusers VAE folder or a .safetensors/.ckpt file")
    p.add_argument("--raw-weights", action="store_true", help="single-file training checkpoints: the raw U-Net, not its EMA")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "chunked", "xla", "cudnn"],
                   help="attention implementation (auto: flash kernels on GPU/TPU, chunked on CPU)")
    p.add_argument("--lora", action="append", default=[], type=lora_arg, metavar="PATH[:SCALE]",
                   help="a LoRA file (diffusers/PEFT or kohya/A1111) merged at SCALE (default 1); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="PATH",
                   help="a textual-inversion embedding (A1111 .pt/.safetensors, diffusers' learned_embeds), written in "
                        "prompts as its file's stem; repeatable")
    p.add_argument("--compilation-cache", default=None,
                   help="jax's compilation cache folder (default $SDJAX_COMPILATION_CACHE or ~/.cache/sdjax/xla; off: none)")


def add_sampling_arguments(p):
    """How images are sampled: negative prompt, steps, guidance, sampler and its options, size."""
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=finite_float, default=None, help="guidance scale (default 7.5; SDXL 5.0)")
    p.add_argument("--sampler", default=None,
                   help="sampler name (default: the model's own scheduler, as diffusers); 'help' lists them")
    p.add_argument("--clip-skip", type=int, default=0, help="condition on the text encoder's layer this many before the last")
    p.add_argument("--sigmas", choices=["karras", "exponential", "beta"], default=None,
                   help="the noise levels' ramp, for the samplers that offer it (UIs' 'DPM++ 2M Karras': "
                        "--sampler dpmpp_2m --sigmas karras)")
    p.add_argument("--eta", type=finite_float, default=None, help="eta in [0, 1] of the samplers that take one "
                   "(ddim, tcd; default 0, as diffusers' pipelines)")
    p.add_argument("--no-prompt-weighting", action="store_true",
                   help="read prompts literally: no (word:1.3) emphasis or BREAK (diffusers' behaviour)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)


def sampler_help():
    """The samplers, each with the diffusers scheduler it reproduces."""
    from sdjax.diffusion.samplers import SAMPLERS, SCHEDULER_CLASSES, plan_options
    ramps = lambda name: "  --sigmas" if "use_karras_sigmas" in plan_options(name) else ""  # noqa: E731
    return "samplers (--sampler NAME; default: the model's own scheduler):\n" + "\n".join(
        f"  {name:14s} {SCHEDULER_CLASSES[name]:34s}{ramps(name)}".rstrip() for name in sorted(SAMPLERS))


def backend_note():
    """The backend jax computes on, and a hint when a GPU is present but jax has no CUDA plugin."""
    import jax
    backend = f"{jax.default_backend()} ({jax.device_count()} device(s))"
    if jax.default_backend() == "cpu" and os.path.exists("/dev/nvidia0"):
        backend += ": this machine has an NVIDIA GPU, but jax has no CUDA plugin: pip install -e '.[cuda]'"
    return backend


def check_model(args):
    """The model's path (--model, or the demo model) and the cache folder, checked before anything is imported;
    FileNotFoundError / FileExistsError naming the option."""
    model = args.model or DEMO_MODEL
    if not os.path.exists(model):
        raise FileNotFoundError(f"model not found: {model}" + ("" if args.model else
                                " (the bundled demo model is not in this install; pass --model PATH)"))
    cache = args.compilation_cache
    if cache and cache != "off" and os.path.exists(cache) and not os.path.isdir(cache):
        raise FileExistsError(f"--compilation-cache {cache} is a file; give a folder (or 'off')")
    return model


def load_options(args):
    """StableDiffusion.load's keyword arguments."""
    return dict(dtype=args.dtype, attention=args.attention, config_name=args.config_name, variant=args.variant,
                vae=args.vae, use_ema=False if args.raw_weights else None)


def load(args, **options):
    """The pipeline of --model (`check_model`; `options`: more of StableDiffusion.load's) with --lora and --embedding
    loaded; the compilation cache on."""
    from sdjax.pipeline import StableDiffusion
    model = check_model(args)
    compile_cache.enable(args.compilation_cache)
    for flag, path in [("--lora", path) for path, _ in args.lora] + [("--embedding", p) for p in args.embedding]:
        if not os.path.isfile(path):  # before the slow load
            raise FileNotFoundError(f"{flag}: no such file: {path}")
    t0 = time.perf_counter()
    sd = StableDiffusion.load(model, **load_options(args), **options)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f} s; running on {backend_note()}")
    host_memory.release_freed_memory()  # the file buffers of loading
    for path, scale in args.lora:
        sd.load_lora(path, scale)
    for path in args.embedding:
        sd.load_textual_inversion(path)
    return sd


def generate_options(args, sd):
    """`sd.generate`'s keyword arguments of the sampling options, the sampler and guidance scale named (by default
    the model's own scheduler and its family's guidance)."""
    from sdjax.diffusion.samplers import SAMPLERS, plan_options
    sampler = args.sampler or sd.default_sampler()
    takes_eta = sorted(name for name in SAMPLERS if "eta" in plan_options(name))
    if args.eta and sampler not in takes_eta:
        raise ValueError(f"--eta is for the samplers {', '.join(takes_eta)}; {sampler} takes none")
    kw = dict(negative_prompt=args.negative_prompt, num_steps=args.steps, sampler=sampler, height=args.height,
              width=args.width, clip_skip=args.clip_skip, prompt_weighting=not args.no_prompt_weighting)
    if args.sigmas:
        kw[f"use_{args.sigmas}_sigmas"] = True
    if args.eta is not None:
        kw["eta"] = args.eta
    kw["guidance_scale"] = (args.guidance if args.guidance is not None else
                            inspect.signature(sd.generate).parameters["guidance_scale"].default)  # the family's
    return kw
