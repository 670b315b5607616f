"""DreamBooth (config.dreambooth) through the training loop on the tiny config: class images generated once (image i
from seed + i, so a partly generated folder continues with the same images), batches of instance then class examples
with their prompts, and the data position resumed exactly. (The loss: tests/test_train_losses.py.)"""
import os

import numpy as np
import pytest
from PIL import Image

from configs.train import dreambooth as dreambooth_config
from sdjax.text.tokenizer import batch_tokenizers, tokenize
from sdjax.train import loop
from sdjax.train.ldm import dreambooth, ldm_stage

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
SIZE = 16


def _images(folder, n, seed):
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8)).save(folder / f"img{i}.png")


def test_class_images_cached_and_batches(tmp_path):
    _images(tmp_path / "dog", 3, 0)
    _images(tmp_path / "given", 1, 1)  # one class image given: two are generated
    config = dreambooth_config.get_config()
    config.dreambooth.update(instance_data_dir=str(tmp_path / "dog"), class_data_dir=str(tmp_path / "given"),
                             num_class_images=3, class_num_steps=2)
    config.data.update(image_size=SIZE, data_dir=str(tmp_path / "tfds"))
    config.update(total_steps=1, mesh=dict(data=1, fsdp=1, min_shard_size=2 ** 14))
    workdir = str(tmp_path / "run")
    loop.train(config, workdir)
    out = tmp_path / "run" / dreambooth.CLASS_IMAGES
    made = sorted(os.listdir(out))
    assert made == ["class_00000.png", "class_00001.png"]
    first = {n: ((out / n).read_bytes(), os.stat(out / n).st_mtime_ns) for n in made}

    # A rerun (what setup calls on resume) with image 1 lost: only that one is made again, the same image
    os.remove(out / "class_00001.png")
    pre = ldm_stage.load(config)  # the run's model: from-scratch params keyed by the seed
    tokenizers = batch_tokenizers(pre)
    make = dreambooth.data_maker(config, pre, workdir)
    assert sorted(os.listdir(out)) == made
    assert os.stat(out / "class_00000.png").st_mtime_ns == first["class_00000.png"][1]  # not rewritten
    assert os.stat(out / "class_00001.png").st_mtime_ns != first["class_00001.png"][1]
    assert (out / "class_00001.png").read_bytes() == first["class_00001.png"][0]
    assert not np.array_equal(*(np.asarray(Image.open(out / n)) for n in made))  # seeds differ per image

    # A batch: 2 instance examples with the instance prompt, then 2 class examples with the class prompt
    data = make(config, tokenizers, 4, 0, 0, 1)
    batch = next(data)
    np.testing.assert_array_equal(batch["class_example"], [0, 0, 1, 1])
    ids = [tokenize(tokenizers["input_ids"], [p])[0][0] for p in ("a photo of sks dog", "a photo of dog")]
    np.testing.assert_array_equal(batch["input_ids"], [ids[0], ids[0], ids[1], ids[1]])
    pixels = lambda folder: {np.asarray(Image.open(folder / n)).tobytes() for n in os.listdir(folder)}  # noqa: E731
    as_uint8 = lambda x: np.round((x + 1) * 127.5).astype(np.uint8).tobytes()  # noqa: E731
    assert {as_uint8(x) for x in batch["images"][:2]} <= pixels(tmp_path / "dog")
    assert {as_uint8(x) for x in batch["images"][2:]} <= pixels(tmp_path / "given") | pixels(out)
    state = data.get_state()
    want = next(data)
    again = make(config, tokenizers, 4, 0, 0, 1)
    again.set_state(state)
    got = next(again)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
