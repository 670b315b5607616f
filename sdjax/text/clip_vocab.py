"""The standard CLIP BPE vocabulary, built from the bundled merges for single-file checkpoints."""
import gzip
import json
import os
from importlib import resources

NUM_MERGES = 49152 - 256 - 2


def byte_symbols():
    """The 256 printable characters CLIP's byte-level BPE uses for bytes 0..255, in vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def build_vocab(merges):
    """CLIP vocab {token: id}: bytes, bytes + '</w>', one token per merge, then the two specials."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    # A trained BPE may reach one token by two merges; it gets one id (CLIP's own merges have no repeats).
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def write_clip_tokenizer(folder, pad_token="<|endoftext|>"):
    """Write vocab.json, merges.txt and tokenizer_config.json of the CLIP tokenizer into `folder`.

    SD 1.x pads with '<|endoftext|>', SD 2.x (OpenCLIP) with '!' (id 0).
    """
    gz = resources.files("sdjax") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    return write_tokenizer_files(folder, merges, pad_token)


def write_tokenizer_files(folder, merges, pad_token="<|endoftext|>"):
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer_config.json) for BPE `merges` ("a b" strings)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(build_vocab(merges), f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": 77, "pad_token": pad_token, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder
