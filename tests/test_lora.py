"""sd.load_lora against diffusers' load_lora_weights + fuse_lora, both loading the same files into the same saved
tiny pipelines: PEFT-built LoRAs (random, non-zero B) saved with save_lora_weights, and kohya files of them."""
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sdjax.pipeline import StableDiffusion

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
TOL = 1e-4  # mean abs difference of float images in [0, 1]; each LoRA moves them by more than 100x that
STEPS, SIZE, PROMPT = 3, 16, "a red circle"
# LoRA A: attention, feed-forward and projections of the U-Net, every linear layer of the text tower
A_UNET = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]
A_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
# LoRA B, a LoCon: the convolutions (3x3 and 1x1), time embedding, samplers, and some linear layers
B_UNET = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "downsamplers.0.conv",
          "upsamplers.0.conv", "linear_1", "linear_2", "proj_out", "ff.net.0.proj"]
B_TEXT = ["fc2", "out_proj"]


@pytest.fixture(scope="module", autouse=True)
def peft_gate():
    """transformers 5.2x asks for peft >= 0.22 before a text tower takes an adapter, and the newest peft on the
    registry is 0.21.2, which does all these tests ask: the gate is lowered here, in the tests only."""
    import transformers.integrations.peft as gate
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gate, "MIN_PEFT_VERSION", "0.21.0")
        yield


def add_lora(model, targets, rank, alpha, seed, **config):
    """A PEFT LoRA on `model`'s `targets` with random, non-zero B; (its state dict, its LoraConfig as a dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(seed)  # A's initialisation
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian",
                                 **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return get_peft_model_state_dict(model), model.peft_config["default"].to_dict()


def save_peft_lora(kind, folder, out, towers, seed):
    """Save a LoRA ({component: (targets, rank, alpha)}) made on diffusers' `kind` pipeline of `folder` with
    save_lora_weights (and its PEFT configs in the header); its path."""
    import diffusers
    pipe = getattr(diffusers, kind).from_pretrained(folder)
    layers = {}
    for i, (component, (targets, rank, alpha, *config)) in enumerate(towers.items()):
        state, config = add_lora(getattr(pipe, component), targets, rank, alpha, seed + i, **dict(*config))
        layers[f"{component}_lora_layers"], layers[f"{component}_lora_adapter_metadata"] = state, config
    pipe.save_lora_weights(out, **layers)
    return os.path.join(out, "pytorch_lora_weights.safetensors")


def kohya_file(peft_file, out, seed):
    """The LoRA of `peft_file` as a kohya file (diffusers' own writer, convert_state_dict_to_kohya), the text tower
    under kohya's SD 1.x names (`lora_te_text_model_...`), alphas not the ranks (the writer's): the U-Net's random,
    the text tower's one for all, as kohya writes them (diffusers reads per-layer alphas of a text tower as one)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file as load_torch
    tensors = convert_state_dict_to_kohya(load_torch(peft_file))
    rng = np.random.default_rng(seed)
    out_tensors = {}
    for key, value in tensors.items():
        key = key.replace("lora_te1_", "lora_te_text_model_")
        alpha = rng.uniform(1, 4) if key.startswith("lora_unet_") else 1.5
        out_tensors[key] = np.asarray(alpha if key.endswith(".alpha") else value.numpy(), np.float32)
    save_file(out_tensors, out)
    return out


