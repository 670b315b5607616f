"""sample.py: the images it writes are the API's images, with their settings in the PNG metadata.

Its errors on bad input: tests/test_cli_errors.py."""
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402
from sdjax.images import make_grid, read_png_metadata  # noqa: E402
from sdjax.pipeline import StableDiffusion  # noqa: E402


def test_sample_cli_writes_the_api_images(torch_folder, tmp_path, capsys):
    folder = torch_folder[1]
    out = tmp_path / "out"
    sample.main(["--model", folder, "--prompt", "a red circle", "--prompt", "a cyan square", "--num-images", "2",
                 "--steps", "3", "--guidance", "4", "--sampler", "ddim", "--seed", "7", "--height", "16",
                 "--width", "16", "--out", str(out), "--grid"])
    printed = capsys.readouterr().out
    assert "compile" in printed and "s/step" in printed
    expected = StableDiffusion.load(folder).generate(
        ["a red circle", "a cyan square"], num_images_per_prompt=2, num_steps=3, guidance_scale=4.0,
        sampler="ddim", seed=7, height=16, width=16, progress=False)
    files = sorted(p for p in os.listdir(out) if p != "grid-0000.png")
    assert files == ["0000-seed7.png", "0001-seed8.png", "0002-seed9.png", "0003-seed10.png"]
    for i, name in enumerate(files):
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), expected[i])
        meta = read_png_metadata(out / name)
        assert meta["prompt"] == ["a red circle", "a cyan square"][i // 2]
        assert (meta["seed"], meta["sampler"], meta["steps"], meta["guidance"]) == (str(7 + i), "ddim", "3", "4.0")
        assert meta["model"] == os.path.basename(folder)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "grid-0000.png")), make_grid(expected))


def test_sdxl_base_and_refiner(sdxl_folders, tmp_path):
    """--refiner: the base's latents at --refiner-start, continued by the refiner; the default guidance is SDXL's."""
    out = tmp_path / "out"
    sample.main(["--model", sdxl_folders["base"], "--refiner", sdxl_folders["refiner"], "--prompt", "a red circle",
                 "--prompt-2", "on the left", "--steps", "4", "--sampler", "euler", "--seed", "3", "--height", "16",
                 "--width", "16", "--out", str(out)])
    kw = dict(num_steps=4, sampler="euler", seed=3, height=16, width=16, progress=False)
    latents = StableDiffusion.load(sdxl_folders["base"]).generate(
        "a red circle", prompt_2="on the left", denoising_end=0.8, output_type="latent", **kw)
    expected = StableDiffusion.load(sdxl_folders["refiner"]).generate(
        "a red circle", prompt_2="on the left", image=latents, denoising_start=0.8, **kw)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "0000-seed3.png")), expected[0])
    meta = read_png_metadata(out / "0000-seed3.png")
    assert (meta["guidance"], meta["prompt_2"], meta["refiner_start"]) == ("5.0", "on the left", "0.8")


def test_second_run_loads_the_sampling_loop_from_the_cache(torch_folder, tmp_path):
    """sample.py compiles into --compilation-cache; the same run again loads the sampling loop from there: its
    compile seconds (as printed) are a small fraction of the first run's, it writes nothing there, not even the
    same entries anew, and it makes the same image, numbered after the first run's (never overwritten)."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample.py"),
           "--model", torch_folder[1], "--prompt", "a red circle", "--steps", "2", "--height", "16", "--width", "16",
           "--sampler", "euler_a", "--compilation-cache", str(cache), "--out", str(out)]
    entries = lambda: {p.name: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}  # noqa: E731

    def run():
        text = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
        return float(re.search(r"compile ([\d.]+) s", text).group(1))
    first = run()
    written = entries()
    assert written
    second = run()
    print(f"compile seconds: first run {first:.2f}, second run {second:.2f}")
    assert second < 0.2 * first
    assert entries() == written
    assert sorted(os.listdir(out)) == ["0000-seed0.png", "0001-seed0.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "0000-seed0.png")),
                                  np.asarray(Image.open(out / "0001-seed0.png")))


def test_sampler_help_and_no_import_noise(torch_folder):
    """--sampler help lists every sampler with its diffusers class; a run where transformers finds no PyTorch prints
    nothing but its own lines (transformers' advice is silenced; shown: a plain `import transformers` prints it)."""
    from sdjax.diffusion.samplers import SAMPLERS, SCHEDULER_CLASSES
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    listed = subprocess.run([sys.executable, os.path.join(root, "sample.py"), "--sampler", "help"], check=True,
                            capture_output=True, text=True).stdout
    assert all(f"{name} " in listed and SCHEDULER_CLASSES[name] in listed for name in SAMPLERS)
    no_torch = ("import sys, runpy, importlib.util as u; f = u.find_spec; "  # transformers finds no PyTorch
                "u.find_spec = lambda n, *a: None if n.split('.')[0] == 'torch' else f(n, *a); ")
    cli = no_torch + (f"sys.argv = ['sample.py', '--model', {torch_folder[1]!r}, '--prompt', 'x', '--steps', '0']; "
                      f"runpy.run_path({os.path.join(root, 'sample.py')!r}, run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}  # as a user's shell
    run = subprocess.run([sys.executable, "-c", cli], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "num_steps must be" in run.stderr
    assert "PyTorch" not in run.stderr + run.stdout
    plain = subprocess.run([sys.executable, "-c", no_torch + "import transformers"], capture_output=True, text=True,
                           env=env)
    assert "PyTorch was not found" in plain.stderr
