"""PatchGAN discriminator: parity with a PyTorch NLayerDiscriminator (GroupNorm), names, shapes, config."""
import jax
import numpy as np
import pytest
import torch

from sdjax.models.discriminator import NLayerDiscriminator
from sdjax.weights.convert import to_params, to_state_dict

torch.set_num_threads(1)


def torch_discriminator(input_nc, ndf, n_layers, groups):
    """pix2pix's NLayerDiscriminator layer list, BatchNorm replaced by GroupNorm (convs with bias)."""
    layers = [torch.nn.Conv2d(input_nc, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        layers += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1),
                   torch.nn.GroupNorm(groups, ndf * mult), torch.nn.LeakyReLU(0.2)]
    layers.append(torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1))
    model = torch.nn.Module()
    model.main = torch.nn.Sequential(*layers)
    with torch.no_grad():  # norms off their (1, 0) init so a naming mistake shows
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.2 * torch.randn_like(m.bias))
    return model.eval()


@pytest.mark.parametrize("n_layers,size", [(2, 32), (3, 32)])
def test_parity_with_torch(n_layers, size):
    torch.manual_seed(0)
    ref = torch_discriminator(3, 16, n_layers, 8)
    module = NLayerDiscriminator(ndf=16, n_layers=n_layers, norm_num_groups=8)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    params = to_params("discriminator", sd, jax.eval_shape(lambda: module.init_params(jax.random.key(0), size)))
    back = to_state_dict(params)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    ours = np.asarray(module.apply({"params": params}, x))
    with torch.no_grad():
        theirs = ref.main(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    side = size // 2 ** n_layers - 2
    assert ours.shape == theirs.shape == (2, side, side, 1)
    diff = np.max(np.abs(ours - theirs))
    print(f"discriminator n_layers={n_layers} max abs diff vs torch: {diff:.2e}")
    assert diff <= 1e-4


def test_init_and_config():
    d = NLayerDiscriminator.from_config(dict(ndf=8, n_layers=2, norm_num_groups=4))
    params = d.init_params(jax.random.key(0), 16)
    k = np.asarray(params["main_0"]["kernel"])
    assert k.shape == (4, 4, 3, 8) and 0.01 < k.std() < 0.03  # N(0, 0.02) as in the reference
    assert sorted(params) == ["main_0", "main_2", "main_3", "main_5", "main_6", "main_8"]
    with pytest.raises(ValueError, match="use_actnorm"):
        NLayerDiscriminator.from_config(dict(use_actnorm=True))
