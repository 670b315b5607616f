"""SDXL's conditioning (diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline): the penultimate states of both text
towers concatenated (the refiner has the second only), the second tower's pooled projection, and the
micro-conditioning `time_ids` (original size, crop top-left, then the target size, or the refiner's aesthetic
score)."""
import logging

import numpy as np

from sdjax.errors import UnsupportedConfig
from sdjax.pipeline.conditioning import TextConditioning
from sdjax.pipeline.prompts import pad_rows

log = logging.getLogger("sdjax")
TOWERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
OPTION_DEFAULTS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}  # diffusers' defaults


def pair(value, name):
    """A (height, width) or (top, left) pair of finite numbers, checked."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in value)):
        raise ValueError(f"{name} must be a pair of numbers (height, width) or (top, left), got {value!r}")
    return tuple(value)


class XLConditioning(TextConditioning):
    """SDXL base or refiner: {"encoder_hidden_states", "text_embeds" (pooled), "time_ids"}."""
    xl = True
    default_strength = {"img2img": 0.3, "inpaint": 0.9999}  # diffusers' SDXL pipelines'

    def __init__(self, pretrained):
        self.towers = [(kind, pretrained.modules[kind], getattr(pretrained, tok)) for kind, tok in TOWERS
                       if kind in pretrained.modules]
        self.options = {**OPTION_DEFAULTS, **pretrained.options}
        # time_ids: 6 numbers (sizes, crop, target size) or the refiner's 5 (aesthetic score instead of the target)
        unet, pooled = pretrained.modules["unet"], pretrained.modules["text_encoder_2"].projection_dim
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

    def extra(self, prompts_2, negatives_2, negative_prompt, aesthetic_score, negative_aesthetic_score, **sizes):
        """The conditioning dict `unet_inputs` takes, from StableDiffusionXL.generate's arguments (checked)."""
        sizes = {k: None if v is None else pair(v, k) for k, v in sizes.items()}
        for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
            if not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        return dict(sizes, prompts_2=prompts_2, negatives_2=negatives_2, aesthetic_score=aesthetic_score,
                    negative_aesthetic_score=negative_aesthetic_score,
                    zero_negatives=negative_prompt is None and self.options["force_zeros_for_empty_prompt"])

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

    def unet_inputs(self, pipe, prompts, negatives, cfg, clip_skip, size, c, pad, weighting):
        """(cond, uncond) as TextConditioning's, with the pooled text and time ids; without a negative prompt a
        force_zeros_for_empty_prompt model guides away from zero text."""
        if len(c["prompts_2"]) != len(prompts) or len(c["negatives_2"]) != len(negatives):
            raise ValueError(f"prompt_2 / negative_prompt_2 give {len(c['prompts_2'])} / {len(c['negatives_2'])} "
                             f"prompts for {len(prompts)} images")
        padded = lambda items: pad_rows(items, pad)  # noqa: E731
        b = len(prompts) + pad
        rows = lambda ids: np.broadcast_to(ids, (b, len(ids)))  # noqa: E731
        texts = [prompts, c["prompts_2"]] + ([negatives, c["negatives_2"]] if cfg and not c["zero_negatives"] else [])
        chunks = pipe.chunks(texts, weighting)
        text, pooled = pipe.encode_text([padded(prompts), padded(c["prompts_2"])], clip_skip, chunks, weighting)
        cond = dict(encoder_hidden_states=text, text_embeds=pooled, time_ids=rows(self.time_ids(size, c)))
        if not cfg:
            return cond, None
        if c["zero_negatives"]:
            text, pooled = np.zeros(text.shape, text.dtype), np.zeros(pooled.shape, pooled.dtype)
        else:  # no clip_skip, as diffusers
            text, pooled = pipe.encode_text([padded(negatives), padded(c["negatives_2"])], 0, chunks, weighting)
        return cond, dict(encoder_hidden_states=text, text_embeds=pooled,
                          time_ids=rows(self.time_ids(size, c, negative=True)))
