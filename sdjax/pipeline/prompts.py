"""Prompt encoding: prompts per image, token chunks with their weights, and the text towers' states.

A prompt becomes K chunks of the tower's context length (A1111's long prompts; sdjax.text.prompt_weighting), every
prompt and negative prompt of a call the same K; each chunk goes through the text tower(s) as one row, the rows'
states are concatenated per image [B, K*L, D] and weighted (A1111's emphasis). SDXL's towers are chunked alike,
their states concatenated along the width, the pooled text from the first chunk.
"""
import jax.numpy as jnp
import numpy as np

from sdjax.models.clip_text import sdxl_text
from sdjax.text.prompt_weighting import CHUNK_IDS, batch_chunks, prompt_chunks, weight_states


def as_list(x, name):
    """A string or a non-empty list of strings -> list of strings."""
    if isinstance(x, str):
        return [x]
    if not x or not all(isinstance(p, str) for p in x):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {x!r}")
    return list(x)


def prompt_lists(prompt, negative_prompt, per_prompt):
    """(prompts, negative prompts), one per image: each prompt repeated `per_prompt` times."""
    if not isinstance(per_prompt, int) or per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {per_prompt!r}")
    given = as_list(prompt, "prompt")
    negatives = [""] if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
    negatives = negatives * len(given) if len(negatives) == 1 else negatives
    if len(negatives) != len(given):
        raise ValueError(f"{len(negatives)} negative prompts for {len(given)} prompts")
    repeat = lambda items: [x for x in items for _ in range(per_prompt)]  # noqa: E731
    return repeat(given), repeat(negatives)


def pad_rows(items, pad):
    """A list of per-image prompts with `pad` copies of its last appended (the batch padded to the device count)."""
    return items + items[-1:] * pad


def token_chunks(tokenizer, texts, length, weighting, chunks=1):
    """(ids int32 [B, K, length], weights float32 [B, K, length]) of `texts`, K = `chunks` or the most any text
    needs (`prompt_weighting.batch_chunks`)."""
    if length != CHUNK_IDS:
        raise ValueError(f"prompts are chunked for text towers of {CHUNK_IDS} positions; this one has {length}")
    return batch_chunks(tokenizer, texts, weighting, chunks)


def chunk_count(tokenizer, texts, weighting):
    """The number of chunks the longest of `texts` needs."""
    return max(len(prompt_chunks(tokenizer, t, weighting)[0]) for t in texts)


def encoder(towers, xl):
    """The text states of token chunks: fn(params {tower: params}, ids [(b, K, L)] per tower, weights [b, K, L]
    or None, clip_skip) -> text [b, K*L, D] (SDXL: (text, pooled [b, P]))."""
    def fn(p, ids, weights, clip_skip):
        b, k, length = ids[0].shape
        rows = lambda i: i.reshape(b * k, length)  # noqa: E731
        if xl:
            outs = [tower.apply({"params": p[name]}, rows(i)) for (name, tower), i in zip(towers, ids)]
            text, pooled = sdxl_text(outs, clip_skip)
            widths = [o["hidden_states"][-1].shape[-1] for o in outs]
        else:
            (name, tower), = towers
            text = tower.apply({"params": p[name]}, rows(ids[0]), clip_skip)["last_hidden_state"]
            widths = [text.shape[-1]]
        text = text.reshape(b, k * length, -1)
        if weights is not None:  # each tower's states weighted on their own, as A1111 does
            w = weights.reshape(b, k * length)
            parts = jnp.split(text, np.cumsum(widths)[:-1], -1)
            text = jnp.concatenate([weight_states(s, w) for s in parts], -1)
        return (text, pooled.reshape(b, k, -1)[:, 0]) if xl else text
    return fn
