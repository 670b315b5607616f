"""Generate images with Stable Diffusion in JAX.

    python sample.py --prompt "a red circle on the left"                 # the bundled demo model
    python sample.py --model path/to/sd-v1-5 --prompt "an astronaut riding a horse" --steps 30
    python sample.py --model path/to/sdxl-base --refiner path/to/sdxl-refiner --prompt "a lighthouse at dusk"
    python sample.py --model path/to/sd-v1-5 --controlnet path/to/sd-controlnet-canny --control-image photo.png \\
        --control-preprocess canny --prompt "a bird"
"""
import argparse
import importlib.util
import os
import sys
import time

from sdjax import host_memory
from sdjax.sample_options import (add_model_arguments, add_sampling_arguments, check_model, finite_float,
                                  generate_options, load, load_options, sampler_help)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--prompt-2", default=None, help="SDXL: the second text tower's prompt (default: the prompt)")
    p.add_argument("--negative-prompt-2", default=None, help="SDXL: the second tower's negative prompt")
    p.add_argument("--refiner", default=None, help="SDXL: a refiner (folder or file) that takes over the base's "
                   "latents at --refiner-start")
    p.add_argument("--refiner-start", type=finite_float, default=None,
                   help="SDXL: the fraction of the noise the base removes before the refiner continues (0.8)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="image i of the run uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--init-image", help="img2img / inpainting source image")
    p.add_argument("--mask", help="inpainting mask (white = repaint)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="img2img strength in (0, 1] (default 0.8, SDXL 0.3; inpainting 1.0, as diffusers)")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet (diffusers folder or single file); repeatable, each with its --control-image")
    p.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="the image of the --controlnet in the same place; it sets the output size unless "
                        "--height/--width or --init-image do")
    p.add_argument("--control-scale", action="append", default=[], type=finite_float, metavar="S",
                   help="a ControlNet's conditioning scale (default 1); none, or one per --controlnet")
    p.add_argument("--control-preprocess", action="append", default=[], choices=["none", "canny"],
                   help="make the control image from an ordinary photo: canny = OpenCV's edges (pip install "
                        "'sdjax[canny]'); one for every control image, or one per --controlnet")
    p.add_argument("--guess-mode", action="store_true",
                   help="the ControlNets see the conditional half of guidance only (diffusers' guess mode)")
    p.add_argument("--control-start", type=finite_float, default=None,
                   help="the fraction of the steps after which the ControlNets start (default 0)")
    p.add_argument("--control-end", type=finite_float, default=None,
                   help="the fraction of the steps after which they stop (default 1)")
    p.add_argument("--out", default="outputs")
    p.add_argument("--grid", action="store_true", help="also write all images as one grid.png")
    return p.parse_args(argv)


def report(sd, steps, n, part):
    t = sd.last_timings
    print(f"{part + ': ' if part else ''}compile {t.get('compile_sample', 0.0):.1f} s, sampling {t['sample']:.2f} s "
          f"({t['sample'] / steps:.3f} s/step for {n} image(s))")


def next_number(folder):
    """The first image number after the highest of the NNNN-*.png files in `folder` (0 if none), as A1111 numbers."""
    numbers = [int(name.split("-", 1)[0]) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
               if name.endswith(".png") and name.split("-", 1)[0].isdigit()]
    return max(numbers, default=-1) + 1


def control_arguments(args):
    """generate's ControlNet arguments from the --control-* flags (checked; the images opened, and preprocessed)."""
    from sdjax.images import canny_edges, open_image
    nets = len(args.controlnet)
    if len(args.control_image) != nets:
        raise ValueError(f"--controlnet and --control-image come in pairs: got {nets} ControlNet(s) and "
                         f"{len(args.control_image)} image(s)")
    given = [flag for flag, value in (("--control-scale", args.control_scale), ("--guess-mode", args.guess_mode),
                                      ("--control-preprocess", args.control_preprocess),
                                      ("--control-start", args.control_start is not None),
                                      ("--control-end", args.control_end is not None)) if value]
    if not nets:
        if given:
            raise ValueError(f"{', '.join(given)}: for ControlNets; give --controlnet PATH --control-image IMG")
        return {}
    if args.control_scale and len(args.control_scale) != nets:
        raise ValueError(f"--control-scale: one per --controlnet ({nets}), got {len(args.control_scale)}")
    if len(args.control_preprocess) not in (0, 1, nets):
        raise ValueError(f"--control-preprocess: one for all control images or one per --controlnet ({nets}), got "
                         f"{len(args.control_preprocess)}")
    for path in args.controlnet:
        if not os.path.exists(path):
            raise FileNotFoundError(f"--controlnet: no such folder or file: {path}")
    if "canny" in args.control_preprocess and importlib.util.find_spec("cv2") is None:
        raise ValueError("--control-preprocess canny needs OpenCV: pip install 'sdjax[canny]'")
    steps = (args.control_preprocess or ["none"]) * (nets if len(args.control_preprocess) <= 1 else 1)
    images = [open_image(path, "--control-image") for path in args.control_image]
    images = [canny_edges(im) if step == "canny" else im for im, step in zip(images, steps)]
    return dict(control_image=images, controlnet_conditioning_scale=args.control_scale or 1.0,
                guess_mode=args.guess_mode, control_guidance_start=args.control_start or 0.0,
                control_guidance_end=1.0 if args.control_end is None else args.control_end)


