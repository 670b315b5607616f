"""Fréchet Inception Distance, as pytorch-fid computes it (its Inception, statistics, distance and .npz files).

    python -m sdjax.eval.fid PATH_A PATH_B [--inception FILE] [--dims 2048] [--batch-size 50] [--save-stats]

Each PATH is a folder of images or an .npz of statistics (mu, sigma); prints `FID:  <value>` as pytorch-fid does.
`--save-stats`: the statistics of PATH_A are written to PATH_B (which must not exist) instead. The weights are
pytorch-fid's pt_inception-2015-12-05-6726825d.pth: `--inception FILE`, $SDJAX_FID_INCEPTION, or torch's cache.
"""
import argparse
import itertools
import os
import pathlib
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from scipy import linalg

from sdjax.models.inception import BLOCK_DIMS, FIDInceptionV3
from sdjax.weights.inception import find_weights, load_inception_params

IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}  # pytorch-fid's


class Inception:
    """The FID Inception at `dims` (64, 192, 768 or 2048, pytorch-fid's --dims), its params replicated on `mesh`
    and its batch sharded over all of the mesh's devices."""

    def __init__(self, params, dims=2048, mesh=None):
        if dims not in BLOCK_DIMS:
            raise ValueError(f"FID Inception: dims must be one of {BLOCK_DIMS}, got {dims}")
        self.dims, self.module = dims, FIDInceptionV3(dims)
        self.mesh = mesh if mesh is not None else Mesh(np.asarray(jax.local_devices()), ("batch",))
        self.batch_sharding = NamedSharding(self.mesh, P(self.mesh.axis_names))
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self._features = jax.jit(self.apply)

    def apply(self, params, images):
        """images [B, H, W, 3] uint8, or float in [0, 1] -> float32 [B, dims] (jittable)."""
        x = images.astype(jnp.float32)
        return self.module.apply({"params": params}, x / 255 if images.dtype == jnp.uint8 else x)[-1]

    def features(self, images, pad_to=None):
        """images [B, H, W, 3] uint8 or float in [0, 1] (numpy, the same global batch on every process, or a
        jax.Array) -> np.float64 [B, dims]. The batch is padded to a multiple of the mesh's size, and to `pad_to`
        (one compile for all the batches of a run)."""
        n = images.shape[0]
        total = -(-max(n, pad_to or 0) // self.mesh.size) * self.mesh.size
        if total != n:  # pad with copies of the last image, dropped from the features
            xp = jnp if isinstance(images, jax.Array) else np
            images = xp.concatenate([images, xp.repeat(images[-1:], total - n, 0)])
        out = self._features(self.params, jax.device_put(images, self.batch_sharding))
        if not out.is_fully_addressable:
            out = multihost_utils.process_allgather(out, tiled=True)
        return np.asarray(out, np.float64)[:n]


def load_inception(path=None, dims=2048, mesh=None):
    """The FID Inception (`Inception`) from pytorch-fid's weight file: `path`, else $SDJAX_FID_INCEPTION, else
    torch's cache ($TORCH_HOME/hub/checkpoints/). Raises WeightLoadError naming those places when absent."""
    return Inception(load_inception_params(find_weights(path)), dims, mesh)


class Statistics:
    """Mean and covariance of features added batch by batch, kept on the host in float64 as centred sums merged
    pairwise (Chan et al.): equal, to rounding, to np.mean and np.cov(rowvar=False) of all the rows at once."""

    def __init__(self):
        self.count, self.mean, self._scatter = 0, None, None

    def add(self, features):
        """features [B, D]."""
        f = np.asarray(features, np.float64)
        if self.mean is None:
            self.mean, self._scatter = np.zeros(f.shape[1]), np.zeros((f.shape[1],) * 2)
        if not len(f):
            return
        mean = f.mean(0)
        centred, delta, total = f - mean, mean - self.mean, self.count + len(f)
        self._scatter += centred.T @ centred + np.outer(delta, delta) * (self.count * len(f) / total)
        self.mean += delta * (len(f) / total)
        self.count = total

    def mean_cov(self):
        """(mu [D], sigma [D, D]) float64; sigma with the unbiased 1 / (n - 1), as np.cov."""
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
        return self.mean.copy(), self._scatter / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as pytorch-fid's calculate_frechet_distance:
    scipy's sqrtm; where its result is not finite, eps added to both diagonals; a complex result must have a
    diagonal within 1e-3 of real (else ValueError), and its real part is taken."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID: the two statistics differ in size: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the square root of the covariances' product has an imaginary component "
                             f"{np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def read_stats(path):
    """(mu, sigma) from an .npz of pytorch-fid's (keys mu, sigma)."""
    try:
        f = np.load(path)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not an .npz of FID statistics ({str(e).split('. ')[0]})") from None
    found = sorted(f.files) if isinstance(f, np.lib.npyio.NpzFile) else "one array (.npy)"
    if not {"mu", "sigma"} <= set(found):
        raise ValueError(f"{path}: FID statistics need arrays mu and sigma, found {found}")
    with f:
        return f["mu"][:], f["sigma"][:]


def write_stats(path, mu, sigma):
    """An .npz that pytorch-fid reads (np.savez_compressed, keys mu and sigma)."""
    np.savez_compressed(path, mu=mu, sigma=sigma)


def image_files(folder):
    """The images of a folder as pytorch-fid lists them: its extensions (lower case), sorted paths."""
    return sorted(file for ext in IMAGE_EXTENSIONS for file in pathlib.Path(folder).glob(f"*.{ext}"))


def image_statistics(files, inception, batch_size=50):
    """(mu, sigma) of the features of image files, read as RGB (PIL's convert, as pytorch-fid)."""
    stats = Statistics()
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # decoded in parallel (PIL releases the GIL)
        for start in range(0, len(files), batch_size):
            images = pool.map(lambda f: np.asarray(Image.open(f).convert("RGB")), files[start:start + batch_size])
            for _, same_size in itertools.groupby(images, key=np.shape):
                stats.add(inception.features(np.stack(list(same_size)), pad_to=batch_size))
    return stats.mean_cov()


def path_statistics(path, inception, dims=2048, batch_size=50):
    """(mu, sigma, inception) of an .npz or a folder of images; `inception` an Inception or a weight file (or None:
    found as load_inception finds it), loaded only for a folder (and then returned)."""
    if not os.path.exists(path):
        raise ValueError(f"FID: no such file or folder: {path}")
    if str(path).endswith(".npz"):
        return (*read_stats(path), inception)
    files = image_files(path)
    if len(files) < 2:
        raise ValueError(f"{path}: FID needs at least 2 images ({', '.join(sorted(IMAGE_EXTENSIONS))}), "
                         f"found {len(files)}")
    if not isinstance(inception, Inception):
        inception = load_inception(inception, dims)
    return (*image_statistics(files, inception, batch_size), inception)


def fid_from_paths(a, b, inception=None, dims=2048, batch_size=50):
    """FID between two folders of images or .npz statistics (pytorch-fid's calculate_fid_given_paths);
    `inception`: an Inception, or the weight file."""
    mu1, sigma1, inception = path_statistics(a, inception, dims, batch_size)
    mu2, sigma2, _ = path_statistics(b, inception, dims, batch_size)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sdjax.eval.fid", description=__doc__.split("\n")[0])
    p.add_argument("path", nargs=2, help="folders of images or .npz statistics")
    p.add_argument("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: "
                                       "$SDJAX_FID_INCEPTION, or $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--dims", type=int, default=2048, choices=BLOCK_DIMS, help="which Inception features")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--save-stats", action="store_true", help="write the statistics of PATH_A to PATH_B")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        if args.save_stats:
            if os.path.exists(args.path[1]):
                raise ValueError(f"{args.path[1]} exists: --save-stats writes a new file")
            print(f"Saving statistics for {args.path[0]}")
            mu, sigma, _ = path_statistics(args.path[0], args.inception, args.dims, args.batch_size)
            write_stats(args.path[1], mu, sigma)
        else:
            print("FID: ", fid_from_paths(*args.path, args.inception, args.dims, args.batch_size))
    except (ValueError, OSError) as e:
        sys.exit(f"sdjax.eval.fid: {e}")


if __name__ == "__main__":
    main()
