"""Textual-inversion embeddings in a pipeline's text towers: each vector a new token of the tower's tokenizer and a
new row of its token embedding table, as diffusers' load_textual_inversion adds them; an embedding of n vectors is
the tokens `name`, `name_1`, ... `name_{n-1}`, which `expand` writes for `name` in a prompt (diffusers' and A1111's
multi-vector embeddings). The sampling loop does not change; the text encoder compiles once more, for the longer
table."""
import os

import jax
import numpy as np

from sdjax.models.clip_text import TOKEN_TABLE
from sdjax.weights.embedding_files import read_embedding


class Embeddings:
    """The embeddings loaded into `params` ({component: params tree}, changed in place) and `conditioning`'s towers
    (their tokenizers get the tokens, their modules the longer vocabulary)."""

    def __init__(self, params, conditioning):
        self.params, self.conditioning = params, conditioning
        self.tokens = {}  # name -> its tokens, one per vector

    def load(self, path, token=None):
        """Add the embedding of the file at `path` under `token` (default: the file's stem, as A1111); its token."""
        vectors = read_embedding(path)
        token = os.path.splitext(os.path.basename(path))[0] if token is None else token
        towers = self.conditioning.towers
        have = sorted(name for name, _, _ in towers)
        if sorted(vectors) != have:
            raise ValueError(f"{path}: an embedding for {sorted(vectors)}; this model's text towers are {have} "
                             "(SDXL embeddings carry clip_l and clip_g)")
        count = len(next(iter(vectors.values())))
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        for name, module, tokenizer in towers:
            table = self._table(name)
            if vectors[name].shape[1] != table.shape[1]:
                raise ValueError(f"{path}: vectors of width {vectors[name].shape[1]} for {name}, whose tokens are "
                                 f"{table.shape[1]} wide: an embedding of another model?")
            taken = [n for n in names if n in tokenizer.get_vocab()]
            if taken:
                raise ValueError(f"{path}: the token {taken[0]!r} is in {name}'s vocabulary already; give another "
                                 "token")
        for i, (name, module, tokenizer) in enumerate(towers):
            tokenizer.add_tokens(names)
            ids = tokenizer.convert_tokens_to_ids(names)
            table = self._table(name)
            rows = np.zeros((max(len(tokenizer), table.shape[0]), table.shape[1]), table.dtype)
            rows[:table.shape[0]] = np.asarray(table)
            rows[ids] = vectors[name].astype(table.dtype)
            self._table(name, jax.device_put(rows, table.sharding))
            towers[i] = (name, module.clone(vocab_size=len(rows)), tokenizer)
        self.tokens[token] = names
        return token

    def expand(self, text):
        """`text` with each multi-vector embedding's name written as all its tokens."""
        for token, names in self.tokens.items():
            if len(names) > 1:
                text = text.replace(token, " ".join(names))
        return text

    def _table(self, component, value=None):
        """The token embedding table of `component`'s params; with `value`: set it."""
        node = self.params[component]
        for key in TOKEN_TABLE[:-1]:
            node = node[key]
        if value is not None:
            node[TOKEN_TABLE[-1]] = value
        return node[TOKEN_TABLE[-1]]
