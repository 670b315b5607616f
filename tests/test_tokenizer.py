"""Tokenizer wrapper vs transformers' CLIPTokenizer on a tiny hand-written CLIP BPE vocabulary."""
import json
import string

import numpy as np
import pytest
import transformers

from sdjax.text.tokenizer import load_tokenizer, tokenize

MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "t o</w>", "pho to</w>"]
PROMPTS = ["a photo of a cat", "A  DOG!", "", "cat " * 80]


def tokenizer_vocab():
    """CLIP-format vocabulary: bytes alone and word-final (`</w>`), merges, then specials."""
    chars = "!" + string.ascii_lowercase
    tokens = list(chars) + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in MERGES]
    return {t: i for i, t in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}


@pytest.fixture(params=["sd1", "sd2"])
def tokenizer_folder(request, tmp_path):
    """A tokenizer folder; the sd2 flavour pads with "!" as SD 2.x's tokenizer_config does."""
    (tmp_path / "vocab.json").write_text(json.dumps(tokenizer_vocab()))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    if request.param == "sd2":
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    return tmp_path


def test_tokenize_matches_clip_tokenizer(tokenizer_folder):
    pad = "!" if (tokenizer_folder / "tokenizer_config.json").exists() else "<|endoftext|>"
    ref = transformers.CLIPTokenizer(str(tokenizer_folder / "vocab.json"),
                                     str(tokenizer_folder / "merges.txt"), pad_token=pad)
    ids, truncated = tokenize(load_tokenizer(str(tokenizer_folder)), PROMPTS)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
    np.testing.assert_array_equal(ids, np.asarray(want))
    assert truncated


def test_tokenize_by_hand(tokenizer_folder):
    v = tokenizer_vocab()
    pad = v["!"] if (tokenizer_folder / "tokenizer_config.json").exists() else v["<|endoftext|>"]
    ids, truncated = tokenize(load_tokenizer(str(tokenizer_folder)), ["a photo of a cat", "cat " * 80])
    words = ["<|startoftext|>", "a</w>", "photo</w>", "o", "f</w>", "a</w>", "cat</w>", "<|endoftext|>"]
    np.testing.assert_array_equal(ids[0], [v[w] for w in words] + [pad] * (77 - len(words)))
    np.testing.assert_array_equal(
        ids[1], [v["<|startoftext|>"]] + [v["cat</w>"]] * 75 + [v["<|endoftext|>"]])
    assert truncated


def test_tokenize_truncation_flag(tokenizer_folder):
    tok = load_tokenizer(str(tokenizer_folder))
    assert not tokenize(tok, ["a photo of a cat", "cat " * 75])[1]  # 75 words + 2 specials fit
    assert tokenize(tok, ["a photo of a cat", "cat " * 76])[1]
    assert tokenize(tok, ["a photo of a cat"], max_length=6)[1]


def test_load_tokenizer_names_missing_file(tokenizer_folder):
    (tokenizer_folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(str(tokenizer_folder))


def test_tokenize_rejects_bare_string(tokenizer_folder):
    with pytest.raises(TypeError, match="list of str"):
        tokenize(load_tokenizer(str(tokenizer_folder)), "a cat")
