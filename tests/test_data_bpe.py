"""A BPE vocabulary trained on captions loads as a CLIPTokenizer and round-trips text."""
import json

import numpy as np
import pytest
import transformers

from sdjax.data import synthetic_shapes as shapes
from sdjax.text import bpe
from sdjax.text.tokenizer import load_tokenizer, tokenize

EXTRA = ["Hello, World! It's 2024 — naïve café ☃ 😀", "tabs\tand   spaces", "a photo of a cat on a mat"]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    return [shapes.caption(shapes.sample_spec(rng, "train")) for _ in range(300)] + EXTRA


@pytest.fixture(scope="module")
def folder(corpus, tmp_path_factory):
    return bpe.train_tokenizer(corpus, str(tmp_path_factory.mktemp("bpe")), vocab_size=1000)


def test_loads_as_clip_tokenizer(folder):
    tok = transformers.CLIPTokenizer.from_pretrained(folder)
    vocab = json.load(open(f"{folder}/vocab.json", encoding="utf-8"))
    merges = open(f"{folder}/merges.txt", encoding="utf-8").read().splitlines()[1:]
    assert sorted(vocab.values()) == list(range(len(vocab))) == list(range(len(tok)))
    assert len(vocab) == bpe.NUM_BASE_TOKENS + len(merges) <= 1000
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == "<|endoftext|>"


def test_round_trip(folder, corpus):
    tok = load_tokenizer(folder)
    ids, _ = tokenize(tok, corpus)
    assert ids.min() >= 0 and ids.max() < len(tok)
    for text, row in zip(corpus, ids):
        encoded = tok(text).input_ids
        decoded = tok.decode(encoded, skip_special_tokens=True)
        assert tok(decoded).input_ids == encoded  # punctuation decodes spaced out, ids agree
        if text != EXTRA[0]:
            assert decoded == " ".join(text.lower().split())
        np.testing.assert_array_equal(row[:len(encoded)], encoded)
    assert tok.unk_token_id not in tok("zebra Ωmega 🦓").input_ids[1:-1]  # byte-level: no unknowns


def test_corpus_words_are_single_tokens(folder, corpus):
    tok = load_tokenizer(folder)
    for text in corpus[:300]:
        assert tok.convert_ids_to_tokens(tok(text).input_ids[1:-1]) == [w + "</w>" for w in text.split()]


def test_vocab_size_caps_the_merges(corpus, tmp_path):
    merges = bpe.train_merges(corpus, 530)
    assert len(merges) == 530 - bpe.NUM_BASE_TOKENS
    assert merges == bpe.train_merges(corpus, 1000)[:len(merges)]  # a prefix of the bigger vocabulary
    tok = load_tokenizer(bpe.train_tokenizer(corpus, str(tmp_path), vocab_size=530))
    assert len(tok) == 530
    text = corpus[0]
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text
    with pytest.raises(ValueError):
        bpe.train_merges(corpus, 300)
