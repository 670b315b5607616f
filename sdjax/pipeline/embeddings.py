"""Textual-inversion embeddings in a pipeline's text towers: each vector a new token of the tower's tokenizer and a
new row of its token embedding table, as diffusers' load_textual_inversion adds them; an embedding of n vectors is
the tokens `name`, `name_1`, ... `name_{n-1}`, which `expand` writes for `name` in a prompt (diffusers' and A1111's
multi-vector embeddings). The sampling loop does not change; the text encoder compiles once more, for the longer
table. Training adds its placeholder's tokens with the same functions (sdjax.train.ldm.textual_inversion)."""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.models.clip_text import TOKEN_TABLE
from sdjax.weights.embedding_files import read_embedding


def vector_tokens(token, count):
    """The tokens of an embedding of `count` vectors written `token`: token, token_1, ... (diffusers' names)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def check_new_tokens(where, tokens, tower, tokenizer):
    """ValueError `where: ...` when one of `tokens` is in the vocabulary of `tower`'s `tokenizer` already."""
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"{where}: the token {taken[0]!r} is in {tower}'s vocabulary already; give another token")


def add_tokens(tokens, module, tokenizer, rows):
    """Add `tokens` to `tokenizer`: (their ids, the text tower `module` with a vocabulary for them, whose token table
    of `rows` rows grows to `module.vocab_size` rows, see `with_rows`)."""
    tokenizer.add_tokens(tokens)
    return tokenizer.convert_tokens_to_ids(tokens), module.clone(vocab_size=max(len(tokenizer), rows))


def with_rows(table, ids, vectors, size):
    """The token table [V, D] grown to [size, D] (zero rows), with `vectors` [n, D] at the rows `ids`."""
    grown = jnp.pad(table, ((0, size - table.shape[0]), (0, 0)))
    return grown.at[np.asarray(ids)].set(jnp.asarray(vectors, table.dtype))


def expand(tokenizer, text):
    """`text` with each multi-vector embedding's token `name` written as all its tokens, `name name_1 ...`: the
    tokens `tokenizer` has added (as diffusers' maybe_convert_prompt)."""
    added = tokenizer.get_added_vocab()
    for token in set(tokenizer.tokenize(text)) & set(added):
        count = next(i for i in itertools.count(1) if f"{token}_{i}" not in added)
        if count > 1:
            text = text.replace(token, " ".join(vector_tokens(token, count)))
    return text


class Embeddings:
    """The embeddings loaded into `params` ({component: params tree}, changed in place) and `conditioning`'s towers
    (their tokenizers get the tokens, their modules the longer vocabulary)."""

    def __init__(self, params, conditioning):
        self.params, self.conditioning = params, conditioning

    def load(self, path, token=None):
        """Add the embedding of the file at `path` under `token` (default: the file's stem, as A1111); its token."""
        vectors = read_embedding(path)
        token = os.path.splitext(os.path.basename(path))[0] if token is None else token
        towers = self.conditioning.towers
        have = sorted(name for name, _, _ in towers)
        if sorted(vectors) != have:
            raise ValueError(f"{path}: an embedding for {sorted(vectors)}; this model's text towers are {have} "
                             "(SDXL embeddings carry clip_l and clip_g)")
        names = vector_tokens(token, len(next(iter(vectors.values()))))
        for name, module, tokenizer in towers:
            table = self._table(name)
            if vectors[name].shape[1] != table.shape[1]:
                raise ValueError(f"{path}: vectors of width {vectors[name].shape[1]} for {name}, whose tokens are "
                                 f"{table.shape[1]} wide: an embedding of another model?")
            check_new_tokens(path, names, name, tokenizer)
        for i, (name, module, tokenizer) in enumerate(towers):
            table = self._table(name)
            ids, module = add_tokens(names, module, tokenizer, table.shape[0])
            self._table(name, jax.device_put(with_rows(table, ids, vectors[name], module.vocab_size), table.sharding))
            towers[i] = (name, module, tokenizer)
        return token

    def expand(self, text):
        """`text` with each multi-vector embedding's name written as all its tokens."""
        return expand(self.conditioning.towers[0][2], text)

    def _table(self, component, value=None):
        """The token embedding table of `component`'s params; with `value`: set it."""
        node = self.params[component]
        for key in TOKEN_TABLE[:-1]:
            node = node[key]
        if value is not None:
            node[TOKEN_TABLE[-1]] = value
        return node[TOKEN_TABLE[-1]]
