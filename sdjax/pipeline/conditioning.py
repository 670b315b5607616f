"""Stable Diffusion 1.x/2.x's conditioning: one text tower's last states (clip_skip: an earlier layer's)."""
from sdjax.pipeline.prompts import pad_rows


class TextConditioning:
    """The U-Net's conditioning of an SD 1.x/2.x model: {"encoder_hidden_states": text states [B, K*77, D]}."""
    xl = False
    default_strength = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' pipelines'

    def __init__(self, pretrained):
        # (component, module, tokenizer) of each text tower
        self.towers = [("text_encoder", pretrained.modules["text_encoder"], pretrained.tokenizer)]

    def validate_clip_skip(self, clip_skip):
        layers = min(tower.num_hidden_layers for _, tower, _ in self.towers)
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
            raise ValueError(f"clip_skip must be an integer in [0, {layers - 1}], got {clip_skip!r}")

    def unet_inputs(self, pipe, prompts, negatives, cfg, clip_skip, size, extra, pad, weighting):
        """(cond, uncond): the U-Net's conditioning keyword arguments for the prompts and (with guidance, cfg)
        the negative prompts, each padded by `pad` copies of its last row, in as many chunks as the longest
        needs; uncond None without guidance. `pipe`: the core.Pipeline that encodes."""
        if extra is not None:
            raise TypeError(f"conditioning is for model families with more than text; this is {type(pipe).__name__}")
        padded = lambda items: pad_rows(items, pad)  # noqa: E731
        chunks = pipe.chunks([prompts] + ([negatives] if cfg else []), weighting)
        cond = {"encoder_hidden_states": pipe.encode_text([padded(prompts)], clip_skip, chunks, weighting)}
        if not cfg:
            return cond, None
        # the negative prompt without clip_skip, as diffusers
        return cond, {"encoder_hidden_states": pipe.encode_text([padded(negatives)], 0, chunks, weighting)}
