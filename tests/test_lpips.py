"""LPIPS: parity with a small PyTorch reference (random weights), metric properties, weight loading."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.models.lpips import LPIPS
from sdjax.weights.lpips import load_lpips
from sdjax.weights.convert import to_params, to_state_dict
from sdjax.errors import WeightLoadError

torch.set_num_threads(1)
NARROW = (8, 16, 16, 32, 32)


def vgg_cfg(channels):
    """torchvision's VGG16 "D" layer list with the given widths ('M' = 2x2 max pool)."""
    c = channels
    return [c[0], c[0], "M", c[1], c[1], "M", c[2], c[2], c[2], "M", c[3], c[3], c[3], "M", c[4], c[4], c[4]]


class TorchLPIPS(torch.nn.Module):
    """The lpips package's LPIPS(net='vgg') forward, written from the paper: VGG16 features cut after
    relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; unit-normalised channel differences; lin; mean; sum."""

    def __init__(self, channels):
        super().__init__()
        layers, cin = [], 3
        for v in vgg_cfg(channels):
            if v == "M":
                layers.append(torch.nn.MaxPool2d(2, 2))
            else:
                layers += [torch.nn.Conv2d(cin, v, 3, padding=1), torch.nn.ReLU()]
                cin = v
        self.net = torch.nn.Module()
        for k, (a, b) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))):
            seq = torch.nn.Sequential()
            for i in range(a, b):
                seq.add_module(str(i), layers[i])
            setattr(self.net, f"slice{k + 1}", seq)
        for k, ch in enumerate(channels):
            setattr(self, f"lin{k}", torch.nn.Module())
            lin = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(ch, 1, 1, bias=False))
            getattr(self, f"lin{k}").model = lin
        self.scaling_layer = torch.nn.Module()
        self.scaling_layer.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.scaling_layer.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        with torch.no_grad():
            for k in range(5):
                getattr(self, f"lin{k}").model[1].weight.abs_()
        self.eval()

    def forward(self, x0, x1):
        def taps(x):
            x, out = (x - self.scaling_layer.shift) / self.scaling_layer.scale, []
            for k in range(5):
                x = getattr(self.net, f"slice{k + 1}")(x)
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            return out
        total = 0
        for k, (f0, f1) in enumerate(zip(taps(x0), taps(x1))):
            total = total + getattr(self, f"lin{k}").model((f0 - f1) ** 2).mean((2, 3))
        return total[:, 0]


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def images(seed, n=2, size=32):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def state_numpy(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=["narrow", "vgg16"])
def pair(request):
    """(torch reference, flax module, params converted from the reference)."""
    channels = NARROW if request.param == "narrow" else (64, 128, 256, 512, 512)
    torch.manual_seed(0)
    ref = TorchLPIPS(channels)
    module = LPIPS(channels)
    shapes = jax.eval_shape(lambda: module.init_params(jax.random.key(0)))
    sd = {k: v for k, v in state_numpy(ref).items() if not k.startswith("scaling_layer")}
    params = to_params("lpips", sd, shapes)
    return ref, module, params, sd


def test_names_round_trip(pair):
    _, _, params, sd = pair
    back = to_state_dict(params)
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_parity_with_torch(pair):
    ref, module, params, _ = pair
    x0, x1 = images(1), images(2)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, x0, x1))
    with torch.no_grad():
        theirs = ref(nchw(x0), nchw(x1)).numpy()
    diff = np.max(np.abs(ours - theirs))
    print(f"LPIPS max abs diff vs torch: {diff:.2e} (values {theirs})")
    assert ours.shape == (2,)
    assert diff <= 1e-5


def test_metric_properties():
    module = LPIPS(NARROW)
    params = module.init_params(jax.random.key(3))
    f = jax.jit(lambda a, b: module.apply({"params": params}, a, b))
    x0, x1 = images(4, n=3), images(5, n=3)
    # Zero up to rounding: XLA may evaluate the two batch halves in different orders (~1e-16 seen).
    assert np.max(np.abs(np.asarray(f(x0, x0)))) <= 1e-12
    d01, d10 = np.asarray(f(x0, x1)), np.asarray(f(x1, x0))
    np.testing.assert_allclose(d01, d10, rtol=1e-6)
    assert np.all(d01 > 0)
    # Gradients reach the second image (it is a loss there) and are finite.
    g = jax.grad(lambda b: jnp.sum(f(x0, b)))(x1)
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0


def test_load_from_lpips_and_torchvision_files(tmp_path):
    """lin layers from an lpips-package-style file, trunk from a torchvision-style VGG16 file."""
    torch.manual_seed(1)
    ref = TorchLPIPS(NARROW)
    sd = ref.state_dict()
    lins = {k: v for k, v in sd.items() if k.startswith("lin")}
    trunk = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in sd.items() if k.startswith("net.")}
    trunk["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(lins, tmp_path / "vgg.pth")
    torch.save(trunk, tmp_path / "vgg16.pth")
    module, params = load_lpips([str(tmp_path / "vgg.pth"), str(tmp_path / "vgg16.pth")], channels=NARROW)
    expected = {k: v.numpy() for k, v in sd.items() if not k.startswith("scaling_layer")}
    got = to_state_dict(params)
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    # A full LPIPS state dict (with the scaling-layer buffers) loads as well.
    torch.save(sd, tmp_path / "full.pth")
    _, params_full = load_lpips(str(tmp_path / "full.pth"), channels=NARROW)
    jax.tree.map(np.testing.assert_array_equal, params_full, params)


def test_load_errors(tmp_path):
    torch.manual_seed(2)
    sd = TorchLPIPS(NARROW).state_dict()
    torch.save({k: v for k, v in sd.items() if not k.startswith("lin")}, tmp_path / "trunk_only.pth")
    with pytest.raises(WeightLoadError, match=r"(?s)5 missing tensor\(s\).*lin0\.model\.1\.weight"):
        load_lpips(str(tmp_path / "trunk_only.pth"), channels=NARROW)
    bad = dict(sd)
    bad["lin2.model.1.weight"] = -bad["lin2.model.1.weight"]
    torch.save(bad, tmp_path / "negative.pth")
    with pytest.raises(WeightLoadError, match="lin2.*negative"):
        load_lpips(str(tmp_path / "negative.pth"), channels=NARROW)
    with pytest.raises(WeightLoadError, match="shape mismatch"):
        load_lpips(str(tmp_path / "negative.pth"))  # VGG16 widths expected, narrow file given
    with pytest.raises(WeightLoadError, match="no weight files"):
        load_lpips([])
