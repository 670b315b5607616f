"""Prompt emphasis, chunking and weighting (sdjax.text.prompt_weighting) against the closed form, and long
unweighted prompts against compel encoding the same saved folder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.text.prompt_weighting import (BREAK, CHUNK, batch_chunks, pad_to_chunks, parse_emphasis, prompt_chunks,
                                         weight_states)
from sdjax.text.tokenizer import tokenize

R, S = 1.1, 1 / 1.1
PARSED = {
    "": [("", 1.0)],
    "()": [("", 1.0)],
    "normal text": [("normal text", 1.0)],
    "an (important) word": [("an ", 1.0), ("important", R), (" word", 1.0)],
    "a ((b)) c": [("a ", 1.0), ("b", R * R), (" c", 1.0)],
    "a [b] [[c]]": [("a ", 1.0), ("b", S), (" ", 1.0), ("c", S * S)],
    "(x:1.5) y": [("x", 1.5), (" y", 1.0)],
    "( x : 0.5 )": [(" x ", 0.5)],
    "((x:1.5))": [("x", 1.5 * R)],
    "[(x:1.5)]": [("x", 1.5 * S)],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [  # A1111's own example
        ("a ", 1.0), ("house", 1.3 * R * R), (" ", R), ("on", 1.0), (" a ", R), ("hill", 0.5 * R),
        (", sun, ", R), ("sky", R ** 4), (".", R)],
    "(unnecessary)(parens)": [("unnecessaryparens", R)],  # equal neighbours merge
    # unbalanced: an opener weighs to the end, a closer never opened is text, ":w" without "(" is text
    "a (b c": [("a ", 1.0), ("b c", R)],
    "a [b (c": [("a ", 1.0), ("b ", S), ("c", R * S)],
    "a) b] c": [("a) b] c", 1.0)],
    "x:1.5) y": [("x:1.5) y", 1.0)],
    "(x:1.5": [("x:1.5", R)],
    # escapes; a lone backslash is dropped
    r"\(literal\] \\ (x)": [(r"(literal] \ ", 1.0), ("x", R)],
    "a\\b": [("ab", 1.0)],
    # BREAK: uppercase, a separate word; inside brackets it is weighted and no longer a break (as A1111)
    "a BREAK b": [("a", 1.0), BREAK, ("b", 1.0)],
    "BREAK a": [("", 1.0), BREAK, ("a", 1.0)],
    "a BREAK": [("a", 1.0), BREAK, ("", 1.0)],
    "a break BREAKfast": [("a break BREAKfast", 1.0)],
    "(a) BREAK (b)": [("a", R), ("", 1.0), BREAK, ("", 1.0), ("b", R)],
    "(a BREAK b)": [("a", R), ("BREAK", -R), ("b", R)],
}


@pytest.mark.parametrize("text", PARSED)
def test_parse_emphasis(text):
    got = parse_emphasis(text)
    want = PARSED[text]
    assert [f for f, _ in got] == [f for f, _ in want]
    np.testing.assert_allclose([w for _, w in got], [w for _, w in want], rtol=1e-12)


def test_parse_emphasis_bad_weight():
    with pytest.raises(ValueError, match="1.2.3"):
        parse_emphasis("(a:1.2.3)")


def _one(tokenizer, word):
    ids = tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1, word
    return ids[0]


def _chunk(tokenizer, tokens, weights=None):
    """The expected 77 ids and weights of a chunk of `tokens`."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [bos, *tokens, eos] + [pad] * (CHUNK - len(tokens))
    w = [1.0, *(weights or [1.0] * len(tokens)), 1.0] + [1.0] * (CHUNK - len(tokens))
    return ids, w


def _check(tokenizer, text, chunks, weighting=True):
    ids, weights = prompt_chunks(tokenizer, text, weighting)
    want = [_chunk(tokenizer, *c) if isinstance(c, tuple) else _chunk(tokenizer, c) for c in chunks]
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    np.testing.assert_array_equal(ids, [i for i, _ in want])
    np.testing.assert_allclose(weights, [w for _, w in want], rtol=1e-7)


def test_chunk_lengths(tokenizer):
    cat = _one(tokenizer, "cat")
    _check(tokenizer, "", [[]])
    _check(tokenizer, "cat " * 75, [[cat] * 75])
    _check(tokenizer, "cat " * 76, [[cat] * 75, [cat]])
    _check(tokenizer, "cat " * 150, [[cat] * 75, [cat] * 75])


