"""The graphs that run on GPU/TPU, checked on this CPU by lowering for those platforms: the fused attention
kernel is in the module, the CPU-only convolution paths (Winograd, im2col) are not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import tiny
from sdjax.diffusion import samplers, schedules
from sdjax.models import attention, registry
from sdjax.pipeline import denoiser, loop_calls

KERNEL = {"tpu": "tpu_custom_call", "cuda": "triton"}  # Pallas flash attention's custom call, per platform


@pytest.fixture(scope="module")
def unet():
    """The tiny U-Net at 16x16 latents (256 tokens at the top level: flash-sized), bfloat16, abstract params."""
    cfg = tiny.get_config().to_dict()["unet"]
    module = registry.build("unet", {**cfg, "sample_size": 16}, dtype=jnp.bfloat16)
    shapes = registry.param_shapes("unet", module)
    convs = sum(x.ndim == 4 for x in jax.tree.leaves(shapes))  # conv kernels are HWIO
    return module, shapes, convs, cfg["cross_attention_dim"]


def _guided(module):
    def fn(p, x, c, u):
        text = lambda s: {"encoder_hidden_states": s}  # noqa: E731
        return denoiser.guided(denoiser.unet_call(module, p), 7.5)(x, jnp.float32(500), {"cond": text(c), "uncond": text(u)})
    return fn


def _sampler_loop(module):
    """The pipeline's loop function (loop_calls.run_iterations) over a whole 3-step plan."""
    plan = samplers.SAMPLERS["dpmpp_2m"].plan(schedules.scheduler_settings(dict(beta_schedule="scaled_linear")), 3)

    def fn(p, x, c, u):
        text = lambda s: {"encoder_hidden_states": s}  # noqa: E731
        batch = dict(cond=text(c), uncond=text(u), keys=jax.random.split(jax.random.key(0), x.shape[0]))
        state = samplers.SAMPLERS["dpmpp_2m"].init(x.astype(jnp.float32), plan.steps)
        return loop_calls.run_iterations(module, p, plan.steps, plan.timesteps, batch, state, 0, 3, 7.5, 0.0,
                                   sampler="dpmpp_2m", options=tuple(sorted(plan.options.items())), rescaled=False,
                                   groups=None)["x"]
    return fn


