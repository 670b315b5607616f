"""Original single-file SD checkpoints: names checked against diffusers' own ldm converters."""
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as ref
from transformers import CLIPTextConfig, CLIPTextModel

from sdjax.weights import single_file
from sdjax.errors import WeightLoadError

torch.set_num_threads(1)

SD1_UNET = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=8, sample_size=8)
# SD2 style: linear projections, 64-channel heads (attention_head_dim holds head counts).
SD2_UNET = dict(block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=32, in_channels=9,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, sample_size=8)
VAE = dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TEXT = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=1, max_position_embeddings=8)


def numpy_sd(model, prefix=""):
    torch.manual_seed(0)
    for p in model.parameters():  # random values everywhere (norms too), so mix-ups show
        p.data.normal_()
    return {prefix + k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sd1():
    return {"unet": numpy_sd(UNet2DConditionModel(**SD1_UNET)), "vae": numpy_sd(AutoencoderKL(**VAE)),
            "text_encoder": numpy_sd(CLIPTextModel(CLIPTextConfig(**TEXT)), "text_model.")}


@pytest.fixture(scope="module")
def sd2():
    text = CLIPTextModel(CLIPTextConfig(**TEXT, hidden_act="gelu"))
    return {"unet": numpy_sd(UNet2DConditionModel(**SD2_UNET)), "vae": numpy_sd(AutoencoderKL(**VAE)),
            "text_encoder": numpy_sd(text, "text_model."), "model": text}


# Keys that real files carry besides the three models; none of them is an error.
EXTRAS = {"betas": np.zeros(1000, np.float32), "alphas_cumprod": np.ones(1000, np.float32),
          "model_ema.decay": np.float32(0.9999), "model_ema.num_updates": np.int64(1)}


@pytest.fixture(scope="module")
def sd1_original(sd1):
    orig = single_file.to_original(sd1)
    orig["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(8)[None]
    return {**orig, **EXTRAS}


@pytest.fixture(scope="module")
def sd2_original(sd2):
    orig = single_file.to_original(sd2, text_format="open_clip")
    rng = np.random.default_rng(0)
    orig["cond_stage_model.model.text_projection"] = rng.normal(size=(64, 32)).astype(np.float32)
    orig["cond_stage_model.model.logit_scale"] = np.float32(4.6)
    return {**orig, **EXTRAS}


def as_torch(state_dict):
    return {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        got_k = got[k].numpy() if isinstance(got[k], torch.Tensor) else got[k]
        assert got_k.shape == want[k].shape, k
        assert np.array_equal(got_k, want[k]), k


def test_original_format_matches_diffusers_converters_sd1(sd1, sd1_original):
    """diffusers' ldm converters read our original-format dict back into the models' state dicts."""
    orig = as_torch(sd1_original)
    assert_same(ref.convert_ldm_unet_checkpoint(orig, {"layers_per_block": 2}), sd1["unet"])
    assert_same(ref.convert_ldm_vae_checkpoint(orig, VAE), sd1["vae"])
    text = ref.convert_ldm_clip_checkpoint(orig)
    text.pop("text_model.embeddings.position_ids")
    assert_same(text, sd1["text_encoder"])


def test_original_format_matches_diffusers_converters_sd2(sd2, sd2_original):
    orig = as_torch(sd2_original)
    assert_same(ref.convert_ldm_unet_checkpoint(orig, {"layers_per_block": 1}), sd2["unet"])
    text = ref.convert_open_clip_checkpoint(sd2["model"], orig)
    # diffusers drops only resblock 23 (full-size SD2); here the unused last block is number 2.
    text = {k: v for k, v in text.items()
            if not k.startswith(("text_model.encoder.layers.2.", "text_projection"))}
    assert_same(text, sd2["text_encoder"])
    assert not any(sd2_original[k].any() for k in sd2_original if ".resblocks.2." in k)


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_split_original(version, request):
    parts = request.getfixturevalue(version)
    got = single_file.split_original(request.getfixturevalue(version + "_original"))
    assert sorted(got) == ["text_encoder", "unet", "vae"]
    for kind in got:
        assert_same(got[kind], parts[kind])


def test_split_original_old_clip_names(sd1, sd1_original):
    """Early SD1 files lack the `text_model.` level under cond_stage_model.transformer."""
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd1_original.items()}
    assert_same(single_file.split_original(old)["text_encoder"], sd1["text_encoder"])


def test_split_original_ema(sd1, sd1_original, caplog):
    ema = {"model_ema." + k[len("model."):].replace(".", ""): v + 1
           for k, v in sd1_original.items() if k.startswith("model.diffusion_model.")}
    both = {**sd1_original, **ema}
    with caplog.at_level("INFO", logger="sdjax"):
        got = single_file.split_original(both)["unet"]  # default: EMA when present
    assert_same(got, {k: v + 1 for k, v in sd1["unet"].items()})
    assert "EMA weights model_ema.*" in caplog.text
    assert_same(single_file.split_original(both, use_ema=True)["unet"], got)
    assert_same(single_file.split_original(both, use_ema=False)["unet"], sd1["unet"])
    # An ema-only (pruned) file: model.diffusion_model.* as stored, bookkeeping keys ignored.
    no_ema = {k: v for k, v in both.items() if k not in ema}
    assert_same(single_file.split_original(no_ema)["unet"], sd1["unet"])
    with pytest.raises(WeightLoadError, match="no EMA weights"):
        single_file.split_original(no_ema, use_ema=True)
    partial = {k: v for k, v in both.items() if k != next(iter(ema))}
    with pytest.raises(WeightLoadError, match="(?s)UNet EMA weights.*1 missing.*input_blocks00weight"):
        single_file.split_original(partial)


def test_infer_configs_sd1(sd1_original):
    cfg = single_file.infer_configs(sd1_original)
    unet, vae, text = cfg["unet"], cfg["vae"], cfg["text_encoder"]
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "cross_attention_dim", "attention_head_dim"):
        assert tuple(np.atleast_1d(unet[key])) == tuple(np.atleast_1d(SD1_UNET[key])), key
    assert (unet["in_channels"], unet["out_channels"], unet["use_linear_projection"]) == (4, 4, False)
    for key in ("block_out_channels", "layers_per_block", "latent_channels"):
        assert tuple(np.atleast_1d(vae[key])) == tuple(np.atleast_1d(VAE[key])), key
    assert {k: text[k] for k in TEXT if k != "num_attention_heads"} == {k: v for k, v in TEXT.items()
                                                                        if k != "num_attention_heads"}
    assert (text["hidden_act"], text["num_attention_heads"], text["eos_token_id"]) == ("quick_gelu", 1, 99)
    assert cfg["scheduler"]["prediction_type"] == "epsilon" and vae["sample_size"] == 512
    assert unet["sample_size"] == 512 // 4  # the tiny VAE has 3 levels: 4x downsampling


def test_infer_configs_sd2(sd2_original):
    cfg = single_file.infer_configs(sd2_original)
    unet, text = cfg["unet"], cfg["text_encoder"]
    assert unet["attention_head_dim"] == [1, 2] and unet["use_linear_projection"] is True
    assert unet["block_out_channels"] == [64, 128] and unet["layers_per_block"] == 1
    assert unet["in_channels"] == 9 and unet["down_block_types"] == list(SD2_UNET["down_block_types"])
    assert (text["hidden_act"], text["num_hidden_layers"]) == ("gelu", 2)  # last resblock dropped
    assert cfg["scheduler"]["prediction_type"] == "epsilon"  # 9 input channels: SD2 inpainting


def test_infer_configs_sd2_prediction_type(sd2_original):
    plain = dict(sd2_original)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    plain[conv_in] = plain[conv_in][:, :4]  # not inpainting
    v = single_file.infer_configs(plain)  # SD 2.x 768-v: the default for non-base SD2 files
    assert (v["scheduler"]["prediction_type"], v["vae"]["sample_size"]) == ("v_prediction", 768)
    assert (v["unet"]["sample_size"], v["unet"]["upcast_attention"]) == (768 // 4, True)
    base = single_file.infer_configs({**plain, "global_step": np.asarray(875000)})
    assert (base["scheduler"]["prediction_type"], base["unet"]["sample_size"]) == ("epsilon", 512 // 4)
    named = single_file.infer_configs(plain, name="sd21")
    assert (named["scheduler"]["prediction_type"], named["unet"]["sample_size"]) == ("v_prediction", 768 // 4)
    assert single_file.infer_configs(plain, name="sd21-base")["scheduler"]["prediction_type"] == "epsilon"
    with pytest.raises(WeightLoadError, match="sd1 model"):
        single_file.infer_configs(plain, name="sd15")
    with pytest.raises(WeightLoadError, match="unknown checkpoint name"):
        single_file.infer_configs(plain, name="sd3")
    with pytest.raises(WeightLoadError, match="'sdxl' is a sdxl model, but the checkpoint is sd2"):
        single_file.infer_configs(plain, name="sdxl")


def test_infer_configs_sd1_inpainting(sd1_original):
    """9 input channels (latents, mask, masked-image latents): SD1.5-inpainting, epsilon, 512."""
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    w = sd1_original[conv_in]
    inpainting = {**sd1_original, conv_in: np.concatenate([w, w, w[:, :1]], 1)}
    cfg = single_file.infer_configs(inpainting)
    assert (cfg["unet"]["in_channels"], cfg["unet"]["out_channels"]) == (9, 4)
    assert (cfg["scheduler"]["prediction_type"], cfg["vae"]["sample_size"]) == ("epsilon", 512)
    assert cfg["unet"]["upcast_attention"] is False
    with pytest.raises(WeightLoadError, match="checkpoint is sd1 inpainting"):
        single_file.infer_configs(inpainting, name="sd15")
    assert single_file.infer_configs(inpainting, name="sd15-inpainting")["unet"]["in_channels"] == 9


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_inferred_configs_build_the_same_models(version, request):
    """The inferred configs (plus the non-inferable norm_num_groups) build models with the same tensors."""
    parts = request.getfixturevalue(version)
    cfg = single_file.infer_configs(request.getfixturevalue(version + "_original"))
    groups = SD1_UNET["norm_num_groups"] if version == "sd1" else SD2_UNET["norm_num_groups"]
    unet = UNet2DConditionModel.from_config({**cfg["unet"], "norm_num_groups": groups})
    vae = AutoencoderKL.from_config({**cfg["vae"], "norm_num_groups": VAE["norm_num_groups"]})
    text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    for kind, model, prefix in (("unet", unet, ""), ("vae", vae, ""), ("text_encoder", text, "text_model.")):
        shapes = {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert shapes == {k: v.shape for k, v in parts[kind].items()}, kind


def test_unexpected_tensors_are_listed(sd1_original):
    bad = {"model.diffusion_model.input_blocks.1.0.extra.weight": np.zeros(1),
           "first_stage_model.encoder.down.0.attn.0.q.weight": np.zeros(1),
           "cond_stage_model.transformer.text_model.pooler.weight": np.zeros(1)}
    with pytest.raises(WeightLoadError) as err:
        single_file.split_original({**sd1_original, **bad})
    for name in bad:
        assert name in str(err.value)


@pytest.mark.parametrize("key, what", [
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "SDXL"),
    ("model.diffusion_model.label_emb.0.0.weight", "class-conditioned"),
])
def test_unsupported_architectures(sd1_original, key, what):
    ckpt = {**sd1_original, key: np.zeros(1)}
    for fn in (single_file.split_original, single_file.infer_configs):
        with pytest.raises(WeightLoadError, match=what):
            fn(ckpt)


def test_missing_component(sd1_original):
    no_vae = {k: v for k, v in sd1_original.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(WeightLoadError, match="no VAE tensors"):
        single_file.split_original(no_vae)


def test_read_checkpoint_safetensors_half_precision(tmp_path):
    from safetensors.torch import save_file
    tensors = {"a": torch.randn(3, 2).bfloat16(), "b": torch.randn(4).half(), "c": torch.arange(3)}
    save_file(tensors, tmp_path / "m.safetensors")
    got = single_file.read_checkpoint(str(tmp_path / "m.safetensors"))  # as stored; to_params converts
    assert (got["a"].dtype.name, got["b"].dtype, got["c"].dtype) == ("bfloat16", np.float16, np.int64)
    for k in ("a", "b"):
        np.testing.assert_array_equal(got[k].astype(np.float32), tensors[k].float().numpy())


def test_read_checkpoint_ckpt(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"x": torch.ones(2).half()}, "global_step": 875000}, path)
    got = single_file.read_checkpoint(str(path))
    assert got["x"].dtype == np.float32 and int(got["global_step"]) == 875000


class _TrainingState:  # stands for the Lightning objects of unpruned .ckpt files
    pass


def test_read_checkpoint_refuses_pickled_objects(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"x": torch.ones(2)}, "callbacks": _TrainingState()}, path)
    with pytest.raises(WeightLoadError) as err:
        single_file.read_checkpoint(str(path))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: holds Python objects besides tensors")
    assert "test_single_file._TrainingState" in msg and ".safetensors" in msg


@pytest.mark.parametrize("name, cut", [("m.ckpt", 0.5), ("m.ckpt", 0.99), ("m.ckpt", 0),
                                       ("m.safetensors", 0.5), ("m.safetensors", 0.01)])
def test_read_checkpoint_truncated(tmp_path, name, cut):
    """A partly downloaded file: one line naming it, not safetensors' / torch's own exception."""
    path = tmp_path / name
    tensors = {"state_dict": {"x": torch.ones(64, 64)}, "global_step": 1}
    if name.endswith(".ckpt"):
        torch.save(tensors, path)
    else:
        from safetensors.torch import save_file
        save_file(tensors["state_dict"], path)
    data = path.read_bytes()
    path.write_bytes(data[:int(cut * len(data))])
    with pytest.raises(WeightLoadError, match="truncated or corrupt") as err:
        single_file.read_checkpoint(str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_read_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightLoadError, match="not found: .*nope.safetensors"):
        single_file.read_checkpoint(str(tmp_path / "nope.safetensors"))
    path = tmp_path / "m.ckpt"
    torch.save({"x": torch.ones(1)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(WeightLoadError, match="needs torch.*safetensors"):
        single_file.read_checkpoint(str(path))


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_sdjax_modules_take_split_tensors(version, request):
    """split_original + infer_configs feed sdjax's modules (the single-file loader's path)."""
    from sdjax.models import registry
    from sdjax.weights.convert import to_params, to_state_dict
    original = request.getfixturevalue(version + "_original")
    cfg, parts = single_file.infer_configs(original), single_file.split_original(original)
    groups = {"unet": (SD1_UNET if version == "sd1" else SD2_UNET)["norm_num_groups"],
              "vae": VAE["norm_num_groups"]}
    for kind in ("unet", "vae", "text_encoder"):
        extra = {"norm_num_groups": groups[kind]} if kind in groups else {}
        module = registry.build(kind, {**cfg[kind], **extra})
        params = to_params(kind, parts[kind], registry.param_shapes(kind, module))
        assert_same(to_state_dict(params), parts[kind])


def test_incomplete_text_encoder(sd1_original):
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    with pytest.raises(WeightLoadError, match="incomplete checkpoint.*token_embedding"):
        single_file.infer_configs({k: v for k, v in sd1_original.items() if k != key})
