"""FID against pytorch-fid: its InceptionV3 with random weights (built here as its fid_inception_v3 builds it, saved
where its download is cached), loaded by both; features, statistics, distance, .npz files and the CLI."""
import functools

import numpy as np
import pytest
import torch
from PIL import Image

from eval_fakes import write_fid_inception
from sdjax.errors import WeightLoadError
from sdjax.eval import fid
from sdjax.models.inception import BLOCK_DIMS
from sdjax.weights.inception import ENV, FILENAME


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The weight file in a fresh $TORCH_HOME/hub/checkpoints/ (where pytorch-fid looks before downloading)."""
    home = tmp_path_factory.mktemp("torch_home")
    path = home / "hub" / "checkpoints" / FILENAME
    path.parent.mkdir(parents=True)
    write_fid_inception(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        mp.delenv(ENV, raising=False)
        yield str(path)


@functools.cache
def reference_model(blocks):
    """pytorch-fid's InceptionV3(blocks), eval mode; from the weight file in $TORCH_HOME (built once per file)."""
    from pytorch_fid.inception import InceptionV3
    return InceptionV3(list(blocks)).eval()


def reference_blocks(images, blocks=(0, 1, 2, 3)):
    """pytorch-fid's features of uint8 [B, H, W, 3] (ToTensor's / 255, its InceptionV3, the spatial mean)."""
    with torch.no_grad():
        out = reference_model(blocks)(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    return [o.mean((2, 3)).numpy() for o in out]


def jax_blocks(inception, images):
    import jax
    return [np.asarray(b) for b in jax.jit(lambda p, x: inception.module.apply({"params": p}, x / 255))(
        inception.params, images.astype(np.float32))]


def test_features_match_pytorch_fid_at_every_dims(weights):
    rng = np.random.default_rng(0)
    square, wide = rng.integers(0, 256, (3, 64, 64, 3), np.uint8), rng.integers(0, 256, (2, 320, 72, 3), np.uint8)
    inception = fid.load_inception(dims=2048)  # found in $TORCH_HOME
    blocks = jax_blocks(inception, square)
    for dims, ours, ref in zip((64, 192, 768, 2048), blocks, reference_blocks(square)):
        assert ours.shape == (3, dims)
        np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
        assert np.abs(ref).max() > 0.3  # O(1) features: the tolerance means something
    # non-square, shrunk along H and stretched along W, through the sharded path (the resize is the same at every
    # dims: the cheap compile of dims 192)
    ours = fid.load_inception(dims=192).features(wide)
    assert ours.dtype == np.float64 and ours.shape == (2, 192)
    np.testing.assert_allclose(ours, reference_blocks(wide, (1,))[0], atol=1e-4, rtol=0)


def smooth_images(rng, n, size=32):
    """uint8 [n, size, size, 3]: random colour fields, smooth (bilinear from 4x4)."""
    return np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).resize((size, size),
                                                                                               Image.BILINEAR))
                     for _ in range(n)])


