"""python -m sdjax.eval (issue 33, item 4) on the bundled demo model, run by two processes on 127.0.0.1: each image is the
API's image of its caption and seed (one process's, bit for bit), the report's scores are the metrics' of those
images and one process's scores, and an interrupted evaluation resumes making only what is missing. config.eval
(item 5): training's evaluator and the memory estimate's count of its networks."""
import functools
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from eval_fakes import build_clip_folder, write_fid_inception
from sdjax.demo import DEMO_MODEL
from sdjax.eval import __main__ as eval_cli, clip_score, fid
from sdjax.pipeline import StableDiffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = {7: "a red circle", 2: "a blue square on the left", 40: "a green triangle"}
PER_CAPTION, STEPS = 2, 2


def write_captions(folder):
    """A COCO-style JSONL listing (ids not in order, an image_id column beside)."""
    path = os.path.join(folder, "captions.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"image_id": 100 + k, "id": k, "caption": c}) + "\n" for k, c in CAPTIONS.items())
    return path


def argv(model, captions, out, *more):
    return ["--model", model, "--captions", captions, "--out", str(out), "--images-per-caption", str(PER_CAPTION),
            "--steps", str(STEPS), "--sampler", "ddim", "--batch-size", "4", *more]


def images_of(out):
    return {name: np.asarray(Image.open(os.path.join(out, "images", name)))
            for name in sorted(os.listdir(os.path.join(out, "images")))}


def report_of(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def scoring(tmp_path_factory, tokenizer):
    """The scoring flags: FID (64 features) against a folder of 5 images with pytorch-fid's Inception (random
    weights), and CLIP score with a tiny random CLIP."""
    folder = tmp_path_factory.mktemp("scoring")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / f"ref{i}.png")
    weights = write_fid_inception(folder / "pt_inception.pth")
    clip = build_clip_folder(str(tmp_path_factory.mktemp("openai_clip")), tokenizer)
    return dict(fid_ref=str(folder), inception=weights, clip=clip)


def score_flags(scoring):
    return ["--fid-ref", scoring["fid_ref"], "--inception", scoring["inception"], "--dims", "64", "--clip",
            scoring["clip"], "--score-batch-size", "8"]


def two_processes(*args):
    """python -m sdjax.eval as 2 processes on 127.0.0.1 (gloo), one CPU device each."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "sdjax.eval", *args, f"--coordinator=127.0.0.1:{port}",
                               "--num-processes=2", f"--process-id={i}", "--cpu-collectives=gloo"],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def first_run(scoring, tmp_path_factory):
    """An evaluation of the demo model by two processes: 3 captions x 2 images in batches of 4 split over both
    (the last padded), scored; its folder and captions file."""
    folder = tmp_path_factory.mktemp("eval")
    captions = write_captions(str(folder))
    two_processes(*argv(DEMO_MODEL, captions, folder / "out", *score_flags(scoring)))
    return folder / "out", captions


@pytest.fixture(scope="module")
def sd():
    return StableDiffusion.load(DEMO_MODEL)


def eval_config(scoring, captions, **fields):
    """config.eval (configs/train/tiny.py's) scoring as score_flags does, on `captions`."""
    from configs.train import tiny
    c = tiny.get_config().eval
    c.update(dict(dict(every=1, captions=captions, num_steps=STEPS, sampler="ddim", fid_ref=scoring["fid_ref"],
                       inception=scoring["inception"], dims=64, clip=scoring["clip"], score_batch_size=8), **fields))
    return c


@pytest.fixture(scope="module")
def evaluator(first_run, sd, scoring):
    """config.eval's Evaluator (what training runs every eval.every steps) of the first run's settings; its Scorer
    holds the Inception and CLIP the tests score with."""
    from sdjax.train.ldm.periodic_eval import Evaluator
    c = eval_config(scoring, first_run[1], num_captions=0, images_per_caption=PER_CAPTION, guidance_scale=7.5,
                    batch_size=4)
    return Evaluator(c, sd.mesh)


def test_images_are_the_apis_of_each_caption_and_seed(first_run, sd):
    """Image j of caption id k is generate(caption, seed=k*N + j) in one process, bit for bit; the seeds make them
    differ."""
    out, _ = first_run
    got = images_of(out)
    assert sorted(got) == sorted(f"{k}-{j}.png" for k in CAPTIONS for j in range(PER_CAPTION))
    for k, caption in CAPTIONS.items():  # (batches of 4, as the evaluation's: the same programs)
        ref = sd.generate(caption, seed=k * PER_CAPTION, num_images_per_prompt=4, num_steps=STEPS, sampler="ddim",
                          progress=False)
        for j in range(PER_CAPTION):
            np.testing.assert_array_equal(got[f"{k}-{j}.png"], ref[j])
    assert np.abs(got["7-0.png"].astype(int) - got["7-1.png"]).mean() > 5  # another seed, another image
    report = report_of(out)
    assert report["images"] == 6 and report["captions"] == 3
    assert report["settings"]["num_steps"] == STEPS and report["settings"]["guidance_scale"] == 7.5


def test_report_holds_the_metrics_of_the_images(first_run, scoring, evaluator):
    """report.json's FID and CLIP score are sdjax.eval.fid's and clip_score's of the written images and their
    captions (each a few times its tolerance away from what other images or captions score); metrics.jsonl and
    TensorBoard get them as a row at step 0."""
    out, _ = first_run
    report = report_of(out)
    inception, clip = evaluator.scorer.inception, evaluator.scorer.clip
    fid_of = lambda folder: fid.fid_from_paths(str(folder), scoring["fid_ref"], inception, 64, 8)  # noqa: E731
    assert report["fid"] == pytest.approx(fid_of(out / "images"), rel=1e-6)
    names = sorted(images_of(out))
    images = np.stack([images_of(out)[n] for n in names])
    captions = [CAPTIONS[int(n.split("-")[0])] for n in names]
    cosines = clip.cosines(images, captions)
    assert report["clip_cosine"] == pytest.approx(np.mean(cosines), abs=1e-6)
    assert report["clip_score"] == pytest.approx(clip_score.score(cosines), abs=1e-4)
    assert abs(np.mean(clip.cosines(images, captions[::-1])) - report["clip_cosine"]) > 1e-4  # other captions
    assert abs(fid_of(scoring["fid_ref"])) < 1e-6 < report["fid"] * 1e-4  # the reference against itself: 0
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [{"step": 0, **{k: report[k] for k in ("fid", "clip_score", "clip_cosine")}}]
    assert os.listdir(out / "tensorboard")


def test_an_interrupted_evaluation_resumes_without_regenerating(first_run, tmp_path, monkeypatch):
    """A run killed mid-way leaves some images, and half-written ones under .part names: the rerun (one process)
    makes only the missing ones in one batch, the kept files untouched, the others the first run's bits, the same
    report; a third run makes none; other settings in the same folder are refused."""
    out, captions = first_run
    resumed = tmp_path / "out"
    shutil.copytree(out, resumed)
    for name in ("7-1.png", "2-1.png", "40-0.png"):
        os.rename(resumed / "images" / name, resumed / "images" / f"{name}.part")  # as a kill leaves them
    kept = {name: (os.stat(resumed / "images" / name).st_ino, os.stat(resumed / "images" / name).st_mtime_ns)
            for name in ("7-0.png", "2-0.png", "40-1.png")}
    made, generate = [], StableDiffusion.generate

    @functools.wraps(generate)
    def counted(self, prompt, **kw):
        made.append(list(prompt))
        return generate(self, prompt, **kw)
    monkeypatch.setattr(StableDiffusion, "generate", counted)
    eval_cli.main(argv(DEMO_MODEL, captions, resumed))  # (unscored: the scores are the other tests')
    assert made == [[CAPTIONS[7], CAPTIONS[2], CAPTIONS[40], CAPTIONS[40]]]  # one batch, padded to 4
    for name, stat in kept.items():
        assert (os.stat(resumed / "images" / name).st_ino, os.stat(resumed / "images" / name).st_mtime_ns) == stat
    assert images_of(resumed).keys() == images_of(out).keys()  # the half-written files replaced
    for name, image in images_of(out).items():
        np.testing.assert_array_equal(images_of(resumed)[name], image)
    unscored = {k: v for k, v in report_of(out).items() if k not in ("fid", "clip_score", "clip_cosine")}
    assert report_of(resumed) == dict(unscored, fid_ref=None, dims=None, clip=None)
    made.clear()
    eval_cli.main(argv(DEMO_MODEL, captions, resumed))
    assert made == []
    with pytest.raises(SystemExit) as e:
        eval_cli.main(argv(DEMO_MODEL, captions, resumed, "--steps", "3"))
    assert f"--out {resumed} holds images made with other settings (num_steps 2 there, 3 here)" in str(e.value)


BAD_CAPTIONS = {  # a captions file's text -> the message
    "id,caption\n1,a\nx,b\n": "row 2: id 'x' is not an integer",
    "id,caption\n1,a\n1,b\n": "row 2: id 1 is also row 1's",
    "id,caption\n-3,a\n": "row 1: id -3 is negative",
    "id,text_en\n1,a\n": "row 1 has none of the columns ('caption', 'text'); found ['id', 'text_en']",
    "id,caption\n": "no captions",
}


def test_bad_input_ends_in_one_line(tmp_path, capsys):
    """Refused before the model loads, with the option or file and row named."""
    def message(*args):
        with pytest.raises(SystemExit) as e:
            eval_cli.main(["--model", str(tmp_path), "--out", str(tmp_path / "out"), *args])
        text = str(e.value)
        assert text.startswith("python -m sdjax.eval: ") and "\n" not in text, text
        return text
    for i, (text, expected) in enumerate(BAD_CAPTIONS.items()):
        path = tmp_path / f"bad{i}.csv"
        path.write_text(text)
        text = message("--captions", str(path))
        assert text.startswith(f"python -m sdjax.eval: --captions {path}") and expected in text, text
    good = write_captions(str(tmp_path))
    assert "--captions: no such file" in message("--captions", str(tmp_path / "none.tsv"))
    assert "give --captions" in message()
    assert "--images-per-caption must be >= 1, got 0" in message("--captions", good, "--images-per-caption", "0")
    assert "--fid-ref: no such file or folder" in message("--captions", good, "--fid-ref", str(tmp_path / "x.npz"))
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--captions", good, "--out", str(tmp_path / "file")])
    assert f"--out {tmp_path / 'file'} is a file" in str(e.value)
    config = tmp_path / "config.py"
    config.write_text("import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'stepz': 3})\n")
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--config", str(config), "--captions", good, "--out", str(tmp_path / "out")])
    assert "['stepz'] are not options of python -m sdjax.eval" in str(e.value)


def test_mlperf_config_sets_the_options():
    """configs/eval/mlperf_sd.py: MLPerf's sampling (DDIM, 50 steps, guidance 8, 512²); flags given win."""
    args = eval_cli.parse_args(["--config", os.path.join(ROOT, "configs/eval/mlperf_sd.py"), "--steps", "20"])
    assert (args.sampler, args.guidance, args.height, args.width, args.dims, args.limit) == ("ddim", 8.0, 512, 512,
                                                                                           2048, 0)
    assert args.steps == 20 and args.targets == {"fid_max": 90.0, "clip_cosine_min": 0.15}
    assert eval_cli.parse_args(["--config", os.path.join(ROOT, "configs/eval/mlperf_sd.py:1k")]).limit == 1000


def test_training_s_evaluation_scores_as_the_cli(first_run, sd, evaluator):
    """The Evaluator, in this one process, gives the pipeline's images the scores the two processes of
    python -m sdjax.eval gave the same model and settings."""
    report = report_of(first_run[0])
    assert evaluator(sd) == pytest.approx({f"eval/{k}": report[k] for k in ("fid", "clip_score", "clip_cosine")},
                                          rel=1e-6)


@pytest.mark.slow
def test_training_evaluates_its_ema_weights(scoring, tmp_path):
    """A 4-step tiny run with config.eval every 2 steps: eval/fid, eval/clip_score and eval/clip_cosine rows at
    steps 2 and 4 of metrics.jsonl (and TensorBoard); step 4's are python -m sdjax.eval's of the run's export (its
    EMA weights), step 2's differ (the weights moved)."""
    import train_worker
    from train_fakes import fake_data
    from sdjax.train import loop
    from sdjax.train.export import export
    captions = write_captions(str(tmp_path))
    c = train_worker.tiny_config(4)
    c.eval = eval_config(scoring, captions, every=2, num_captions=2, images_per_caption=1, guidance_scale=3.0,
                         batch_size=2)
    loop.train(c, str(tmp_path / "run"), fake_data())
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = {r["step"]: r for r in map(json.loads, f) if "eval/fid" in r}
    assert sorted(rows) == [2, 4]
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tensorboard").iterdir())
    assert all(f"eval/{name}".encode() in events for name in ("fid", "clip_score", "clip_cosine"))
    export(str(tmp_path / "run"), str(tmp_path / "exported"))
    eval_cli.main(["--model", str(tmp_path / "exported"), "--captions", captions, "--limit", "2", "--out",
                   str(tmp_path / "out"), "--steps", str(STEPS), "--sampler", "ddim", "--guidance", "3",
                   "--batch-size", "2", *score_flags(scoring)])
    report = report_of(tmp_path / "out")
    for name in ("fid", "clip_score", "clip_cosine"):
        assert rows[4][f"eval/{name}"] == pytest.approx(report[name], rel=1e-6)
    assert abs(rows[2]["eval/fid"] - rows[4]["eval/fid"]) > 1e-3 * report["fid"]


def test_memory_estimate_counts_the_scoring_networks(scoring, tmp_path):
    """sdjax.train.memory's `eval` bytes (from the networks' configurations) are what the loaded Inception and CLIP
    hold; none without config.eval."""
    import jax
    from configs.train import tiny
    from sdjax.train.ldm.periodic_eval import scoring_params
    config = tiny.get_config()
    assert scoring_params(config) == {}
    config.eval = eval_config(scoring, write_captions(str(tmp_path)))
    counted = {k: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(v)) for k, v in
               scoring_params(config).items()}
    held = lambda params: sum(x.nbytes for x in jax.tree.leaves(params))  # noqa: E731
    assert counted == {"inception": held(fid.load_inception(scoring["inception"], 64).params),
                       "clip": held(clip_score.load_clip(scoring["clip"]).params)}
