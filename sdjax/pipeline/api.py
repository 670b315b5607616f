"""The public classes: `StableDiffusion.load(path)` and `generate(prompt, ...)` -> uint8 images; an SDXL model gives a
`StableDiffusionXL`, whose `generate` takes SDXL's arguments. The model family is chosen here, once, at load."""
import os

import jax

from sdjax.models import attention as attention_lib
from sdjax.pipeline.conditioning import TextConditioning
from sdjax.pipeline.conditioning_xl import XLConditioning
from sdjax.pipeline.core import Pipeline
from sdjax.pipeline.prompts import prompt_lists
from sdjax.weights.pretrained import load_pretrained


def is_xl(pretrained):
    """Whether a loaded model is SDXL (base: two text towers; refiner: the second only)."""
    return "text_encoder_2" in pretrained.modules


class StableDiffusion(Pipeline):
    """Text-to-image, img2img and inpainting with a loaded Stable Diffusion checkpoint; `StableDiffusion(pretrained)`
    and `StableDiffusion.load` of an SDXL model give a `StableDiffusionXL`. `StableDiffusion(pretrained, mesh)`: its
    params already laid out on `mesh` (a training run's shards), used as they are."""

    def __new__(cls, pretrained=None, mesh=None):
        if cls is StableDiffusion and pretrained is not None and is_xl(pretrained):
            cls = StableDiffusionXL
        return super().__new__(cls)

    def __init__(self, pretrained, mesh=None):
        super().__init__(pretrained, (XLConditioning if is_xl(pretrained) else TextConditioning)(pretrained), mesh)
        self.tokenizer = pretrained.tokenizer
        self.text_encoder = pretrained.modules.get("text_encoder")  # None: the SDXL refiner's

    @classmethod
    def load(cls, path, dtype="float32", attention="auto", controlnet=None, **options):
        """A pipeline over a diffusers folder or a single-file checkpoint; options as `load_pretrained`'s;
        attention: one of models.attention.IMPLEMENTATIONS ("auto": the platform's fastest); controlnet: a
        ControlNet's path, or a list of them (`load_controlnet`)."""
        attention_lib.check_name(attention, jax.default_backend())
        sd = cls(load_pretrained(path, dtype=dtype, **options))  # an SDXL model: a StableDiffusionXL
        sd.attention = attention
        for net in [] if controlnet is None else [controlnet] if isinstance(controlnet, (str, os.PathLike)) else controlnet:
            sd.load_controlnet(net)
        return sd

    def load_controlnet(self, path, variant=None):
        """Add the ControlNet at `path` (a diffusers ControlNet folder, or a single file) in the pipeline's dtype;
        with several, generate takes one control image each and sums their residuals. Nothing recompiles for
        another control image, scale or guidance window."""
        self._controlnets.load(path, variant)

    def unload_controlnets(self):
        """Remove every ControlNet."""
        self._controlnets.unload()

    @property
    def controlnets(self):
        """The paths of the loaded ControlNets, in the order generate takes their images."""
        return list(self._controlnets.sources)

    def load_lora(self, path, scale=1.0, name=None):
        """Merge the LoRA file at `path` (diffusers/PEFT or kohya/A1111, LoCon included; U-Net and text towers) into
        the weights at `scale`; several may be loaded, each with its scale. Returns its name (`name`, or the file's
        stem). The compiled pieces take the weights as arguments: loading, rescaling or unloading compiles nothing."""
        return self._loras.load(path, scale, name)

    def set_lora_scale(self, scale, name=None):
        """Set the scale of the loaded LoRA `name` (None: of every loaded one)."""
        self._loras.set_scale(scale, name)

    def unload_loras(self):
        """Remove every LoRA: the model's own weights, bit for bit."""
        self._loras.unload()

    @property
    def loras(self):
        """{name: scale} of the loaded LoRAs."""
        return dict(self._loras.scales)

    def load_textual_inversion(self, path, token=None):
        """Add the textual-inversion embedding at `path` (A1111 .pt / .safetensors, SDXL's clip_l + clip_g; diffusers'
        learned_embeds) as `token` (default: the file's stem, as A1111), to be written in prompts, weighted ones
        too; returns the token. The sampling loop does not recompile."""
        return self._embeddings.load(path, token)

    def encode_prompts(self, prompts, clip_skip=0, weighting=True):
        """list of str -> text embeddings [B, K*77, D]: the final-normed output of the text encoder's last layer,
        or, with clip_skip=k, of the layer k before it (diffusers' clip_skip); K chunks of 77 tokens."""
        return self.encode_text([prompts], clip_skip, weighting=weighting)


class StableDiffusionXL(StableDiffusion):
    """SDXL base or refiner; `StableDiffusion.load` / `StableDiffusion(pretrained)` give one for an SDXL model."""

    @property
    def options(self):
        """The pipeline flags of model_index.json (force_zeros_for_empty_prompt, requires_aesthetics_score)."""
        return self.conditioning.options

    def encode_prompts(self, prompts, prompts_2=None, clip_skip=0, weighting=True):
        """(text [B, K*77, D1 + D2], pooled [B, P]) of `clip_skip` (`clip_text.sdxl_text`); prompts_2 (default:
        prompts) go to the second tower. The refiner has only that one, and it reads `prompts`, as diffusers."""
        return self.encode_text([prompts, prompts if prompts_2 is None else prompts_2], clip_skip, weighting=weighting)

    def generate(self, prompt, negative_prompt=None, *, prompt_2=None, negative_prompt_2=None, guidance_scale=5.0,
                 num_images_per_prompt=1, original_size=None, crops_coords_top_left=(0, 0), target_size=None,
                 negative_original_size=None, negative_crops_coords_top_left=None, negative_target_size=None,
                 aesthetic_score=6.0, negative_aesthetic_score=2.5, **kwargs):
        """`StableDiffusion.generate` with SDXL's conditioning (diffusers' names and defaults).

        prompt_2 / negative_prompt_2: the second tower's (default: prompt / negative_prompt). Without a
        negative prompt, a model with force_zeros_for_empty_prompt (SDXL base) guides away from zero text.
        original_size / target_size (height, width; default: the output size) and crops_coords_top_left:
        the micro-conditioning; the refiner (requires_aesthetics_score) takes aesthetic_score instead of the
        target size. The negative_* forms default to the positive ones, except the refiner's negative crop,
        (0, 0), as diffusers. img2img's strength defaults to 0.3, inpainting's to 0.9999, as diffusers.
        """
        per = num_images_per_prompt
        prompts_2, negatives_2 = prompt_lists(prompt_2 or prompt, negative_prompt_2 or negative_prompt, per)
        extra = self.conditioning.extra(
            prompts_2, negatives_2, negative_prompt, aesthetic_score, negative_aesthetic_score,
            original_size=original_size, target_size=target_size, negative_original_size=negative_original_size,
            negative_target_size=negative_target_size, crops_coords_top_left=crops_coords_top_left,
            negative_crops_coords_top_left=negative_crops_coords_top_left)
        return super().generate(prompt, negative_prompt, guidance_scale=guidance_scale, num_images_per_prompt=per,
                                conditioning=extra, **kwargs)
