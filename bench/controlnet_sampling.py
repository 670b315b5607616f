"""A ControlNet's cost per sampling step: sdjax's loop with one ControlNet against its plain loop, and against diffusers'
StableDiffusionControlNetPipeline (and its plain pipeline) on the same folders, this CPU. Prints figures, asserts
nothing.

    python bench/controlnet_sampling.py [--models demo,sd15] [--steps 8] [--repeats 3]

demo: the bundled model at 64²; sd15: the SD 1.5 architecture with random weights (written once to
/tmp/sd15_random by bench/load_sd15.py) at 256². The ControlNet is diffusers' `from_unet` of the model's U-Net
(random zero convolutions), saved once beside a temporary folder. Guidance 7.5 (the ControlNet runs on both halves),
DDIM. sdjax's time per step is its compiled loop's (`last_timings["sample"]` over the steps); diffusers' is
(t(steps) - t(1)) / (steps - 1) of whole pipeline calls, which leaves out its text encoding and decoding alike.
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import GUIDANCE, PROMPT, median, timed  # noqa: E402
from bench.sample_compile import SIZES, folder  # noqa: E402


def write_controlnet(model_folder, path):
    """diffusers' ControlNetModel.from_unet of the folder's U-Net, its zero convolutions made random, saved in
    `path`; the conditioning embedding as deep as the VAE's factor."""
    import torch
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(model_folder, subfolder="unet")
    levels = len(AutoencoderKL.load_config(model_folder, subfolder="vae")["block_out_channels"])
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    net.save_pretrained(path)
    return path


def control_image(size):
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline=(255, 255, 255))
    return image


def sdjax_per_step(model_folder, net, size, steps, repeats):
    """(plain, ControlNet) seconds per step of sdjax's compiled loop."""
    from sdjax.pipeline import StableDiffusion
    sd = StableDiffusion.load(model_folder, controlnet=net)
    plain = StableDiffusion.load(model_folder)
    kw = dict(num_steps=steps, guidance_scale=GUIDANCE, sampler="ddim", height=size, width=size, progress=False)
    out = []
    for pipe, extra in ((plain, {}), (sd, {"control_image": control_image(size)})):
        pipe.generate(PROMPT, **kw, **extra)  # compiles
        times = []
        for _ in range(repeats):
            pipe.generate(PROMPT, **kw, **extra)
            times.append(pipe.last_timings["sample"] / steps)
        out.append(median(times))
    return out


def diffusers_per_step(model_folder, net, size, steps, repeats):
    """(plain, ControlNet) seconds per step of diffusers' pipelines."""
    import diffusers
    controlnet = diffusers.ControlNetModel.from_pretrained(net)
    pipes = [diffusers.StableDiffusionPipeline.from_pretrained(model_folder, safety_checker=None),
             diffusers.StableDiffusionControlNetPipeline.from_pretrained(model_folder, controlnet=controlnet,
                                                                         safety_checker=None)]
    out = []
    for pipe, extra in zip(pipes, ({"height": size, "width": size}, {"image": control_image(size)})):
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        call = lambda n: timed(lambda: pipe(PROMPT, num_inference_steps=n, guidance_scale=GUIDANCE,  # noqa: E731
                                            output_type="np", **extra))
        call(1)  # warm-up
        out.append(median([(call(steps) - call(1)) / (steps - 1) for _ in range(repeats)]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo")
    p.add_argument("--steps", type=int, default=30)  # fewer: the per-call overhead (kernel transforms) weighs in
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from tests.torchvision_ops import torchvision_without_ops
    torchvision_without_ops()  # before diffusers imports it
    for model in a.models.split(","):
        model_folder, size = folder(model), SIZES[model]
        net = write_controlnet(model_folder, os.path.join(tempfile.mkdtemp(), "controlnet"))
        ours = sdjax_per_step(model_folder, net, size, a.steps, a.repeats)
        theirs = diffusers_per_step(model_folder, net, size, a.steps, a.repeats)
        print(f"{model} at {size}², guidance {GUIDANCE}, s/step (median of {a.repeats}):")
        for name, (plain, control) in (("sdjax", ours), ("diffusers", theirs)):
            print(f"  {name:9s} plain {plain:.4f}  ControlNet {control:.4f}  ControlNet/plain {control / plain:.2f}")
        print(f"  sdjax/diffusers: plain {ours[0] / theirs[0]:.2f}, ControlNet {ours[1] / theirs[1]:.2f}; "
              f"the ControlNet's own cost per step: sdjax {ours[1] - ours[0]:.4f} s, diffusers "
              f"{theirs[1] - theirs[0]:.4f} s")


if __name__ == "__main__":
    main()
