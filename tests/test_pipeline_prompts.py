"""The pipeline's prompt encoding (long and weighted prompts, both SDXL towers) against compel and the closed form,
and two threads sharing one pipeline."""
import threading

import numpy as np
import pytest
import torch

from sdjax.pipeline import StableDiffusion
from sdjax.text.prompt_weighting import prompt_chunks, weight_states
from test_prompt_weighting import _prompt

SIZE = 16


@pytest.fixture(scope="module")
def sd(torch_folder):
    return StableDiffusion.load(torch_folder[1])


def test_long_prompt_through_the_pipeline_matches_compel(sd, torch_folder):
    """sd.encode_prompts of a 3-chunk prompt (weighting off) is compel's long-prompt encoding of the same folder, and
    a generate() with it is far from one with the prompt truncated (the negative padded to 3 chunks)."""
    from compel import Compel, SplitLongTextMode
    pipe = torch_folder[0]
    text = _prompt(pipe.tokenizer, 160)
    compel = Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False,
                    split_long_text_mode=SplitLongTextMode.BRUTAL)
    with torch.no_grad():
        want = compel(text).numpy()
    got = np.asarray(sd.encode_prompts([text], weighting=False))
    assert got.shape == want.shape == (1, 3 * 77, want.shape[-1])
    err = np.abs(got - want).max()
    assert err < 1e-5
    head = pipe.tokenizer.decode(pipe.tokenizer(text).input_ids[1:76])  # the first 75 tokens: what diffusers keeps
    truncated = np.asarray(sd.encode_prompts([head]))
    assert np.abs(truncated[:, :77] - want[:, :77]).max() < 1e-5  # the first chunk is what diffusers encodes
    kw = dict(num_steps=2, sampler="ddim", height=SIZE, width=SIZE, progress=False, output_type="np")
    effect = np.abs(sd.generate(text, **kw) - sd.generate(head, **kw)).mean()
    assert effect > 1e-3


def test_weighted_prompt_is_the_closed_form(sd, tokenizer):
    """(word:1.5) and BREAK through the pipeline: the plain prompt's states weighted and rescaled per chunk."""
    text = "a (red:1.5) circle BREAK [blue] square"
    ids, weights = prompt_chunks(sd.tokenizer, text)
    plain = np.asarray(sd.encode_prompts(["a red circle BREAK blue square"], weighting=False))
    literal_ids, _ = prompt_chunks(sd.tokenizer, "a red circle BREAK blue square", weighting=False)
    assert ids.shape == (2, 77) and literal_ids.shape == (1, 77)  # BREAK: a chunk apart; literally, a word
    unweighted = np.asarray(sd.encode_text([["a red circle BREAK blue square"]], weighting=True))
    got = np.asarray(sd.encode_prompts([text]))
    want = weight_states(unweighted, weights.reshape(1, -1))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)  # float32 rounding in and out of jit
    assert np.abs(got - unweighted).max() > 1e-2 and plain.shape[1] == 77


def test_sdxl_towers_chunked_alike(sdxl_folders):
    """SDXL: a 2-chunk prompt gives [B, 154, D1 + D2] states; the first chunk and the pooled text are the truncated
    prompt's (what diffusers encodes), the second chunk the rest's."""
    base = StableDiffusion.load(sdxl_folders["base"])
    tok = base.tokenizer
    text = _prompt(tok, 100)
    ids = tok(text, add_special_tokens=False).input_ids
    head, tail = tok.decode(ids[:75]), tok.decode(ids[75:])
    states, pooled = map(np.asarray, base.encode_prompts([text], weighting=False))
    first, first_pooled = map(np.asarray, base.encode_prompts([head], weighting=False))
    second, _ = map(np.asarray, base.encode_prompts([tail], weighting=False))
    assert states.shape[1] == 154
    np.testing.assert_allclose(states[:, :77], first, atol=1e-5)
    np.testing.assert_allclose(states[:, 77:], second, atol=1e-5)
    np.testing.assert_allclose(pooled, first_pooled, atol=1e-5)


def test_two_threads_share_one_pipeline(sd):
    """Two threads call generate on one pipeline at once: each gets what it gets alone, and its own timings."""
    calls = [dict(prompt="a red circle", seed=1, sampler="euler_a"), dict(prompt="a blue square", seed=5, sampler="ddim")]
    kw = dict(num_steps=3, height=SIZE, width=SIZE, progress=False)
    alone = [sd.generate(**c, **kw) for c in calls]
    results, timings, errors = [None, None], [None, None], []

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                results[i] = sd.generate(**calls[i], **kw)
            timings[i] = dict(sd.last_timings)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        np.testing.assert_array_equal(results[i], alone[i])
        assert "sample" in timings[i] and "compile_sample" not in timings[i]  # compiled before, by the lone calls
    assert np.abs(alone[0].astype(float) - alone[1]).mean() > 1  # the two calls differ: a swap would show
