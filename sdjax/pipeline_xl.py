"""SDXL sampling: `StableDiffusionXL`, the pipeline of `pipeline.StableDiffusion` with SDXL's conditioning.

What SDXL adds to the prompt (diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline): the penultimate states of
both text towers concatenated (the refiner has the second only), the second tower's pooled projection, and the
micro-conditioning `time_ids` (original size, crop top-left, then the target size, or the refiner's aesthetic
score). Sampling, img2img, inpainting and the base -> refiner hand-off are the base pipeline's.
"""
import logging

import jax.numpy as jnp
import numpy as np

from sdjax.errors import UnsupportedConfig
from sdjax.models.clip_text import sdxl_text
from sdjax.pipeline import StableDiffusion, _prompt_lists
from sdjax.text.tokenizer import tokenize

log = logging.getLogger("sdjax")
TOWERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
OPTION_DEFAULTS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}  # diffusers' defaults


def _pair(value, name):
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in value)):
        raise ValueError(f"{name} must be a pair of numbers (height, width) or (top, left), got {value!r}")
    return tuple(value)


class StableDiffusionXL(StableDiffusion):
    """SDXL base or refiner; `StableDiffusion.load` / `StableDiffusion(pretrained)` give one for an SDXL model."""

    def __init__(self, pretrained):
        super().__init__(pretrained)
        self.towers = [(kind, getattr(pretrained, tok)) for kind, tok in TOWERS if kind in pretrained.modules]
        self.options = {**OPTION_DEFAULTS, **pretrained.options}
        # time_ids: 6 numbers (sizes, crop, target size) or the refiner's 5 (aesthetic score instead of the target)
        unet, pooled = self.unet, pretrained.modules["text_encoder_2"].projection_dim
        count, rest = divmod(unet.projection_class_embeddings_input_dim - pooled, unet.addition_time_embed_dim)
        if rest or count not in (5, 6):
            raise UnsupportedConfig(
                f"{pretrained.source}: the U-Net's added embedding takes {unet.projection_class_embeddings_input_dim} "
                f"inputs, which is not the pooled text ({pooled}) plus 5 or 6 time ids of {unet.addition_time_embed_dim}")
        self.aesthetic = count == 5
        if self.aesthetic != self.options["requires_aesthetics_score"]:
            log.warning("%s: model_index.json says requires_aesthetics_score=%s, but the U-Net takes %d time ids: "
                        "conditioning on %s", pretrained.source, self.options["requires_aesthetics_score"], count,
                        "an aesthetic score" if self.aesthetic else "the target size")

    def _validate_clip_skip(self, clip_skip):
        layers = min(self.pretrained.modules[kind].num_hidden_layers for kind, _ in self.towers)
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip must be an integer in [0, {layers - 1}], got {clip_skip!r}")

    def encode_prompts(self, prompts, prompts_2=None, clip_skip=0):
        """(text [B, 77, D1 + D2], pooled [B, P]) of `clip_skip` (`clip_text.sdxl_text`); prompts_2 (default:
        prompts) go to the second tower. The refiner has only that one, and it reads `prompts`, as diffusers."""
        texts = [prompts, prompts if prompts_2 is None else prompts_2]
        ids = []
        for (kind, tokenizer), items in zip(self.towers, texts):
            length = self.pretrained.modules[kind].max_position_embeddings
            row, truncated = tokenize(tokenizer, items, length)
            if truncated:
                log.warning("a prompt is longer than %d tokens and was truncated (as the reference does)", length)
            ids.append(jnp.asarray(row))
        kinds = [kind for kind, _ in self.towers]

        def fn(p, *ids, clip_skip):
            return sdxl_text([self.pretrained.modules[k].apply({"params": p[k]}, i) for k, i in zip(kinds, ids)],
                             clip_skip)
        return self._run("text", self._batched(fn), {k: self.params[k] for k in kinds}, *ids, clip_skip=clip_skip)

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
        (0, 0), as diffusers.
        """
        per = num_images_per_prompt
        prompts_2, negatives_2 = _prompt_lists(prompt_2 or prompt, negative_prompt_2 or negative_prompt, per)
        sizes = dict(original_size=original_size, target_size=target_size, negative_original_size=negative_original_size,
                     negative_target_size=negative_target_size, crops_coords_top_left=crops_coords_top_left,
                     negative_crops_coords_top_left=negative_crops_coords_top_left)
        sizes = {k: None if v is None else _pair(v, k) for k, v in sizes.items()}
        for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        conditioning = dict(sizes, prompts_2=prompts_2, negatives_2=negatives_2, aesthetic_score=aesthetic_score,
                            negative_aesthetic_score=negative_aesthetic_score,
                            zero_negatives=negative_prompt is None and self.options["force_zeros_for_empty_prompt"])
        return super().generate(prompt, negative_prompt, guidance_scale=guidance_scale, num_images_per_prompt=per,
                                conditioning=conditioning, **kwargs)

    def time_ids(self, size, c, negative=False):
        """The micro-conditioning numbers of one image [6] (or the refiner's [5]) for output size (h, w)."""
        original = c["original_size"] or size
        crop = c["crops_coords_top_left"]
        if negative:
            original = c["negative_original_size"] or original
            crop = c["negative_crops_coords_top_left"] or ((0, 0) if self.aesthetic else crop)
        if self.aesthetic:
            last = (c["negative_aesthetic_score"] if negative else c["aesthetic_score"],)
        else:
            last = c["target_size"] or size
            last = (c["negative_target_size"] or last) if negative else last
        return np.asarray([*original, *crop, *last], np.float32)

    def _conditions(self, prompts, negatives, cfg, clip_skip, size, conditioning, pad):
        c = conditioning
        if len(c["prompts_2"]) != len(prompts) or len(c["negatives_2"]) != len(negatives):
            raise ValueError(f"prompt_2 / negative_prompt_2 give {len(c['prompts_2'])} / {len(c['negatives_2'])} "
                             f"prompts for {len(prompts)} images")
        padded = lambda items: items + items[-1:] * pad  # noqa: E731
        b = len(prompts) + pad
        rows = lambda ids: jnp.asarray(np.broadcast_to(ids, (b, len(ids))))  # noqa: E731
        text, pooled = self.encode_prompts(padded(prompts), padded(c["prompts_2"]), clip_skip)
        cond = dict(encoder_hidden_states=text, text_embeds=pooled, time_ids=rows(self.time_ids(size, c)))
        if not cfg:
            return cond, None
        if c["zero_negatives"]:
            text, pooled = jnp.zeros_like(text), jnp.zeros_like(pooled)
        else:
            text, pooled = self.encode_prompts(padded(negatives), padded(c["negatives_2"]))  # no skip, as diffusers
        return cond, dict(encoder_hidden_states=text, text_embeds=pooled,
                          time_ids=rows(self.time_ids(size, c, negative=True)))