def main(argv=None):
    args = parse_args(argv)
    if args.sampler == "help":
        print(sampler_help())
        return
    try:
        run(args)
    except (ValueError, OSError) as e:  # bad input (WeightLoadError is a ValueError); bugs still trace back
        sys.exit(f"sample.py: {e}")


def run(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise FileNotFoundError(f"--prompts-file: no such file: {args.prompts_file}")
        with open(args.prompts_file) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt (or --prompts-file)")
    model = check_model(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out} is a file; give a folder for the images")
    if args.refiner_start is not None and not args.refiner:
        raise ValueError("--refiner-start is for --refiner: give the refiner model too")
    if args.strength is not None and not args.init_image:
        raise ValueError("--strength is for img2img and inpainting: give --init-image")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")

    from sdjax.images import make_grid, open_image, save_png
    from sdjax.pipeline import StableDiffusion, StableDiffusionXL
    image = open_image(args.init_image, "--init-image") if args.init_image else None  # before the slow load
    mask = open_image(args.mask, "--mask") if args.mask else None
    control = control_arguments(args)
    sd = load(args, controlnet=args.controlnet)
    xl = isinstance(sd, StableDiffusionXL)
    extra = dict(prompt_2=args.prompt_2, negative_prompt_2=args.negative_prompt_2) if xl else {}
    if not xl and (args.prompt_2 or args.negative_prompt_2 or args.refiner):
        raise ValueError("--prompt-2, --negative-prompt-2 and --refiner are for SDXL models; "
                         f"{model} is Stable Diffusion 1.x/2.x")
    kw = dict(generate_options(args, sd), seed=args.seed, mask=mask, strength=args.strength,
              num_images_per_prompt=args.num_images, **extra)
    sampler = kw["sampler"]
    if args.refiner:  # the base's latents at --refiner-start; the base leaves memory before the refiner loads
        start = 0.8 if args.refiner_start is None else args.refiner_start
        latents = sd.generate(prompts, image=image, denoising_end=start, output_type="latent", **control, **kw)
        report(sd, args.steps, len(latents), "base")
        del sd
        t0 = time.perf_counter()
        sd = StableDiffusion.load(args.refiner, **{**load_options(args), "config_name": None})
        print(f"loaded the refiner {args.refiner} in {time.perf_counter() - t0:.1f} s")
        images = sd.generate(prompts, image=latents, denoising_start=start, **kw)
    else:
        images = sd.generate(prompts, image=image, **control, **kw)
    report(sd, args.steps, len(images), "refiner" if args.refiner else "")
    paths, first = [], next_number(args.out)  # never overwrite: numbers continue after the folder's highest
    for i, img in enumerate(images):
        meta = {"prompt": prompts[i // args.num_images], "negative_prompt": args.negative_prompt or "",
                "seed": args.seed + i, "sampler": " ".join(filter(None, (sampler, args.sigmas))),
                "steps": args.steps,
                "guidance": kw["guidance_scale"], "model": os.path.basename(os.path.normpath(model)),
                "software": "sdjax"}
        if args.lora:
            meta["lora"] = " ".join(f"{os.path.basename(path)}:{scale:g}" for path, scale in args.lora)
        if args.controlnet:
            scales = args.control_scale or [1.0] * len(args.controlnet)
            meta["controlnet"] = " ".join(f"{os.path.basename(os.path.normpath(path))}:{scale:g}"
                                          for path, scale in zip(args.controlnet, scales))
        if args.embedding:
            meta["embeddings"] = " ".join(os.path.basename(path) for path in args.embedding)
        if xl:
            meta.update(prompt_2=args.prompt_2 or "", negative_prompt_2=args.negative_prompt_2 or "")
        if args.refiner:
            meta.update(refiner=os.path.basename(os.path.normpath(args.refiner)), refiner_start=start)
        paths.append(save_png(img, os.path.join(args.out, f"{first + i:04d}-seed{args.seed + i}.png"), meta))
    if args.grid:
        paths.append(save_png(make_grid(images), os.path.join(args.out, f"grid-{first:04d}.png"),
                              {"prompts": " | ".join(prompts)}))
    print("\n".join(paths))


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # before jax starts threads: no page faults on every call (CPU)
    main()