def write_folder(folder, images):
    """PNGs named in order, one of them grayscale and one RGBA (read as RGB, as pytorch-fid reads them), plus files
    that are not images of pytorch-fid's extensions."""
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if i == 1 else np.dstack([image, image[..., :1]]) if i == 2 else image).save(
            folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(images[0]).save(folder / "upper.PNG")  # glob is case-sensitive: left out by both
    return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Images of two distributions (smooth colour fields; uniform noise): 66 smooth ones (more than dims 64:
    non-singular covariances), and 12 of each (singular)."""
    rng, root = np.random.default_rng(1), tmp_path_factory.mktemp("fid_images")
    a, b = smooth_images(rng, 66), rng.integers(0, 256, (12, 32, 32, 3), np.uint8)
    return dict(a_images=a, a=write_folder(root / "a", a), a12=write_folder(root / "a12", a[:12]),
                b12=write_folder(root / "b12", b))


@functools.cache
def reference_statistics(path, dims, batch_size=50):
    """pytorch-fid's (mu, sigma) of a folder or an .npz (computed once per folder)."""
    from pytorch_fid.fid_score import compute_statistics_of_path
    return compute_statistics_of_path(path, reference_model((BLOCK_DIMS.index(dims),)), batch_size, dims, "cpu",
                                      num_workers=0)


def reference_fid(paths, dims, batch_size=50):
    """pytorch-fid's calculate_fid_given_paths (its statistics of each path, then its distance)."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    return calculate_frechet_distance(*reference_statistics(paths[0], dims, batch_size),
                                      *reference_statistics(paths[1], dims, batch_size))


def test_statistics_equal_numpy_in_any_batches():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 6)) + 1e4  # a large mean: the cancellation that centred sums avoid
    stats = fid.Statistics()
    for batch in np.split(features, [1, 8, 8, 30]):  # uneven batches, one of them empty
        stats.add(batch)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, np.mean(features, axis=0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_distance_as_pytorch_fid(capsys):
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 30, 8))
    full_rank = (x.mean(0), np.cov(x, rowvar=False), y.mean(0) + 1, np.cov(y, rowvar=False))
    assert fid.frechet_distance(*full_rank) == pytest.approx(calculate_frechet_distance(*full_rank), rel=1e-12)
    # a product without a square root: sqrtm is not finite, and both add 1e-6 to the diagonals
    nilpotent = (np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]), np.ones(2), np.eye(2))
    ours = fid.frechet_distance(*nilpotent)
    assert "adding 1e-06 to diagonal" in capsys.readouterr().out
    assert ours == pytest.approx(calculate_frechet_distance(*nilpotent), rel=1e-12)
    assert np.isfinite(ours)  # without the offset: not
    negative = (np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))  # an imaginary square root: both refuse
    with pytest.raises(ValueError, match="Imaginary component"):
        calculate_frechet_distance(*negative)
    with pytest.raises(ValueError, match="imaginary component 1.0"):
        fid.frechet_distance(*negative)


def test_fid_of_folder_and_reference_statistics_matches_pytorch_fid(weights, folders, tmp_path):
    """The evaluation's case: generated images against reference statistics (full-rank, from an .npz written here
    and read by pytorch-fid)."""
    rng = np.random.default_rng(2)
    features = 0.5 + 0.2 * rng.standard_normal((200, 64))
    reference = str(tmp_path / "reference.npz")
    fid.write_stats(reference, np.mean(features, 0), np.cov(features, rowvar=False))
    paths = [folders["a"], reference]  # 66 images, 64 dims: full rank
    ours = fid.fid_from_paths(*paths, dims=64, batch_size=25)  # two full batches and a short one
    assert ours == pytest.approx(reference_fid(paths, 64, 25), rel=1e-3)


def test_fid_matches_pytorch_fid_where_covariances_are_singular(weights, folders):
    paths = [folders["a12"], folders["b12"]]  # 12 images, 64 dims
    inception = fid.load_inception(dims=64)
    ours = fid.fid_from_paths(*paths, inception, batch_size=5)
    assert ours == pytest.approx(reference_fid(paths, 64), rel=1e-3)
    # the effect: two halves of one set are far closer than two sets
    halves = [fid.Statistics() for _ in range(2)]
    for stats, images in zip(halves, np.split(folders["a_images"][:12], 2)):
        stats.add(inception.features(images))
    assert 0 < fid.frechet_distance(*halves[0].mean_cov(), *halves[1].mean_cov()) < ours / 3


def test_cli_and_npz_files_as_pytorch_fid(weights, folders, tmp_path, capsys):
    from pytorch_fid.fid_score import save_fid_stats
    ours, theirs = str(tmp_path / "a12_sdjax.npz"), str(tmp_path / "b12_pytorch_fid.npz")
    fid.main([folders["a12"], ours, "--save-stats", "--dims", "64"])  # the weights found in $TORCH_HOME
    save_fid_stats([folders["b12"], theirs], 50, "cpu", 64, num_workers=0)
    fid.main([ours, theirs, "--inception", weights, "--dims", "64"])  # each reads the other's file
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"Saving statistics for {folders['a12']}" and lines[-1].startswith("FID:  ")  # pytorch-fid's
    value = float(lines[-1].split()[-1])
    assert value == pytest.approx(reference_fid([ours, theirs], 64), rel=1e-12)  # pytorch-fid reads ours
    assert value == pytest.approx(reference_fid([folders["a12"], theirs], 64), rel=1e-3)  # a12's statistics
    with pytest.raises(SystemExit, match=f"^sdjax.eval.fid: {ours} exists"):
        fid.main([folders["a12"], ours, "--save-stats"])


def test_missing_weights_name_the_three_places(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(WeightLoadError, match=f"--inception FILE.*\\${ENV}.*{tmp_path}/hub/checkpoints/") as e:
        fid.load_inception()
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="^sdjax.eval.fid: FID Inception weights .* not found"):
        fid.main([folders["a12"], folders["b12"]])
    monkeypatch.setenv(ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(WeightLoadError, match=f"absent.pth \\(from \\${ENV}\\)"):
        fid.load_inception()


def test_cli_bad_input_is_one_line(tmp_path):
    np.savez(tmp_path / "wrong.npz", m=np.zeros(3))
    np.savez(tmp_path / "s64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "s192.npz", mu=np.zeros(192), sigma=np.eye(192))
    (tmp_path / "empty").mkdir()
    for args, message in (([tmp_path / "absent", tmp_path / "s64.npz"], "no such file or folder: .*absent"),
                          ([tmp_path / "empty", tmp_path / "s64.npz"], "empty: FID needs at least 2 images.*found 0"),
                          ([tmp_path / "wrong.npz", tmp_path / "s64.npz"], "need arrays mu and sigma, found \\['m'\\]"),
                          ([tmp_path / "s64.npz", tmp_path / "s192.npz"], "differ in size: mu \\(64,\\) vs \\(192,\\)")):
        with pytest.raises(SystemExit, match=f"^sdjax.eval.fid: .*{message}[^\\n]*$"):
            fid.main([str(a) for a in args])


@pytest.mark.slow
@pytest.mark.parametrize("dims", [192, 768, 2048])
def test_fid_at_larger_dims_matches_pytorch_fid(weights, folders, dims):
    """The other dims (at 2048, pytorch-fid's default, its sqrtm of the 2048² product takes a minute here)."""
    paths = [folders["a12"], folders["b12"]]
    assert fid.fid_from_paths(*paths, dims=dims) == pytest.approx(reference_fid(paths, dims), rel=1e-3)
