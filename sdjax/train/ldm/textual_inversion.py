"""Textual inversion training (`config.textual_inversion`): the embedding of a new token, the placeholder, learned
in each text tower (SDXL: both, as A1111's and diffusers' SDXL embeddings hold), everything else frozen.

The placeholder's n vectors are the tokens `placeholder`, `placeholder_1`, ... added to the tokenizers as loading
an embedding adds them (sdjax.pipeline.embeddings), and captions write `placeholder` for all of them. The trained
params are those rows only, {tower: [n, D]} under COMPONENT, started from the initializer token's embedding (as
diffusers' textual_inversion example): the optimizer holds nothing else, and the towers' token tables stay frozen;
`model_params` puts the rows into the tables where the models read them (the step, sampling, export).
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax.models.clip_text import TOKEN_TABLE
from sdjax.pipeline.embeddings import add_tokens, check_new_tokens, expand, vector_tokens, with_rows
from sdjax.train.config import require
from sdjax.weights.diffusers import TOKENIZERS

COMPONENT = "textual_inversion"  # the trained rows among a run's params: {text tower component: float32 [n, D]}


def default_config():
    """The `config.textual_inversion` fields, off."""
    return ml_collections.ConfigDict(dict(
        placeholder="",   # the new token captions write for what is learned, e.g. "<cat-toy>"; "": off
        initializer="",   # one token whose embedding the vectors start from, e.g. "toy"
        vectors=1,        # the vectors (tokens) the placeholder stands for
        template="",      # e.g. "a photo of {}": every caption, the placeholder for {}; "": the data's captions
    ))


def enabled(config):
    return bool(config.get("textual_inversion") and config.textual_inversion.get("placeholder"))


def check(config):
    """ValueError naming the first bad `textual_inversion` field, or a field it cannot go with."""
    ti = config.get("textual_inversion")
    if not ti:
        return
    if not ti.placeholder:
        require(ti.to_dict() == default_config().to_dict(), "textual_inversion.placeholder is empty: give the token "
                "the captions write for what is learned (e.g. '<cat-toy>'), or leave textual_inversion as it is")
        return
    require(ti.placeholder.split() == [ti.placeholder],
            f"textual_inversion.placeholder must be one word, got {ti.placeholder!r}")
    require(bool(ti.initializer), "textual_inversion.initializer is empty: give the token whose embedding the "
                                  "placeholder starts from (e.g. 'toy')")
    require(isinstance(ti.vectors, int) and ti.vectors >= 1,
            f"textual_inversion.vectors must be >= 1, got {ti.vectors!r}")
    require(not ti.template or ti.template.count("{}") == 1,
            f"textual_inversion.template must hold {{}} once (where the placeholder goes), got {ti.template!r}")
    require(not config.get("train_text_encoder"), "textual_inversion trains the placeholder's embedding only: "
                                                  "train_text_encoder must be False")
    require(config.data.get("source") != "cache", "textual_inversion cannot train from the latent cache "
            "(data.source='cache'): its text was encoded without the placeholder; train from the images")


def tower_tokenizers(pre):
    """[(text tower component, its tokenizer)] of a Pretrained."""
    return [(tower, getattr(pre, name)) for tower, name in TOKENIZERS.items() if tower in pre.modules]


def _table(tree):
    for key in TOKEN_TABLE:
        tree = tree[key]
    return tree


def _with_table(tree, table, keys=TOKEN_TABLE):
    """A tower's params with the token table `table` (new dicts along its path; the rest shared)."""
    return table if not keys else {**tree, keys[0]: _with_table(tree[keys[0]], table, keys[1:])}


def initializer_ids(config, pre):
    """{text tower component: the initializer's token id} of a Pretrained (its tokenizers and modules suffice);
    ValueError for a placeholder in a vocabulary already, or an initializer that is not one token."""
    if not enabled(config):
        return {}
    ti, ids = config.textual_inversion, {}
    for tower, tokenizer in tower_tokenizers(pre):
        check_new_tokens("train config: textual_inversion.placeholder", vector_tokens(ti.placeholder, ti.vectors),
                         tower, tokenizer)
        ids[tower] = tokenizer.encode(ti.initializer, add_special_tokens=False)
        require(len(ids[tower]) == 1, f"textual_inversion.initializer {ti.initializer!r} is {len(ids[tower])} tokens "
                f"for {tower}'s tokenizer {tokenizer.convert_ids_to_tokens(ids[tower])}; give one token (e.g. 'toy')")
        ids[tower] = ids[tower][0]
    return ids


def prepare(config, pre):
    """The Pretrained `pre` ready for textual inversion (its tokenizers get the placeholder's tokens): its towers'
    vocabularies grown for the tokens, params[COMPONENT] the initializer's embedding once per vector. ValueError as
    `initializer_ids`. Without textual inversion: `pre`."""
    if not enabled(config):
        return pre
    ti = config.textual_inversion
    initial, modules, rows = initializer_ids(config, pre), dict(pre.modules), {}
    for tower, tokenizer in tower_tokenizers(pre):
        table = _table(pre.params[tower])
        if isinstance(table, jax.ShapeDtypeStruct):  # an abstract model (the memory estimate)
            rows[tower] = jax.ShapeDtypeStruct((ti.vectors, table.shape[1]), jnp.float32)
        else:
            rows[tower] = np.repeat(np.asarray(table[initial[tower]], np.float32)[None], ti.vectors, 0)
        _, modules[tower] = add_tokens(vector_tokens(ti.placeholder, ti.vectors), modules[tower], tokenizer,
                                       table.shape[0])
    return dataclasses.replace(pre, modules=modules, params={**pre.params, COMPONENT: rows})


def model_params(config, pre, params):
    """The models' {component: params} from a run's (frozen and trained, `prepare`d `pre`'s): each text tower's token
    table grown with the trained rows at the placeholder's tokens. Params without COMPONENT: as they are."""
    if COMPONENT not in params:
        return params
    ti = config.textual_inversion
    out = {k: v for k, v in params.items() if k != COMPONENT}
    for tower, tokenizer in tower_tokenizers(pre):
        ids = tokenizer.convert_tokens_to_ids(vector_tokens(ti.placeholder, ti.vectors))
        table = with_rows(_table(out[tower]), ids, params[COMPONENT][tower], pre.modules[tower].vocab_size)
        out[tower] = _with_table(out[tower], table)
    return out


class CaptionTokenizer:
    """A tokenizer that first writes each caption as training reads it: the template's, if any (the placeholder for
    {}), multi-vector placeholders expanded to all their tokens (`pipeline.embeddings.expand`)."""

    def __init__(self, tokenizer, template, placeholder):
        self.tokenizer, self.template, self.placeholder = tokenizer, template, placeholder

    def __call__(self, texts, **kwargs):
        texts = [self.template.replace("{}", self.placeholder) if self.template else t for t in texts]
        return self.tokenizer([expand(self.tokenizer, t) for t in texts], **kwargs)


def caption_tokenizers(config, tokenizers):
    """{batch key: tokenizer} for the input pipeline: `tokenizers`, writing captions for textual inversion."""
    if not enabled(config):
        return tokenizers
    ti = config.textual_inversion
    return {key: CaptionTokenizer(t, ti.template, ti.placeholder) for key, t in tokenizers.items()}
