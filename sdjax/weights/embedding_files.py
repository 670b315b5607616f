"""Textual-inversion embeddings as people share them, read into {text tower: vectors [n, D]} and written from it.

- AUTOMATIC1111: `.pt` ({"string_to_param": {"*": [n, D]}, "name": ..., ...}) and `.safetensors` ({"emb_params":
  [n, D]}; SDXL's {"clip_l": [n, 768], "clip_g": [n, 1280]}, one per tower);
- diffusers' `learned_embeds.safetensors` / `.bin`: {token: [D] or [n, D]}, one token.
"""
import os

import numpy as np

from sdjax.errors import WeightLoadError
from sdjax.weights.files import read_tensors

# A tensor's name -> the text tower its vectors are for (other single names: diffusers' token, the first tower)
TOWERS = {"emb_params": "text_encoder", "string_to_param.*": "text_encoder", "clip_l": "text_encoder",
          "clip_g": "text_encoder_2"}
FORMATS = ("a1111", "diffusers")  # what `embedding_files` writes
_FORMATS = ("sdjax loads A1111 embeddings (.pt string_to_param, .safetensors emb_params, SDXL's clip_l + clip_g) "
            "and diffusers' (learned_embeds: one token)")


def read_embedding(path):
    """{text tower component: float32 vectors [n, D]} of the embedding file at `path`."""
    if not os.path.isfile(path):
        raise WeightLoadError(f"embedding file not found: {path}")
    tensors = {k: v for k, v in read_tensors(path).items() if k != "global_step"}
    named = {k: v for k, v in tensors.items() if k in TOWERS}
    if not named and len(tensors) == 1:  # diffusers: {token: vectors}
        named = {"emb_params": next(iter(tensors.values()))}
    if not named or (len(named) > 1 and set(named) - {"clip_l", "clip_g"}):
        keys = ", ".join(sorted(tensors)[:3]) + (" ..." if len(tensors) > 3 else "")
        hint = "; a LoRA? load it with load_lora (--lora)" if any("lora" in k for k in tensors) else ""
        raise WeightLoadError(f"{path}: not a textual-inversion embedding (tensors: {keys or 'none'}); "
                              f"{_FORMATS}{hint}")
    out = {}
    for name, vectors in named.items():
        vectors = np.array(vectors, np.float32)
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        if vectors.ndim != 2 or not len(vectors):
            raise WeightLoadError(f"{path}: {name} has shape {vectors.shape}; an embedding is [vectors, width]")
        out[TOWERS[name]] = vectors
    if len({len(v) for v in out.values()}) > 1:
        raise WeightLoadError(f"{path}: clip_l and clip_g hold {len(out['text_encoder'])} and "
                              f"{len(out['text_encoder_2'])} vectors; an SDXL embedding has as many for each tower")
    return out


def embedding_files(vectors, token, fmt):
    """{file name suffix: {tensor name: [n, D]}}: the files of an embedding {text tower component: vectors [n, D]}
    named `token`, in `fmt` (FORMATS): A1111's one file ({"emb_params": ...}; SDXL's {"clip_l": ..., "clip_g": ...}),
    diffusers' {token: vectors} (SDXL: a file per tower, the second's suffix "_2", as diffusers' SDXL example writes
    learned_embeds_2)."""
    if fmt == "diffusers":
        return {"" if tower == "text_encoder" else "_2": {token: v} for tower, v in vectors.items()}
    if len(vectors) == 1:
        return {"": {"emb_params": vectors["text_encoder"]}}
    return {"": {name: vectors[tower] for name, tower in TOWERS.items() if name.startswith("clip_")}}
