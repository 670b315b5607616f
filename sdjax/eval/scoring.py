"""FID and CLIP score of images given batch by batch (`Scorer`): Inception statistics accumulated on the host against
reference statistics, and the CLIP cosines of each image with its caption."""
import numpy as np


class Scorer:
    """add(images uint8 [B, H, W, 3], captions) batch by batch, then result(): {"fid" (with fid_ref), "clip_score"
    and "clip_cosine" (with clip)}. fid_ref: pytorch-fid statistics (.npz) or a folder of images; inception: the FID
    Inception's weight file (None: where sdjax.eval.fid finds it); clip: a CLIP model (sdjax.eval.clip_score); the
    networks on `mesh` (default: the local devices), batches of `batch_size` (one compiled program)."""

    def __init__(self, fid_ref=None, inception=None, dims=2048, clip=None, batch_size=50, mesh=None):
        from sdjax.eval import clip_score, fid
        self.batch_size = batch_size
        self.inception = fid.load_inception(inception, dims, mesh) if fid_ref else None
        self.reference = fid.path_statistics(fid_ref, self.inception, dims, batch_size)[:2] if fid_ref else None
        self.clip = clip_score.load_clip(clip, mesh) if clip else None
        self.reset()

    def reset(self):
        """Forget the images added so far."""
        from sdjax.eval import fid
        self.statistics, self.cosines = fid.Statistics(), []

    def add(self, images, captions):
        if self.inception:
            self.statistics.add(self.inception.features(images, pad_to=self.batch_size))
        if self.clip:
            self.cosines.append(self.clip.cosines(images, list(captions)))

    def result(self):
        """{name: float} of the images added."""
        from sdjax.eval import clip_score, fid
        out = {}
        if self.inception:
            out["fid"] = float(fid.frechet_distance(*self.statistics.mean_cov(), *self.reference))
        if self.clip:
            cosines = np.concatenate(self.cosines)
            out.update(clip_score=clip_score.score(cosines), clip_cosine=float(np.mean(cosines)))
        return out