@pytest.fixture(scope="module")
def lora_files(torch_folder, tmp_path_factory):
    """{"a": PEFT file, "b": kohya LoCon file} for the tiny SD folder."""
    folder, root = torch_folder[1], tmp_path_factory.mktemp("loras")
    rslora = {"use_rslora": True, "alpha_pattern": {"attn2.to_q": 3}}  # PEFT's config in the file's header
    a = save_peft_lora("StableDiffusionPipeline", folder, str(root / "a"),
                       {"unet": (A_UNET, 4, 8, rslora), "text_encoder": (A_TEXT, 2, 3)}, 0)
    b = save_peft_lora("StableDiffusionPipeline", folder, str(root / "b"),
                       {"unet": (B_UNET, 3, 3), "text_encoder": (B_TEXT, 2, 2)}, 10)
    return {"a": a, "b": kohya_file(b, str(root / "b_kohya.safetensors"), 1)}


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((1, SIZE // 2, SIZE // 2, 4), np.float32)


@pytest.fixture(scope="module")
def sd(torch_folder):
    return StableDiffusion.load(torch_folder[1])


def run(sd, noise, sampler="ddim", **kw):
    """Float images of `sampler` (the tiny models' own: SD's DDIM, SDXL's Euler) from the initial `noise`."""
    return sd.generate(PROMPT, num_steps=STEPS, sampler=sampler, height=SIZE, width=SIZE, noise={"initial": noise},
                       output_type="np", progress=False, **kw)


def reference(kind, folder, loras, noise, **kw):
    """diffusers' images with each (file, scale) of `loras` fused in turn (load_lora_weights, fuse_lora)."""
    import diffusers
    pipe = getattr(diffusers, kind).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for path, scale in loras:
        pipe.load_lora_weights(path)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # the fused weights stay
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=latents, output_type="np",
                **kw).images


def _device_bytes():
    return sum(x.nbytes for x in jax.live_arrays())


@pytest.fixture(scope="module")
def base(sd, noise):
    return run(sd, noise)


def test_peft_lora_matches_diffusers_and_unloads_exactly(sd, base, torch_folder, lora_files, noise):
    compiled, before = sd.compile_count, _device_bytes()
    assert sd.load_lora(lora_files["a"]) == "pytorch_lora_weights"
    assert _device_bytes() == before  # merged in place, the base kernels kept on the host (none on the devices)
    sd.set_lora_scale(0.7)  # from the base weights, as a load at 0.7
    assert sd.loras == {"pytorch_lora_weights": 0.7}
    out = run(sd, noise)
    assert sd.compile_count == compiled  # the weights are arguments of the compiled loop
    ref = reference("StableDiffusionPipeline", torch_folder[1], [(lora_files["a"], 0.7)], noise)
    err, effect = np.abs(out - ref).mean(), np.abs(out - base).mean()
    print(f"PEFT LoRA: mean abs diff {err:.2e}, effect {effect:.2e}")
    assert err <= TOL and effect > 100 * TOL, (err, effect)
    sd.unload_loras()
    assert sd.loras == {} and (run(sd, noise) == base).all()
    assert sd.compile_count == compiled


def test_kohya_locon_and_two_loras_match_diffusers(sd, base, torch_folder, lora_files, noise):
    folder = torch_folder[1]
    sd.load_lora(lora_files["b"], scale=0.8, name="b")
    try:
        alone = run(sd, noise)
        err = np.abs(alone - reference("StableDiffusionPipeline", folder, [(lora_files["b"], 0.8)], noise)).mean()
        effect = np.abs(alone - base).mean()
        print(f"kohya LoCon: mean abs diff {err:.2e}, effect {effect:.2e}")
        assert err <= TOL and effect > 100 * TOL, (err, effect)
        sd.load_lora(lora_files["a"], scale=-0.5, name="a")
        both = run(sd, noise)
        ref = reference("StableDiffusionPipeline", folder, [(lora_files["b"], 0.8), (lora_files["a"], -0.5)], noise)
        err, effect = np.abs(both - ref).mean(), np.abs(both - alone).mean()
        print(f"two LoRAs: mean abs diff {err:.2e}, effect of the second {effect:.2e}")
        assert err <= TOL and effect > 100 * TOL, (err, effect)
    finally:
        sd.unload_loras()


def _older_names(tensors, processors):
    """A's PEFT tensors under the names of diffusers < 0.22 (`lora.down`; the text tower's `lora_linear_layer`, with
    `text_model.`), alphas as tensors; processors: the attention layers as attention processors (diffusers < 0.17).
    The alpha tensors that give A's header config: alpha / sqrt(4) of rsLoRA = (2 alpha) / 4 (exactly)."""
    alphas = {"unet": lambda m: 2.0 * (3 if m.endswith("attn2.to_q") else 8), "text_encoder": lambda m: 3.0}
    out = {}
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_")
        part = {"A.weight": "down.weight", "B.weight": "up.weight"}[part]
        if component == "text_encoder":
            module = f"text_model.{module}"
            if processors and "self_attn" in module:
                module = module.replace("q_proj", "to_q").replace("k_proj", "to_k").replace("v_proj", "to_v")
                key = f"{component}.{module.replace('out_proj', 'to_out')}_lora.{part}"
            else:
                key = f"{component}.{module}.lora_linear_layer.{part}"
        elif processors and ".attn" in module:
            head, _, layer = module.removesuffix(".0").rpartition(".")  # to_out.0 -> to_out
            key = f"{component}.{head}.processor.{layer}_lora.{part}"
        else:
            key = f"{component}.{module}.lora.{part}"
        out[key] = value
        out[f"{component}.{module}.alpha"] = np.asarray(alphas[component](module), np.float32)
    return out


def _kernels(sd):
    return [np.asarray(x) for x in jax.tree.leaves(sd.params)]


@pytest.mark.parametrize("processors", [False, True])
def test_older_diffusers_names_merge_the_same(sd, lora_files, tmp_path, processors):
    """The same LoRA under the names of older diffusers versions gives the PEFT file's weights, bit for bit."""
    sd.load_lora(lora_files["a"], scale=0.7)
    expected = _kernels(sd)
    sd.unload_loras()
    old = tmp_path / "old.safetensors"
    save_file(_older_names(load_file(lora_files["a"]), processors), str(old))
    assert any("processor.to_out_lora" in k for k in load_file(str(old))) == processors
    sd.load_lora(str(old), scale=0.7)
    try:
        assert all((x == y).all() for x, y in zip(_kernels(sd), expected))
    finally:
        sd.unload_loras()


def test_what_is_not_a_lora_is_refused(sd, lora_files, tmp_path, refused_files):
    """One line naming the file, what it is and some of its keys; nothing merged."""
    a = load_file(lora_files["a"])
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w = np.zeros((4, 32), np.float32)
    cases = {
        "loha": ({"lora_unet_conv_in.hada_w1_a": w, "lora_unet_conv_in.hada_w1_b": w}, "a LoHa file (keys like "
                 "lora_unet_conv_in.hada_w1_a, lora_unet_conv_in.hada_w1_b), not a LoRA"),
        "lokr": ({"lora_unet_conv_in.lokr_w1": w}, "a LoKr file (keys like lora_unet_conv_in.lokr_w1)"),
        "dora": ({**a, f"{q}.lora_magnitude_vector": w[0]}, f"a DoRA file (keys like {q}.lora_magnitude_vector)"),
        "embedding": ({"emb_params": w}, "a textual-inversion embedding file (keys like emb_params), not a LoRA"),
        "unknown": ({**a, "unet.conv_in.weight": w}, "1 tensor(s) that are no LoRA layer sdjax knows (e.g. "
                    "unet.conv_in.weight)"),
        "half": ({k: v for k, v in a.items() if k != f"{q}.lora_B.weight"},
                 f"unet {q[5:]} has no LoRA up tensor; the file is incomplete"),
        "xl": ({**a, "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": w},
               "1 LoRA layer(s) name no layer of this model (components ['text_encoder', 'unet', 'vae']): "
               "text_encoder_2: text_model_encoder_layers_0_self_attn_q_proj"),
        "shape": ({**a, f"{q}.lora_A.weight": np.zeros((4, 48), np.float32)},
                  f"unet {q[5:]}: down (4, 48) and up (32, 4) (PyTorch layout) do not fit the model's layer of "
                  "kernel (32, 32)"),
    }
    refused_files(sd.load_lora, cases)
    with pytest.raises(ValueError, match="LoRA file not found: nope.safetensors"):
        sd.load_lora("nope.safetensors")
    with pytest.raises(ValueError, match="a LoRA's scale must be a finite number, got nan"):
        sd.load_lora(lora_files["a"], scale=float("nan"))
    assert sd.loras == {}


def test_sample_cli_loras_and_embedding(sd, torch_folder, lora_files, tmp_path):
    """sample.py --lora PATH[:SCALE] (repeated) and --embedding PATH write the API's images, the LoRAs and embeddings
    in the PNG metadata."""
    import sys
    from PIL import Image
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import sample
    from sdjax.images import read_png_metadata
    embedding = str(tmp_path / "shiny.safetensors")
    save_file({"emb_params": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}, embedding)
    prompt = "a shiny red circle"
    sample.main(["--model", torch_folder[1], "--prompt", prompt, "--steps", str(STEPS), "--sampler", "ddim",
                 "--height", str(SIZE), "--width", str(SIZE), "--out", str(tmp_path),
                 "--lora", f"{lora_files['a']}:0.7", "--lora", lora_files["b"], "--embedding", embedding])
    sd.load_lora(lora_files["a"], 0.7)
    sd.load_lora(lora_files["b"])
    sd.load_textual_inversion(embedding)  # its token stays in sd's tokenizer: no later test here uses sd
    try:
        expected = sd.generate(prompt, num_steps=STEPS, sampler="ddim", height=SIZE, width=SIZE, progress=False)
    finally:
        sd.unload_loras()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "0000-seed0.png")), expected[0])
    meta = read_png_metadata(tmp_path / "0000-seed0.png")
    assert meta["lora"] == "pytorch_lora_weights.safetensors:0.7 b_kohya.safetensors:1"
    assert meta["embeddings"] == "shiny.safetensors"


