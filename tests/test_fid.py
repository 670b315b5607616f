"""FID against pytorch-fid: its InceptionV3 with random weights (built here as its fid_inception_v3 builds it, saved
where its download is cached), loaded by both; features, statistics, distance, .npz files and the CLI."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from sdjax.errors import WeightLoadError
from sdjax.eval import fid
from sdjax.weights.inception import ENV, FILENAME

# pytorch-fid's FID blocks, swapped into torchvision's Inception3 as its fid_inception_v3 does
FID_BLOCKS = (("Mixed_5b", "FIDInceptionA", (192, 32)), ("Mixed_5c", "FIDInceptionA", (256, 64)),
              ("Mixed_5d", "FIDInceptionA", (288, 64)), ("Mixed_6b", "FIDInceptionC", (768, 128)),
              ("Mixed_6c", "FIDInceptionC", (768, 160)), ("Mixed_6d", "FIDInceptionC", (768, 160)),
              ("Mixed_6e", "FIDInceptionC", (768, 192)), ("Mixed_7b", "FIDInceptionE_1", (1280,)),
              ("Mixed_7c", "FIDInceptionE_2", (2048,)))


def random_fid_inception(seed=0):
    """pytorch-fid's fid_inception_v3 module tree, random: He-scaled convolutions and BatchNorms near identity,
    so that features stay O(1) through the 94 layers; every BatchNorm statistic random."""
    from pytorch_fid import inception
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block, args in FID_BLOCKS:
        setattr(net, name, getattr(inception, block)(*args))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("conv.weight"):
                t.copy_(noise * (2 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(1 + 0.5 * noise.abs())
            elif name.endswith("bn.weight"):
                t.copy_(1 + 0.1 * noise)
            else:  # BatchNorm's bias and running mean; the classifier
                t.copy_(0.1 * noise)
    return net.eval()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The weight file in a fresh $TORCH_HOME/hub/checkpoints/ (where pytorch-fid looks before downloading)."""
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / FILENAME
    path.parent.mkdir(parents=True)
    torch.save(random_fid_inception().state_dict(), path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        mp.delenv(ENV, raising=False)
        yield str(path)


def reference_blocks(images, blocks=(0, 1, 2, 3)):
    """pytorch-fid's features of uint8 [B, H, W, 3] (ToTensor's / 255, its InceptionV3, the spatial mean)."""
    from pytorch_fid.inception import InceptionV3
    with torch.no_grad():
        out = InceptionV3(list(blocks)).eval()(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    return [o.mean((2, 3)).numpy() for o in out]


def test_features_match_pytorch_fid_at_every_dims(weights):
    rng = np.random.default_rng(0)
    square, wide = rng.integers(0, 256, (3, 64, 64, 3), np.uint8), rng.integers(0, 256, (2, 40, 72, 3), np.uint8)
    inception = fid.load_inception(dims=2048)  # found in $TORCH_HOME
    blocks = jax_blocks(inception, square)
    for dims, ours, ref in zip((64, 192, 768, 2048), blocks, reference_blocks(square)):
        assert ours.shape == (3, dims)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
        assert np.abs(ref).max() > 0.3  # O(1) features: the tolerance means something
    ours = inception.features(wide)  # non-square, through the sharded path; batch 2 on any device count
    assert ours.dtype == np.float64 and ours.shape == (2, 2048)
    np.testing.assert_allclose(ours, reference_blocks(wide, (3,))[0], atol=1e-4, rtol=0)


def jax_blocks(inception, images):
    import jax
    return [np.asarray(b) for b in jax.jit(lambda p, x: inception.module.apply({"params": p}, x / 255))(
        inception.params, images.astype(np.float32))]
