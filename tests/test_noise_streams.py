"""The noise streams of a seed are independent: no stream's key (nor draw) is another's, the per-iteration keys of
the step stream included (issue 30, item 1: the posterior keys were the step keys of iterations 0 and 1)."""
import jax
import numpy as np
import pytest

from sdjax.diffusion.plan import iteration_noise
from sdjax.pipeline.noise_streams import NOISE_KINDS, SEEDS, image_keys

ITERATIONS = 64


@pytest.mark.parametrize("seed", [0, 1, 2 ** 31, SEEDS - 1])
def test_streams_of_a_seed_are_pairwise_distinct(seed):
    keys = image_keys(seed, 1)
    named = {kind: keys[kind][0] for kind in NOISE_KINDS}
    named.update({f"steps[{i}]": jax.random.fold_in(keys["steps"][0], i) for i in range(ITERATIONS)})
    data = {name: tuple(np.asarray(jax.random.key_data(k)).tolist()) for name, k in named.items()}
    assert len(set(data.values())) == len(data), "two streams share a key"
    draws = {name: np.asarray(jax.random.normal(k, (256,))) for name, k in named.items()}
    draws.update({f"iteration {i}": np.asarray(iteration_noise(keys["steps"], i, (256,)))[0] for i in range(4)})
    for i in range(4):  # the samplers' per-iteration draws are the step stream's
        np.testing.assert_array_equal(draws[f"iteration {i}"], draws[f"steps[{i}]"])
    names = [n for n in draws if not n.startswith("iteration")]
    stacked = np.stack([draws[n] for n in names])
    corr = np.corrcoef(stacked)
    np.fill_diagonal(corr, 0)
    assert np.abs(corr).max() < 0.35, "two streams' draws are correlated"  # 256 draws: |r| ~ 0.06 by chance
    # the defect this guards against: split(k)[i] is fold_in(k, i) with jax's partitionable threefry
    k = named["initial"]
    assert np.array_equal(jax.random.key_data(jax.random.split(k)[1]), jax.random.key_data(jax.random.fold_in(k, 1)))


def test_seed_wraps_and_images_differ():
    """Seed s + i wraps modulo 2^32; neighbouring seeds' streams differ."""
    keys = image_keys(SEEDS - 1, 2)
    wrapped = image_keys(0, 1)
    for kind in NOISE_KINDS:
        np.testing.assert_array_equal(jax.random.key_data(keys[kind][1]), jax.random.key_data(wrapped[kind][0]))
        assert not np.array_equal(jax.random.key_data(keys[kind][0]), jax.random.key_data(keys[kind][1]))


def test_a_list_of_seeds_gives_each_image_its_own():
    """seed=[s0, s1, ...]: image i's keys are those of seed s_i alone (python -m sdjax.eval's per-image seeds); the
    pad rows repeat the last seed's."""
    listed, alone = image_keys([7, SEEDS - 1, 3], 4), [image_keys(s, 1) for s in (7, SEEDS - 1, 3, 3)]
    for kind in NOISE_KINDS:
        for i, one in enumerate(alone):
            np.testing.assert_array_equal(jax.random.key_data(listed[kind][i]), jax.random.key_data(one[kind][0]))
        assert not np.array_equal(jax.random.key_data(listed[kind][0]), jax.random.key_data(listed[kind][2]))