# Each tower's LoRA has out_proj: diffusers 0.42 tells a text LoRA's older key format by its out_proj layers (without,
# it refuses a PEFT LoRA of the MLP and drops kohya's other attention layers as "unexpected")
XL_TOWERS = {"unet": (["to_q", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj", "ff.net.2"], 4, 6),
             "text_encoder": (["q_proj", "k_proj", "out_proj"], 2, 2),
             "text_encoder_2": (["out_proj", "v_proj", "fc1"], 2, 4)}


def xl_kohya_file(peft_file, params, out):
    """The LoRA of `peft_file` (XL_TOWERS) under the names kohya's SDXL trainer writes (sdjax's table: the U-Net's
    original names, lora_te1_/lora_te2_), the same alphas."""
    from sdjax.weights.lora_files import kohya_names, layer_names
    tensors = {}
    for key, value in load_file(peft_file).items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_")
        path = layer_names(component, params[component])[module.replace(".", "_")]
        name = kohya_names(component, params[component], xl=True)[path]
        tensors[f"{name}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = value
        tensors[f"{name}.alpha"] = np.asarray(XL_TOWERS[component][2], np.float32)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    save_file(tensors, out)
    return out


def test_sdxl_lora_on_both_towers_matches_diffusers(sdxl_folders, tmp_path):
    """A PEFT LoRA on the U-Net and both towers; the same as kohya's SDXL file (original U-Net names)."""
    folder = sdxl_folders["base"]
    peft = save_peft_lora("StableDiffusionXLPipeline", folder, str(tmp_path / "xl"), XL_TOWERS, 20)
    noise = np.random.default_rng(1).standard_normal((1, SIZE // 2, SIZE // 2, 4), np.float32)
    sd = StableDiffusion.load(folder)
    xl_run = lambda: run(sd, noise, "euler", guidance_scale=5.0)  # noqa: E731
    base = xl_run()
    sd.load_lora(peft, scale=0.9)
    out = xl_run()
    merged = _kernels(sd)
    ref = reference("StableDiffusionXLPipeline", folder, [(peft, 0.9)], noise, guidance_scale=5.0)
    err, effect = np.abs(out - ref).mean(), np.abs(out - base).mean()
    print(f"SDXL LoRA: mean abs diff {err:.2e}, effect {effect:.2e}")
    assert err <= TOL and effect > 100 * TOL, (err, effect)
    sd.unload_loras()
    kohya = xl_kohya_file(peft, sd.params, str(tmp_path / "xl_kohya.safetensors"))
    sd.load_lora(kohya, scale=0.9)
    assert all((x == y).all() for x, y in zip(_kernels(sd), merged))  # sdjax reads both files alike,
    ref = reference("StableDiffusionXLPipeline", folder, [(kohya, 0.9)], noise, guidance_scale=5.0)
    assert np.abs(out - ref).mean() <= TOL  # and so does diffusers