def _lowered(fn, shapes, dim, platform, attention_impl="auto"):
    x = jax.ShapeDtypeStruct((2, 16, 16, 4), jnp.bfloat16)
    c = jax.ShapeDtypeStruct((2, 77, dim), jnp.bfloat16)
    with attention.implementation(attention_impl):
        return jax.jit(fn).trace(shapes, x, c, c).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("graph", [_guided, _sampler_loop], ids=["guided_unet", "sampler_scan"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_accelerator_graph_has_flash_attention_and_no_cpu_paths(unet, graph, platform):
    module, shapes, convs, dim = unet
    text = _lowered(graph(module), shapes, dim, platform)
    assert KERNEL[platform] in text
    assert text.count("stablehlo.convolution") == convs  # every conv is XLA's: no Winograd / im2col
    # the effect: lowered for the CPU, the same graph has neither kernel and fewer convolutions
    cpu = _lowered(graph(module), shapes, dim, "cpu")
    assert not any(k in cpu for k in KERNEL.values()) and cpu.count("stablehlo.convolution") < convs
    # forcing XLA attention removes the kernel
    assert KERNEL[platform] not in _lowered(graph(module), shapes, dim, platform, "xla")


def test_float32_falls_back_to_xla_on_cuda_and_keeps_flash_on_tpu():
    q = jax.ShapeDtypeStruct((1, 256, 64), jnp.float32)
    fn = jax.jit(lambda q: attention.multi_head_attention(q, q, q, 2, upcast=True))
    assert "triton" not in fn.trace(q).lower(lowering_platforms=("cuda",)).as_text()
    assert "tpu_custom_call" in fn.trace(q).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("dh", [40, 80, 160])
def test_flash_head_dims_lower(dh):
    """SD's head dims (40/80/160 in SD 1.x) are padded to what the kernels take, never an error."""
    for dtype, platform in ((jnp.bfloat16, "tpu"), (jnp.float16, "cuda")):
        q = jax.ShapeDtypeStruct((1, 256, 2 * dh), dtype)
        fn = jax.jit(lambda q: attention.multi_head_attention(q, q, q, 2))
        assert KERNEL[platform] in fn.trace(q).lower(lowering_platforms=(platform,)).as_text()


def test_gpu_flash_wrapper_matches_xla_in_interpret_mode():
    """The Pallas GPU kernel run by Pallas' interpreter on this CPU: our layout and head-dim padding (40 -> 64)
    give jax.nn.dot_product_attention's result."""
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, 128, 2, 40), jnp.float32) for key in ks)
    got = attention.gpu_flash(q, k, v, interpret=True)
    want = jax.nn.dot_product_attention(q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(want - jax.nn.dot_product_attention(q, k, v * 1.01)).max() > 100 * 2e-5


@pytest.fixture(scope="module")
def train_step():
    """The LDM train step of configs/train/tiny.py (32² images, 16x16 latents) in bfloat16, traced with abstract
    params (the demo model's tokenizer gives the empty prompt's ids)."""
    import os
    from configs.train import tiny as train_tiny
    from sdjax.demo import DEMO_MODEL
    from sdjax.text.tokenizer import load_tokenizer
    from sdjax.train.ldm import ldm_stage
    from sdjax.train.stages import stage_for
    from sdjax.train.state import create_state
    from sdjax.weights.pretrained import Pretrained
    c = train_tiny.get_config()
    modules = {k: registry.build(k, c.model[k].to_dict(), dtype=jnp.bfloat16) for k in ("unet", "vae", "text_encoder")}
    params = {k: registry.param_shapes(k, m) for k, m in modules.items()}
    pre = Pretrained(modules, params, load_tokenizer(os.path.join(DEMO_MODEL, "tokenizer")),
                     {**c.model.scheduler.to_dict(), "prediction_type": "epsilon"}, "")
    stage = stage_for(c)
    c = stage.resolve(c, pre)
    names = stage.trainable_names(c)
    trainable = {k: v for k, v in params.items() if k in names}
    frozen = {k: v for k, v in params.items() if k not in names}
    tx, schedule = stage.make_optimizer(c)
    state = jax.eval_shape(lambda p: create_state(p, tx, c.seed), trainable)
    batch = ldm_stage.batch_shapes(pre, 2, 32)
    traced = jax.jit(stage.make_train_step(pre, c, tx, schedule)).trace(state, frozen, batch)
    return traced, sum(x.ndim == 4 for x in jax.tree.leaves(params["unet"]))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_train_step_has_flash_attention_and_no_cpu_paths(train_step, platform):
    traced, unet_convs = train_step
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert KERNEL[platform] in text  # forward and backward kernels
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert not any(k in cpu for k in KERNEL.values())
    # forward + two backward convolutions per U-Net conv (+ the frozen VAE's) on the accelerator; far fewer on CPU
    # every U-Net conv's forward and two backward convolutions are XLA's (the first layer has no input
    # gradient); on CPU most are Winograd / im2col matmuls
    assert text.count("stablehlo.convolution") >= 3 * unet_convs - 1 > cpu.count("stablehlo.convolution")


CUDNN = "__cudnn$fmha"  # cuDNN's fused attention custom call


@pytest.fixture
def cudnn_here(monkeypatch):
    """This CPU has no cuDNN, of which jax asks only the version while tracing the kernel: say 9.8, so graphs
    with it lower for "cuda" (whether cuDNN runs them is checked only on a GPU)."""
    from jax._src.cudnn import fused_attention_stablehlo
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)
    attention._cudnn_fallback.cache_clear()


def test_cudnn_takes_upcast_half_inputs_and_leaves_the_others_to_xla(cudnn_here, caplog):
    """attention="cudnn" on SD 2.x's upcast_attention: a bfloat16 U-Net's attention goes to the kernel in bfloat16
    (it computes the softmax in float32 itself), where the float32 upcast made jax refuse it; inputs the kernel
    does not take (a float32 model, the VAE's 512-wide head) lower to XLA attention, with one log line each."""
    cfg = tiny.get_config().to_dict()["unet"]
    cfg = {**cfg, "sample_size": 16, "attention_head_dim": 4, "upcast_attention": True}  # head dims 8 and 16
    lowered = lambda dtype: _lowered(_guided(registry.build("unet", cfg, dtype=dtype)),  # noqa: E731
                                     registry.param_shapes("unet", registry.build("unet", cfg)),
                                     cfg["cross_attention_dim"], "cuda", "cudnn")
    with caplog.at_level("WARNING", logger="sdjax"):
        calls = [line.rsplit(" : (", 1)[1].split("->")[0] for line in lowered(jnp.bfloat16).splitlines()
                 if f"@{CUDNN}" in line]  # the kernel calls' operand types
        assert len(calls) >= 8 and all("bf16" in c and "f32" not in c for c in calls), calls
        assert not caplog.records
        assert CUDNN not in lowered(jnp.float32)
        q = jax.ShapeDtypeStruct((1, 256, 512), jnp.bfloat16)
        with attention.implementation("cudnn"):
            vae_like = jax.jit(lambda q: attention.multi_head_attention(q, q, q, 1, upcast=True)).trace(q)
        assert CUDNN not in vae_like.lower(lowering_platforms=("cuda",)).as_text()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "fp16/bf16" in messages[0] and "head dim" in messages[1], messages
    # the fallback computes what XLA attention does (upcast: in float32), here on the CPU
    x = jax.random.normal(jax.random.key(0), (1, 64, 512), jnp.bfloat16)
    run = lambda impl: jax.jit(attention.scoped(lambda x: attention.multi_head_attention(x, x, x, 1, upcast=True),  # noqa: E731
                                                impl))(x)
    np.testing.assert_array_equal(run("cudnn"), run("xla"))
