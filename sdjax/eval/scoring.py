"""FID and CLIP score of images given batch by batch (`Scorer`): Inception statistics accumulated on the host against
reference statistics, and the CLIP cosines of each image with its caption."""
import os

import numpy as np


class Scorer:
    """add(images uint8 [B, H, W, 3], captions) batch by batch, then result(): {"fid" (with fid_ref), "clip_score"
    and "clip_cosine" (with clip)}. fid_ref: pytorch-fid statistics (.npz) or a folder of images; inception: the
    FID Inception's weight file (None: where sdjax.eval.fid finds it); clip: a CLIP model (sdjax.eval.clip_score)."""

    def __init__(self, fid_ref=None, inception=None, dims=2048, clip=None, batch_size=50):
        from sdjax.eval import clip_score, fid
        self.dims = dims
        self.inception = fid.load_inception(inception, dims) if fid_ref else None
        self.reference = None
        if fid_ref:
            if os.path.isdir(fid_ref):
                self.reference = fid.path_statistics(fid_ref, self.inception, batch_size)
            else:
                self.reference = fid.read_stats(fid_ref)
        self.clip = clip_score.load_clip(clip) if clip else None
        self.reset()

    def reset(self):
        """Forget the images added so far."""
        from sdjax.eval import fid
        self.statistics = fid.Statistics(self.dims) if self.inception else None
        self.cosines = []

    def add(self, images, captions):
        if self.inception:
            self.statistics.add(self.inception.features(images))
        if self.clip:
            self.cosines.append(np.asarray(self.clip.cosines(images, list(captions)), np.float64))

    def result(self):
        """{name: float} of the images added."""
        from sdjax.eval import clip_score, fid
        out = {}
        if self.inception:
            out["fid"] = float(fid.frechet_distance(*self.statistics.mean_cov(), *self.reference))
        if self.clip:
            cosines = np.concatenate(self.cosines)
            out.update(clip_score=float(clip_score.score_of_cosines(cosines)), clip_cosine=float(cosines.mean()))
        return out
