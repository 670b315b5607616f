"""Train a small CLIP-style byte-level BPE vocabulary on captions; save it as a CLIPTokenizer folder."""
import json

import tokenizers
import transformers

from sdjax.text.clip_vocab import write_tokenizer_files

# 256 byte symbols, the same with '</w>', and <|startoftext|> / <|endoftext|>.
NUM_BASE_TOKENS = 2 * 256 + 2


def train_merges(captions, vocab_size):
    """Iterable of str -> BPE merges ("a b" strings, best first) giving at most `vocab_size` tokens in CLIP layout.

    Text is normalised and split exactly as transformers.CLIPTokenizer does (its own normalizer
    and pre-tokenizer are reused), so the merges apply to the same words at inference.
    """
    if vocab_size <= NUM_BASE_TOKENS:
        raise ValueError(f"bpe: vocab_size must exceed the {NUM_BASE_TOKENS} base tokens, got {vocab_size}")
    clip = transformers.CLIPTokenizer().backend_tokenizer
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = clip.normalizer
    tok.pre_tokenizer = clip.pre_tokenizer
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, end_of_word_suffix="</w>",
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(captions, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    # Merges are in priority order and each only uses tokens made by earlier ones: a prefix is a valid BPE.
    return merges[:vocab_size - NUM_BASE_TOKENS]


def train_tokenizer(captions, folder, vocab_size=4096, pad_token="<|endoftext|>"):
    """Train on `captions` and write vocab.json + merges.txt + tokenizer_config.json into `folder`; returns it.

    The folder loads with transformers.CLIPTokenizer.from_pretrained (and sdjax.text.tokenizer.load_tokenizer).
    """
    return write_tokenizer_files(folder, train_merges(captions, vocab_size), pad_token)
