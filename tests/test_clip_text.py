"""CLIP text towers vs transformers' CLIPTextModel / CLIPTextModelWithProjection (random init, tiny configs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sdjax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from sdjax.weights.convert import to_params, to_state_dict
from sdjax.errors import UnsupportedConfig

VOCAB = 1000
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            max_position_embeddings=77)
CONFIGS = {
    # SD 1.x: OpenAI CLIP, quick_gelu, the historical eos_token_id = 2 (pool at argmax id).
    "sd1": dict(TINY, num_hidden_layers=2, hidden_act="quick_gelu", eos_token_id=2,
                bos_token_id=VOCAB - 2, pad_token_id=1),
    # SD 2.x: OpenCLIP, exact gelu, eos is the last vocabulary entry (pool at first eos).
    "sd2": dict(TINY, num_hidden_layers=3, hidden_act="gelu", eos_token_id=VOCAB - 1,
                bos_token_id=VOCAB - 2, pad_token_id=0),
}


def clip_text_reference(name):
    """transformers CLIPTextModel with every parameter randomised (norms included)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CONFIGS[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def clip_text_state_dict(model):
    """On-disk (diffusers text_encoder) names: everything under `text_model.`, no buffers."""
    sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in sd.items()}


def clip_text_ids(name, lengths=(5, 12, 77)):
    """[B, 77] prompts: bos, random words, eos, then padding as each SD tokenizer pads."""
    cfg = CONFIGS[name]
    eos, pad = VOCAB - 1, (VOCAB - 1 if name == "sd1" else cfg["pad_token_id"])
    rng = np.random.default_rng(0)
    ids = np.full((len(lengths), 77), pad, np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, VOCAB - 2, n)
        ids[row, 0], ids[row, n - 1] = VOCAB - 2, eos
    return ids


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_text_matches_transformers(name):
    ref = clip_text_reference(name)
    ids = clip_text_ids(name)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
        want_skip = ref.final_layer_norm(want.hidden_states[-2]).numpy()

    model = CLIPTextModel.from_config(ref.config.to_dict())
    assert model.hidden_act == CONFIGS[name]["hidden_act"]
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = to_params("text_encoder", clip_text_state_dict(ref), shapes)
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    skip = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), skip_last_layers=1)

    diffs = {"last_hidden_state": np.abs(got["last_hidden_state"] - want.last_hidden_state.numpy()).max(),
             "pooler_output": np.abs(got["pooler_output"] - want.pooler_output.numpy()).max(),
             "skip_1": np.abs(skip["last_hidden_state"] - want_skip).max(),
             "skip_1_pooler": np.abs(skip["pooler_output"] - want.pooler_output.numpy()).max()}
    assert len(got["hidden_states"]) == len(want.hidden_states) == CONFIGS[name]["num_hidden_layers"] + 1
    for i, (g, w) in enumerate(zip(got["hidden_states"], want.hidden_states)):
        diffs[f"hidden_states[{i}]"] = np.abs(g - w.numpy()).max()
    print(name, {k: f"{v:.2e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-4, diffs


def test_projected_tower_matches_transformers():
    """SDXL's second tower (OpenCLIP bigG shape, shrunk): penultimate states, pooled + projected EOS."""
    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(**CONFIGS["sd2"], projection_dim=24)
    ref = transformers.CLIPTextModelWithProjection(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = clip_text_ids("sd2")
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    sd = {k: v.numpy() for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    assert "text_projection.weight" in sd and "text_projection.bias" not in sd
    model = CLIPTextModelWithProjection.from_config(cfg.to_dict())
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = to_params("text_encoder", sd, shapes)
    assert sorted(to_state_dict(params)) == sorted(sd)
    got = jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    projected = np.abs(got["text_embeds"] - want.text_embeds.numpy()).max()
    penultimate = np.abs(got["hidden_states"][-2] - want.hidden_states[-2].numpy()).max()
    assert got["text_embeds"].shape == (3, 24) and projected <= 1e-4 and penultimate <= 1e-4, (projected, penultimate)
    # the plain tower on the same config has no projection
    assert "text_projection" not in jax.eval_shape(CLIPTextModel.from_config(cfg.to_dict()).init, jax.random.key(0),
                                                   jnp.zeros((1, 1), jnp.int32))["params"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_clip_text_names_round_trip(name):
    sd = clip_text_state_dict(clip_text_reference(name))
    model = CLIPTextModel.from_config(CONFIGS[name])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    back = to_state_dict(to_params("text_encoder", sd, shapes))
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("bad", [dict(hidden_act="gelu_new"), dict(model_type="t5"),
                                 dict(eos_token_id=[2, 3]), dict(num_attention_heads=5)])
def test_clip_text_rejects_unsupported_config(bad):
    with pytest.raises(UnsupportedConfig, match=next(iter(bad))):
        CLIPTextModel.from_config(dict(CONFIGS["sd1"], **bad))


def test_clip_text_rejects_bad_inputs():
    model = CLIPTextModel.from_config(CONFIGS["sd1"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="skip_last_layers"):
        jax.eval_shape(lambda ids: model.init(jax.random.key(0), ids, skip_last_layers=3),
                       jnp.zeros((1, 4), jnp.int32))
