"""Parity of the Flax U-Net with diffusers' UNet2DConditionModel on tiny random configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from sdjax.models.unet import UNet2DConditionModel
from sdjax.weights.convert import to_params, to_state_dict
from sdjax.errors import UnsupportedConfig

torch.set_num_threads(1)

SD1 = dict(  # SD 1.x layout, shrunk
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=32,
    norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD2 = dict(  # SD 2.x options, plus odd sizes and rarer options to cover every branch
    block_out_channels=(32, 48, 64), layers_per_block=(1, 2, 1), attention_head_dim=(2, 4, 8),
    cross_attention_dim=24, norm_num_groups=8, use_linear_projection=True, upcast_attention=True,
    transformer_layers_per_block=(1, 2, 2), only_cross_attention=(True, False, False),
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, mid_block_scale_factor=1.5,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
INPAINT = dict(SD1, in_channels=9, norm_num_groups=32, center_input_sample=True)
SDXL = dict(  # SDXL's layout, shrunk: no attention at the top level, 1 then 2 transformers, text_time embedding
    block_out_channels=(16, 32, 64), layers_per_block=1, attention_head_dim=(2, 4, 8), cross_attention_dim=32,
    norm_num_groups=8, use_linear_projection=True, transformer_layers_per_block=(1, 1, 2),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8)

CASES = {  # name: (config, (H, W), timesteps)
    "sd1": (SD1, (16, 16), 37.5),
    "sd2": (SD2, (18, 14), np.array([3.0, 901.0], np.float32)),  # 18x14: not a multiple of 4
    "inpaint": (INPAINT, (16, 16), 999),
    "sdxl": (SDXL, (16, 16), np.array([11.0, 640.0], np.float32)),
}
TIME_IDS = np.array([[1024, 768, 0, 64, 1024, 1024], [512, 512, 32, 0, 896, 1152]], np.float32)  # SDXL's 6 numbers


def _torch_unet(config, seed=0):
    """diffusers U-Net with random weights, norm scales/offsets and biases (so zero-init hides nothing)."""
    torch.manual_seed(seed)
    model = TorchUNet(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(torch model, its numpy state dict, flax model, flax params, inputs, torch output NHWC)."""
    config, (h, w), t = CASES[request.param]
    model = _torch_unet(config)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, h, w, model.config.in_channels), dtype=np.float32)
    ctx = rng.standard_normal((2, 5, model.config.cross_attention_dim), dtype=np.float32)
    added = ()
    if model.config.addition_embed_type:
        pooled = model.config.projection_class_embeddings_input_dim - 6 * model.config.addition_time_embed_dim
        added = (rng.standard_normal((2, pooled), dtype=np.float32), TIME_IDS)
    with torch.no_grad():
        t_torch = torch.from_numpy(t) if isinstance(t, np.ndarray) else t
        kwargs = dict(added_cond_kwargs=dict(zip(("text_embeds", "time_ids"), map(torch.from_numpy, added))))
        ref = model(torch.from_numpy(x).permute(0, 3, 1, 2), t_torch, torch.from_numpy(ctx), **kwargs).sample
    ref = ref.permute(0, 2, 3, 1).numpy()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    flax_model = UNet2DConditionModel.from_config(dict(model.config))
    shapes = jax.eval_shape(flax_model.init, jax.random.key(0), x, t, ctx, *added)["params"]
    params = to_params("unet", sd, shapes)
    return dict(sd=sd, model=flax_model, params=params, inputs=(x, t, ctx, *added), ref=ref, config=dict(model.config))


def _apply(model, params, *inputs):
    with jax.default_matmul_precision("highest"):  # full fp32 matmuls on accelerators too
        return jax.jit(model.apply)({"params": params}, *inputs)


def test_parity(case):
    out = _apply(case["model"], case["params"], *case["inputs"])
    assert out.shape == case["ref"].shape
    diff = float(np.max(np.abs(np.asarray(out) - case["ref"])))
    print(f"max abs diff {diff:.2e} (output scale {np.abs(case['ref']).max():.2f})")
    # Measured ~2e-6 on CPU; 1e-5 still catches the tanh-GELU approximation (~5e-5).
    assert diff <= 1e-5


def test_names_round_trip(case):
    back = to_state_dict(case["params"])
    assert sorted(back) == sorted(case["sd"])
    for name, value in case["sd"].items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_bf16_compute_close_to_fp32(case):
    if case["model"].block_out_channels != SD1["block_out_channels"] or case["model"].in_channels != 4:
        pytest.skip("one config is enough")
    bf16 = UNet2DConditionModel.from_config(case["config"], dtype=jnp.bfloat16)
    out = _apply(bf16, case["params"], *case["inputs"])
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - case["ref"]).max() / np.abs(case["ref"]).max()
    print(f"bf16 max abs diff / output scale {err:.2e}")
    assert err < 0.05, err


def test_timestep_scalar_equals_broadcast_vector(case):
    x, t, ctx, *_ = case["inputs"]
    if np.ndim(t) or len(case["inputs"]) > 3:
        pytest.skip("needs a scalar timestep")
    a = _apply(case["model"], case["params"], x, t, ctx)
    b = _apply(case["model"], case["params"], x, jnp.full((x.shape[0],), t, jnp.float32), ctx)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_image"), ("class_embed_type", "timestep"), ("attention_type", "gated"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]), ("resnet_time_scale_shift", "scale_shift"),
    ("transformer_layers_per_block", [[1, 2], [1]]), ("mystery_option", 1)])
def test_from_config_rejects_unsupported(key, value):
    with pytest.raises(UnsupportedConfig, match=key):
        UNet2DConditionModel.from_config({**SD1, key: value})


def test_text_time_needs_its_sizes_and_inputs():
    with pytest.raises(UnsupportedConfig, match="addition_time_embed_dim"):
        UNet2DConditionModel.from_config({**SD1, "addition_embed_type": "text_time"})
    model = UNet2DConditionModel.from_config(SDXL)
    x, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 3, 32))
    with pytest.raises(ValueError, match="text_embeds"):
        jax.eval_shape(model.init, jax.random.key(0), x, 1.0, ctx)
    with pytest.raises(ValueError, match=r"D \+ N \* 8 = 72"):  # 24 pooled + 5 numbers: one short
        jax.eval_shape(model.init, jax.random.key(0), x, 1.0, ctx, jnp.zeros((1, 24)), jnp.zeros((1, 5)))


def test_from_config_ignores_bookkeeping():
    cfg = {**SD1, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
           "cross_attention_norm": None, "block_out_channels": [32, 64]}
    model = UNet2DConditionModel.from_config(cfg, dtype=jnp.bfloat16)
    assert model.block_out_channels == (32, 64) and model.dtype == jnp.bfloat16
