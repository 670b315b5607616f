"""CLIP tokenizer: load a pipeline's `tokenizer/` folder and turn prompts into padded ids."""
import os

import numpy as np

# transformers without PyTorch says so at import ("PyTorch was not found..."): sdjax needs its tokenizers only
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
import transformers  # noqa: E402

# Either a `tokenizers` file (what transformers >= 5 saves) or the classic BPE pair.
REQUIRED_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def load_tokenizer(folder):
    """transformers.CLIPTokenizer from `folder` (tokenizer.json or vocab.json + merges.txt).

    The folder's tokenizer_config.json / special_tokens_map.json are honoured, which matters
    for padding: SD 1.x pads with <|endoftext|>, SD 2.x with "!".
    """
    if not any(all(os.path.isfile(os.path.join(folder, n)) for n in files) for files in REQUIRED_FILES):
        raise FileNotFoundError(f"CLIP tokenizer: {folder} holds neither tokenizer.json nor "
                                "vocab.json + merges.txt")
    return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tokenize(tokenizer, prompts, max_length=77):
    """prompts: list of B str -> (input_ids int32 [B, max_length], whether any was truncated).

    Pads to max_length with the tokenizer's pad token and truncates longer prompts (keeping
    the closing <|endoftext|>), as diffusers' StableDiffusionPipeline does.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"tokenize: prompts must be a list of str, got {prompts!r}")
    prompts = list(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length,
                    truncation=True).input_ids
    # One extra slot is enough to see whether a prompt was cut.
    longer = tokenizer(prompts, max_length=max_length + 1, truncation=True).input_ids
    truncated = any(len(row) > max_length for row in longer)
    return np.asarray(ids, np.int32).reshape(len(prompts), max_length), truncated


# A Pretrained's tokenizers and the batch keys of their token ids (the input pipeline's, the train step's)
TOKEN_IDS = {"tokenizer": "input_ids", "tokenizer_2": "input_ids_2"}


def batch_tokenizers(pretrained):
    """{batch key: tokenizer} of a Pretrained: "input_ids" and, for SDXL, "input_ids_2"."""
    return {key: getattr(pretrained, name) for name, key in TOKEN_IDS.items() if getattr(pretrained, name) is not None}
