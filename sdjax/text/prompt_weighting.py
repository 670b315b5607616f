"""Prompts as AUTOMATIC1111 reads them: the emphasis syntax, 75-token chunks, and the "Original" emphasis math.

parse_emphasis: text -> [(fragment, weight)]; prompt_chunks: text -> ids, weights [K, 77] (host side, numpy);
weight_states: the encoded chunks' states scaled by their weights (numpy or jax arrays).
"""
import re

import numpy as np

CHUNK = 75  # prompt tokens per chunk; a chunk is encoded as BOS + 75 tokens + EOS = 77
CHUNK_IDS = CHUNK + 2
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default: a comma this close to a full chunk's end cuts it
BREAK = ("BREAK", -1.0)  # parse_emphasis's chunk break (A1111's ["BREAK", -1])
ROUND, SQUARE = 1.1, 1 / 1.1

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|  # escaped brackets and backslash; a lone backslash is dropped
\(|\[|                       # openers
:\s*([+-]?[.\d]+)\s*\)|      # ":weight)" closes a round bracket
\)|]|                        # closers
[^\\()\[\]:]+|               # text
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text):
    """A1111's emphasis syntax: str -> [(fragment, weight)], BREAK markers where a chunk must end.

    (x) x1.1, [x] x(1/1.1), (x:w) xw; nested brackets multiply. \\( \\) \\[ \\] \\\\ are the literal characters, a
    lone backslash is dropped. A bracket never closed weighs from where it opened to the end of the prompt; a closer
    never opened is text. Neighbours of equal weight merge; an empty prompt is [("", 1.0)]. As in A1111, a BREAK
    inside brackets has its weight multiplied too, and is then no break but the word "BREAK" of that weight.
    """
    res, rounds, squares = [], [], []

    def multiply(start, factor):
        for item in res[start:]:
            item[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            rounds.append(len(res))
        elif piece == "[":
            squares.append(len(res))
        elif weight is not None and rounds:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"prompt weight {weight!r} is not a number in {text!r}") from None
            multiply(rounds.pop(), factor)
        elif piece == ")" and rounds:
            multiply(rounds.pop(), ROUND)
        elif piece == "]" and squares:
            multiply(squares.pop(), SQUARE)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i:
                    res.append(list(BREAK))
                res.append([part, 1.0])
    for start in rounds:
        multiply(start, ROUND)
    for start in squares:
        multiply(start, SQUARE)
    merged = res[:1] or [["", 1.0]]
    for item in res[1:]:  # A1111 merges on equal weights, BREAK markers included
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(fragment, weight) for fragment, weight in merged]


def prompt_chunks(tokenizer, text, weighting=True):
    """A prompt -> (ids int32 [K, 77], weights float32 [K, 77]), chunked as A1111's tokenize_line.

    Fragments are tokenized apart; every 75 tokens a chunk ends, earlier after a comma among its last 20 tokens
    (the tokens after it move to the next chunk); BREAK ends a chunk. Each chunk is BOS + tokens + EOS, padded to 77
    with the tokenizer's pad token (EOS for SD 1.x's, "!" for OpenCLIP's, as A1111 pads each), weight 1.0 on
    BOS/EOS/padding. An empty prompt is one chunk. weighting=False reads the text literally (A1111's emphasis "None":
    brackets and BREAK are text, weights 1).
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt_chunks: the prompt must be a str, got {text!r}")
    parsed = parse_emphasis(text) if weighting else [(text, 1.0)]
    tokenized = tokenizer([t for t, _ in parsed], add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma = tokenizer.get_vocab().get(",</w>")
    chunks, tokens, weights, last_comma = [], [], [], -1

    def close():
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for ids, item in zip(tokenized, parsed):
        if item == BREAK:
            close()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                carried = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = carried
            if len(tokens) == CHUNK:
                close()
            tokens.append(token)
            weights.append(item[1])
    if tokens or not chunks:
        close()
    ids = np.full((len(chunks), CHUNK_IDS), tokenizer.pad_token_id, np.int32)
    out = np.ones((len(chunks), CHUNK_IDS), np.float32)
    for row, (chunk, chunk_weights) in enumerate(chunks):
        ids[row, :len(chunk) + 2] = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        out[row, 1:len(chunk) + 1] = chunk_weights
    return ids, out


def pad_to_chunks(tokenizer, ids, weights, k):
    """ids, weights [K, 77] -> [k, 77], empty-prompt chunks appended (A1111's "Pad prompt/negative prompt", compel's
    padding of the shorter conditioning)."""
    if len(ids) > k:
        raise ValueError(f"pad_to_chunks: the prompt has {len(ids)} chunks, more than k={k}")
    empty_ids, empty_weights = prompt_chunks(tokenizer, "")
    n = k - len(ids)
    return (np.concatenate([ids, np.repeat(empty_ids, n, 0)]),
            np.concatenate([weights, np.repeat(empty_weights, n, 0)]))


def batch_chunks(tokenizer, prompts, weighting=True, k=1):
    """B prompts -> (ids int32 [B, K, 77], weights float32 [B, K, 77]), K = max(k, the longest prompt's chunks),
    the shorter prompts padded with empty-prompt chunks. Pass the prompts and their negatives together to give
    both the same K."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"batch_chunks: prompts must be a list of str, got {prompts!r}")
    rows = [prompt_chunks(tokenizer, p, weighting) for p in prompts]
    k = max([k] + [len(ids) for ids, _ in rows])
    rows = [pad_to_chunks(tokenizer, ids, weights, k) for ids, weights in rows]
    return np.stack([ids for ids, _ in rows]), np.stack([w for _, w in rows])


def weight_states(states, weights):
    """A1111's "Original" emphasis. states [B, K*77, D], weights [B, K*77] -> [B, K*77, D] in states' dtype.

    Each token's state times its weight, then each chunk of each prompt rescaled so that its mean over [77, D] is the
    unweighted chunk's (A1111 rescales per chunk: it encodes and weights one chunk at a time, one prompt at a time).
    Weights all 1 give the states back exactly. numpy or jax arrays.
    """
    b, n, d = states.shape
    if n % CHUNK_IDS or weights.shape != (b, n):
        raise ValueError(f"weight_states: states {states.shape} and weights {weights.shape} are not "
                         f"[B, K*{CHUNK_IDS}, D] and [B, K*{CHUNK_IDS}]")
    z = states.reshape(b, n // CHUNK_IDS, CHUNK_IDS, d).astype(np.float32)
    weighted = z * weights.reshape(b, n // CHUNK_IDS, CHUNK_IDS, 1).astype(np.float32)
    scale = z.mean(axis=(2, 3), keepdims=True) / weighted.mean(axis=(2, 3), keepdims=True)
    return (weighted * scale).reshape(b, n, d).astype(states.dtype)
