"""The sampling pipeline, one home per concern:

| module | what |
|---|---|
| api.py | the public classes `StableDiffusion` and `StableDiffusionXL`; the model family chosen at load |
| core.py | the machinery: params on the devices, compiled pieces, `generate`, the loop run in pieces with progress |
| conditioning.py, conditioning_xl.py | a family's conditioning: SD 1.x/2.x's text; SDXL's two towers, pooled text, time ids |
| prompts.py | prompt encoding: per-image prompt lists, token chunks and weights, the towers' states |
| denoiser.py | the function the loop calls: the U-Net composed with guidance, image-by-image mapping, extra channels |
| image_inputs.py | images and masks as given, resized; the output size |
| controlnets.py | ControlNets: the loaded ones, a call's control images and per-iteration scales, the wrapper of the U-Net call |
| arguments.py | `generate`'s arguments checked where they enter |
| noise_streams.py | the unit noise of a run: per-image keys by purpose, or given |
| executables.py | compiled executables by signature, shared by threads |
"""
from sdjax.pipeline.api import StableDiffusion, StableDiffusionXL

__all__ = ["StableDiffusion", "StableDiffusionXL"]