def test_comma_backtracking(tokenizer):
    cat, comma = _one(tokenizer, "cat"), _one(tokenizer, ",")
    # a comma among a full chunk's last 20 tokens ends the chunk; the tokens after it move on
    _check(tokenizer, "cat " * 70 + ", " + "cat " * 10, [[cat] * 70 + [comma], [cat] * 10])
    _check(tokenizer, "cat " * 55 + ", " + "cat " * 30, [[cat] * 55 + [comma], [cat] * 30])
    # 21 tokens back: too far, the chunk is cut at 75
    _check(tokenizer, "cat " * 54 + ", " + "cat " * 30, [[cat] * 54 + [comma] + [cat] * 20, [cat] * 10])
    # the last comma counts; one that ends the chunk leaves nothing to move
    _check(tokenizer, "cat " * 60 + ", cat , " + "cat " * 20,
           [[cat] * 60 + [comma, cat, comma], [cat] * 20])
    _check(tokenizer, "cat " * 74 + ", " + "cat " * 3, [[cat] * 74 + [comma], [cat] * 3])
    # a prompt that ends at 75 tokens is not cut; the moved tokens keep their weights
    _check(tokenizer, "cat " * 70 + ", " + "cat " * 4, [[cat] * 70 + [comma] + [cat] * 4])
    _check(tokenizer, "cat " * 70 + ", (cat:1.5) " + "cat " * 9,
           [([cat] * 70 + [comma], [1.0] * 71), ([cat] * 10, [1.5] + [1.0] * 9)])
    # weighting=False still back-tracks (A1111's emphasis "None")
    _check(tokenizer, "cat " * 70 + ", " + "cat " * 10, [[cat] * 70 + [comma], [cat] * 10], weighting=False)


def test_break(tokenizer):
    cat, dog, brk = _one(tokenizer, "cat"), _one(tokenizer, "dog"), _one(tokenizer, "BREAK")
    _check(tokenizer, "cat BREAK dog", [[cat], [dog]])
    _check(tokenizer, "BREAK cat", [[], [cat]])  # as A1111: a leading BREAK ends an empty chunk
    _check(tokenizer, "cat BREAK", [[cat]])
    _check(tokenizer, "cat BREAK BREAK dog", [[cat], [], [dog]])
    _check(tokenizer, "cat " * 75 + "BREAK dog", [[cat] * 75, [dog]])  # a full chunk is not closed twice
    _check(tokenizer, "cat BREAK dog", [[cat, brk, dog]], weighting=False)
    _check(tokenizer, "(cat BREAK dog)", [([cat, brk, dog], [R, -R, R])])


def test_weights_land_on_their_tokens(tokenizer):
    a, cat, dog, on = (_one(tokenizer, w) for w in ("a", "cat", "dog", "on"))
    _check(tokenizer, "a (cat:1.5) on [dog]", [([a, cat, on, dog], [1.0, 1.5, 1.0, S])])
    _check(tokenizer, "a ((cat on)) dog", [([a, cat, on, dog], [1.0, R * R, R * R, 1.0])])
    # brackets read literally without weighting
    ids, weights = prompt_chunks(tokenizer, "a (cat:1.5)", weighting=False)
    tokens = tokenizer("a (cat:1.5)", add_special_tokens=False).input_ids
    _check(tokenizer, "a (cat:1.5)", [tokens], weighting=False)
    assert len(tokens) > 2 and np.all(weights == 1)


def test_pad_token_and_batch(tokenizer, tmp_path):
    import transformers
    from sdjax.text.clip_vocab import write_clip_tokenizer
    open_clip = transformers.CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path), "!"))
    assert open_clip.pad_token_id == 0  # SD 2.x / SDXL's second tokenizer: "!" after the first EOS
    cat = _one(open_clip, "cat")
    _check(open_clip, "cat " * 76, [[cat] * 75, [cat]])
    ids, _ = prompt_chunks(open_clip, "")
    assert list(ids[0, :3]) == [open_clip.bos_token_id, open_clip.eos_token_id, 0]

    ids, weights = batch_chunks(tokenizer, ["cat " * 80, "(dog)"])  # a prompt and its negative
    assert ids.shape == weights.shape == (2, 2, 77)
    empty_ids, empty_weights = prompt_chunks(tokenizer, "")
    np.testing.assert_array_equal(ids[1, 1], empty_ids[0])
    np.testing.assert_array_equal(weights[1, 1], empty_weights[0])
    np.testing.assert_array_equal(ids[1, :1], prompt_chunks(tokenizer, "(dog)")[0])
    assert batch_chunks(tokenizer, ["cat"], k=3)[0].shape == (1, 3, 77)
    with pytest.raises(ValueError, match="k=1"):
        pad_to_chunks(tokenizer, ids[0], weights[0], 1)


