"""sd.load_lora against diffusers' load_lora_weights + fuse_lora, both loading the same files into the same saved
tiny pipelines: PEFT-built LoRAs (random, non-zero B) saved with save_lora_weights, and kohya files of them."""
import os

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


def add_lora(model, targets, rank, alpha, seed):
    """A PEFT LoRA on `model`'s `targets` with random, non-zero B; (its state dict, its LoraConfig as a dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
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
    for i, (component, (targets, rank, alpha)) in enumerate(towers.items()):
        state, config = add_lora(getattr(pipe, component), targets, rank, alpha, seed + i)
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
    a = save_peft_lora("StableDiffusionPipeline", folder, str(root / "a"),
                       {"unet": (A_UNET, 4, 8), "text_encoder": (A_TEXT, 2, 3)}, 0)
    b = save_peft_lora("StableDiffusionPipeline", folder, str(root / "b"),
                       {"unet": (B_UNET, 3, 3), "text_encoder": (B_TEXT, 2, 2)}, 10)
    return {"a": a, "b": kohya_file(b, str(root / "b_kohya.safetensors"), 1)}


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).standard_normal((1, SIZE // 2, SIZE // 2, 4), np.float32)


@pytest.fixture(scope="module")
def sd(torch_folder):
    return StableDiffusion.load(torch_folder[1])


def run(sd, noise, **kw):
    return sd.generate(PROMPT, num_steps=STEPS, sampler="ddim", height=SIZE, width=SIZE, noise={"initial": noise},
                       output_type="np", progress=False, **kw)


def reference(kind, folder, loras, noise, **kw):
    """diffusers' images with each (file, scale) of `loras` fused in turn (load_lora_weights, fuse_lora)."""
    import diffusers
    pipe = getattr(diffusers, kind).from_pretrained(folder, **({"safety_checker": None} if kind == "StableDiffusionPipeline" else {}))
    pipe.set_progress_bar_config(disable=True)
    for path, scale in loras:
        pipe.load_lora_weights(path)
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()  # the fused weights stay
    latents = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
    return pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE, latents=latents, output_type="np",
                **kw).images


@pytest.fixture(scope="module")
def base(sd, noise):
    return run(sd, noise)


def test_peft_lora_matches_diffusers_and_unloads_exactly(sd, base, torch_folder, lora_files, noise):
    compiled = sd.compile_count
    assert sd.load_lora(lora_files["a"]) == "pytorch_lora_weights"
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
