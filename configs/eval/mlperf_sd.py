"""MLPerf Training's Stable Diffusion (v2, 512²) evaluation, as `python -m sdjax.eval --config configs/eval/mlperf_sd.py`:

    python -m sdjax.eval --config configs/eval/mlperf_sd.py --model path/to/sd2-base-or-an-export \\
        --captions val2014_30k.tsv --fid-ref val2014_30k_stats.npz \\
        --inception pt_inception-2015-12-05-6726825d.pth --clip path/to/open_clip_pytorch_model.bin --out eval/

The captions: MLPerf's val2014_30k.tsv (30,000 captions of COCO-2014 validation, one per image, drawn with seed
2023; columns image_id, id, caption). The reference statistics: its val2014_30k_stats.npz (pytorch-fid's .npz of
those 30k images at 512²). CLIP: open_clip's ViT-H-14 (laion2b_s32b_b79k). MLPerf's targets are the FID and the raw
CLIP cosine (the report's `fid`, `clip_cosine`; torchmetrics' `clip_score` is 100 times the cosine).
`get_config("1k")`: the first 1,000 captions' worth of sampling only (a quicker check; FID of fewer images runs high).
"""
import ml_collections

TARGETS = dict(fid_max=90.0, clip_cosine_min=0.15)


def get_config(arg=""):
    if arg not in ("", "1k"):
        raise ValueError(f"mlperf_sd config: the argument is '' or '1k', got {arg!r}")
    c = ml_collections.ConfigDict()
    c.sampler = "ddim"            # DDIM, eta 0
    c.steps = 50
    c.guidance = 8.0
    c.height = c.width = 512
    c.images_per_caption = 1
    c.dims = 2048                 # pytorch-fid's pool3 features
    c.limit = 1000 if arg == "1k" else 0
    c.targets = TARGETS           # not an option: what the report is judged against (README)
    return c
