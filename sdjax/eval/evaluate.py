"""`python -m sdjax.eval` from its parsed options: the images sampled over every process's devices (process 0 writes
them and decides what is missing), then scored by process 0: report.json and a row of metrics.jsonl."""
import os

from sdjax.sample_options import check_model, generate_options, load

REPORT = "report.json"


def check(args):
    """ValueError / OSError naming the option, before anything is loaded."""
    for flag in ("captions", "out"):
        if not getattr(args, flag):
            raise ValueError(f"give --{flag}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FileExistsError(f"--out {args.out} is a file; give a folder")
    if args.limit < 0:
        raise ValueError(f"--limit must be >= 0, got {args.limit}")
    for flag, value in (("--images-per-caption", args.images_per_caption), ("--batch-size", args.batch_size or 1),
                        ("--score-batch-size", args.score_batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    for flag in ("fid_ref", "inception", "clip"):
        if getattr(args, flag) and not os.path.exists(getattr(args, flag)):
            raise FileNotFoundError(f"--{flag.replace('_', '-')}: no such file or folder: {getattr(args, flag)}")


def settings_of(args, sd, options):
    """What the images depend on (settings.json, the report's "settings"): model, adapters, sampling, size, seeds."""
    default = sd.unet.sample_size * sd.vae_scale_factor
    return dict(model=os.path.abspath(check_model(args)), dtype=args.dtype,
                loras=[[os.path.abspath(path), scale] for path, scale in args.lora],
                embeddings=[os.path.abspath(path) for path in args.embedding],
                **{k: v for k, v in options.items() if k not in ("height", "width")},
                height=args.height or default, width=args.width or default,
                images_per_caption=args.images_per_caption)


def run(args):
    """Sample what is missing of the evaluation's images, score them all; process 0 returns the report."""
    check(args)
    import jax
    from jax.sharding import Mesh
    from tqdm import tqdm
    from sdjax.eval import image_set
    from sdjax.train import distributed
    todo = image_set.items(image_set.read_captions(args.captions)[:args.limit or None], args.images_per_caption)
    sd = load(args)
    options = generate_options(args, sd)
    if jax.process_count() > 1:  # the batches split over every process's devices
        sd.replicate(Mesh(jax.devices(), ("data",)))
    settings = settings_of(args, sd, options)
    folder, writer = os.path.join(args.out, "images"), jax.process_index() == 0
    plan = scorer = None  # process 0 reads the folder and loads the scorer; every process learns what to make
    if writer:
        try:
            image_set.check_settings(args.out, settings)
            plan = image_set.missing(todo, folder)
            scorer = make_scorer(args)
        except (ValueError, OSError) as e:
            plan = str(e)
    plan = distributed.gather_json(plan)[0]
    if isinstance(plan, str):
        raise ValueError(plan)
    bar = tqdm(total=len(todo), initial=len(todo) - len(plan), unit="img", desc="sampling", disable=not writer)
    if plan:
        image_set.make_images(sd, [todo[i] for i in plan], folder, args.batch_size or jax.device_count(),
                              dict(options, height=settings["height"], width=settings["width"]),
                              dict(model=os.path.basename(settings["model"]), software="sdjax"), writer, bar)
    bar.close()
    return score(args, todo, folder, settings, scorer) if writer else None


def make_scorer(args):
    """The Scorer of --fid-ref / --clip (their weights loaded, the reference statistics read), or None."""
    if not (args.fid_ref or args.clip):
        return None
    from sdjax.eval.scoring import Scorer
    return Scorer(args.fid_ref, args.inception, args.dims, args.clip, args.score_batch_size)


def score(args, todo, folder, settings, scorer):
    """The report of the images of `todo` in `folder`, written to report.json; its metrics a metrics.jsonl row."""
    from tqdm import tqdm
    from sdjax.eval import image_set
    from sdjax.train.metrics_log import MetricsLogger
    metrics = {}
    if scorer:
        batches = image_set.read_images(todo, folder, args.score_batch_size)
        for images, captions in tqdm(batches, desc="scoring", total=-(-len(todo) // args.score_batch_size)):
            scorer.add(images, captions)
        metrics = scorer.result()
    report = dict(metrics, images=len(todo), captions=len(todo) // args.images_per_caption, settings=settings,
                  captions_file=os.path.abspath(args.captions), fid_ref=args.fid_ref and os.path.abspath(args.fid_ref),
                  dims=args.dims if args.fid_ref else None, clip=args.clip and os.path.abspath(args.clip))
    targets = getattr(args, "targets", None)  # a --config's
    if targets and {"fid", "clip_cosine"} <= set(metrics):
        report["targets"] = dict(targets, met=bool(metrics["fid"] <= targets["fid_max"] and
                                                   metrics["clip_cosine"] >= targets["clip_cosine_min"]))
    image_set.write_json(os.path.join(args.out, REPORT), report)
    if metrics:
        logger = MetricsLogger(args.log_dir or args.out)
        logger.write(args.step, metrics)
        logger.close()
    return report