def test_weight_states_closed_form():
    states = np.ones((1, 2 * 77, 3), np.float32)
    states[0, 77:] = np.arange(77 * 3, dtype=np.float32).reshape(77, 3)
    weights = np.ones((1, 2 * 77), np.float32)
    weights[0, 5] = 2.0  # chunk 0: mean 1 -> (76 + 2) / 77, rescaled by 77 / 78
    want = states.copy()
    want[0, :77] = 77 / 78
    want[0, 5] = 2 * 77 / 78
    for xp in (np, jnp):  # chunk 1 (weights 1) comes back exactly
        got = np.asarray(weight_states(xp.asarray(states), xp.asarray(weights)))
        np.testing.assert_allclose(got, want, rtol=1e-6)
        np.testing.assert_array_equal(got[0, 77:], states[0, 77:])
    with pytest.raises(ValueError, match="weights"):
        weight_states(states[:, :100], weights[:, :100])


# ---- against compel (the same saved folder, its torch text encoder) ----

WORDS = ("red green blue cat dog house tree river mountain sky cloud sun moon star light dark old new big small "
         "water fire stone wood glass gold silver city road bridge tower castle garden forest field flower bird "
         "fish horse king queen girl boy man woman child winter summer spring autumn night morning evening rain "
         "snow storm wind sea lake island desert valley hill door window wall roof book table chair lamp").split()


def _prompt(tokenizer, n):
    """A prompt of n tokens without commas."""
    words = [WORDS[(7 * i) % len(WORDS)] for i in range(n)]
    assert len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) == n
    return " ".join(words)


@pytest.fixture(scope="module")
def encoder(torch_folder):
    """(our text encoder: ids [K, 77] -> states [1, K*77, D], the torch pipeline)."""
    from sdjax.weights.pretrained import load_pretrained
    pipe, folder = torch_folder
    pre = load_pretrained(folder)
    module, params = pre.modules["text_encoder"], pre.params["text_encoder"]
    chunk = jax.jit(lambda ids: module.apply({"params": params}, ids)["last_hidden_state"])
    encode = lambda ids: np.concatenate([np.asarray(chunk(row[None])) for row in ids], 1)  # noqa: E731
    return encode, pipe


@pytest.mark.parametrize("n", [0, 40, 75, 76, 200])  # 1, 1, 1, 2 and 3 chunks
def test_long_prompts_match_compel(encoder, n):
    from compel import Compel, SplitLongTextMode
    encode, pipe = encoder
    text = _prompt(pipe.tokenizer, n)
    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False,
                    split_long_text_mode=SplitLongTextMode.BRUTAL)
    with torch.no_grad():
        want = compel(text).numpy()
    ids, weights = prompt_chunks(pipe.tokenizer, text, weighting=False)
    k = max(1, -(-n // CHUNK))
    assert ids.shape == (k, 77) and want.shape[:2] == (1, k * 77)
    got = weight_states(encode(ids), weights.reshape(1, -1))
    err = np.abs(got - want).max()
    assert err < 1e-5
    if k == 1:
        return
    # the effect: what truncating to 77 tokens (and padding with empty chunks) or 74-token chunks would give
    np.testing.assert_array_equal(tokenize(pipe.tokenizer, [text])[0][0], ids[0])  # diffusers truncates to chunk 0
    truncated = encode(pad_to_chunks(pipe.tokenizer, ids[:1], weights[:1], k)[0])
    tokens = pipe.tokenizer(text, add_special_tokens=False).input_ids
    bos, eos = pipe.tokenizer.bos_token_id, pipe.tokenizer.eos_token_id
    off = [[bos, *tokens[i:i + 74], eos] + [eos] * 77 for i in range(0, n, 74)]
    off_by_one = encode(np.asarray([row[:77] for row in off], np.int32)[:k])
    assert np.abs(truncated - want).max() > 1e3 * err
    assert np.abs(off_by_one - want).max() > 1e3 * err


def test_weight_changes_only_its_tokens(encoder, tokenizer):
    encode, _ = encoder
    plain_ids, plain_w = prompt_chunks(tokenizer, "a cat on a dog")
    ids, w = prompt_chunks(tokenizer, "a (cat:1.5) on a dog")
    np.testing.assert_array_equal(ids, plain_ids)  # the brackets leave the tokens as they were
    states = encode(ids)
    weighted = states * w.reshape(1, -1, 1)
    changed = np.nonzero(np.any(weighted != states * plain_w.reshape(1, -1, 1), axis=-1)[0])[0]
    assert list(changed) == [2]  # BOS, a, cat
    # after the rescale, every token by the chunk's common factor, the weighted one 1.5 times more
    ratio = weight_states(states, w.reshape(1, -1)) / states
    scale = states.mean() / weighted.mean()
    np.testing.assert_allclose(np.delete(ratio[0], 2, 0), scale, rtol=1e-5)
    np.testing.assert_allclose(ratio[0, 2], 1.5 * scale, rtol=1e-5)
    np.testing.assert_array_equal(weight_states(states, plain_w.reshape(1, -1)), states)
