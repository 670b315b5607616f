"""Evaluate a text-to-image model: N images per caption of a captions file, FID against reference statistics, CLIP score.

    python -m sdjax.eval --model path/to/sd2-base --captions val2014_30k.tsv --out eval/ \\
        --fid-ref val2014_30k_stats.npz --inception pt_inception-2015-12-05-6726825d.pth \\
        --clip path/to/open_clip_pytorch_model.bin --steps 50 --guidance 8 --sampler ddim
    python -m sdjax.eval --config configs/eval/mlperf_sd.py --model ... --out ...   # MLPerf's settings
    python -m sdjax.eval ... --coordinator=host0:1234 --num-processes=2 --process-id=0  # one per host

Image j of caption id k is drawn from seed k*N + j (sample.py --prompt CAPTION --seed k*N --num-images N gives
it too) and written to OUT/images/k-j.png as its batch is made; a rerun makes only the missing images (with the
same settings: OUT/settings.json). Batches are split over all devices of all processes; process 0 writes the
images, then scores them: OUT/report.json, a row of OUT/metrics.jsonl (and TensorBoard) at --step.
"""
import argparse
import importlib.util
import json
import os
import sys

from sdjax import host_memory
from sdjax.sample_options import add_model_arguments, add_sampling_arguments, sampler_help

PROG = "python -m sdjax.eval"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="FILE[:ARG]: defaults for these options from get_config(ARG) of an "
                                    "ml_collections file (configs/eval/mlperf_sd.py); flags given here win")
    p.add_argument("--captions", help="COCO-style captions: JSONL, CSV or TSV with an id and a caption column")
    p.add_argument("--images-per-caption", type=int, default=1)
    p.add_argument("--limit", type=int, default=0, help="only the first LIMIT captions (0: all)")
    p.add_argument("--out", help="folder of the images (images/), settings.json, report.json and metrics.jsonl")
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--batch-size", type=int, default=None, help="images sampled at once, over all devices "
                   "(default: one per device)")
    p.add_argument("--fid-ref", help="FID's reference: pytorch-fid statistics (.npz) or a folder of images")
    p.add_argument("--inception", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: "
                   "$SDJAX_FID_INCEPTION, or pytorch-fid's cache in $TORCH_HOME/hub/checkpoints)")
    p.add_argument("--dims", type=int, default=2048, choices=[64, 192, 768, 2048], help="FID's Inception features")
    p.add_argument("--clip", help="CLIP score's model: a transformers CLIPModel folder or an open_clip checkpoint")
    p.add_argument("--score-batch-size", type=int, default=50, help="images per Inception / CLIP batch")
    p.add_argument("--step", type=int, default=0, help="the step of the row in metrics.jsonl (a checkpoint's)")
    p.add_argument("--log-dir", help="where metrics.jsonl and TensorBoard events go (default: --out)")
    p.add_argument("--coordinator", help="several processes: address:port of process 0")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--cpu-collectives", help="several processes on CPUs: 'gloo'")
    args = p.parse_args(argv)
    if args.config:
        p.set_defaults(**config_defaults(args.config, vars(args)))
        args = p.parse_args(argv)
    return args


def config_defaults(spec, options):
    """{option: value} of get_config(ARG) in the file of `spec` (FILE[:ARG]), and its "targets" (the report says
    whether they are met); exits naming a key that is no option."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"{PROG}: --config: no such file: {path}")
    module_spec = importlib.util.spec_from_file_location("eval_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = (module.get_config(arg) if arg else module.get_config()).to_dict()
    unknown = sorted(set(config) - set(options) - {"targets"})  # targets: {"fid_max", "clip_cosine_min"}
    if unknown:
        raise SystemExit(f"{PROG}: --config {path}: {unknown} are not options of {PROG}")
    return config


def main(argv=None):
    args = parse_args(argv)
    if args.sampler == "help":
        print(sampler_help())
        return
    import jax
    if args.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", args.cpu_collectives)
    from sdjax.eval import evaluate
    from sdjax.train import distributed
    with distributed.joined(args.coordinator, args.num_processes, args.process_id):
        try:
            report = evaluate.run(args)
        except (ValueError, OSError) as e:  # bad input (WeightLoadError is a ValueError); bugs still trace back
            sys.exit(f"{PROG}: {e}")
    if report is not None:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # before jax starts threads: no page faults on every call (CPU)
    main()
