"""CLIP text encoder (ref.clip): ViT-L/14's published key names, shapes and size; the causal mask; quick-GELU; one
layer against plain torch ops; every layer's hidden state, clip skip and the pooled output; loading bare, SD1.5
single-file and full-CLIP key layouts; bad checkpoints."""
import math

import pytest
import torch

from ref.clip import MODELS, CLIPTextModel, load_checkpoint, quick_gelu

torch.set_num_threads(1)

# Per layer, in the published order (transformers' CLIPEncoderLayer: self_attn k, v, q, out; layer_norm1; mlp;
# layer_norm2)
LAYER_PARTS = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "layer_norm1",
               "mlp.fc1", "mlp.fc2", "layer_norm2")


def published_shapes(vocab_size=49408, context_length=77, width=768, depth=12, hidden=3072):
    """{key: shape} of transformers' CLIPTextModel, in state-dict order, written from its module tree."""
    shapes = {"text_model.embeddings.token_embedding.weight": (vocab_size, width),
              "text_model.embeddings.position_embedding.weight": (context_length, width)}
    part_shapes = {"mlp.fc1": ((hidden, width), (hidden,)), "mlp.fc2": ((width, hidden), (width,))}
    for layer in range(depth):
        for part in LAYER_PARTS:
            weight, bias = part_shapes.get(part, ((width, width) if "proj" in part else (width,), (width,)))
            shapes[f"text_model.encoder.layers.{layer}.{part}.weight"] = weight
            shapes[f"text_model.encoder.layers.{layer}.{part}.bias"] = bias
    shapes["text_model.final_layer_norm.weight"] = shapes["text_model.final_layer_norm.bias"] = (width,)
    return shapes


def tiny(seed=0, **overrides):
    """A small encoder, every weight drawn from N(0, 0.3^2), the LayerNorms' (1, 0) init included."""
    torch.manual_seed(seed)
    model = CLIPTextModel(**{**dict(vocab_size=50, context_length=8, width=16, depth=2, num_heads=2), **overrides})
    for parameter in model.parameters():
        parameter.detach().normal_(0, 0.3)
    return model


def test_vit_l14_has_the_published_keys_in_order_and_shapes():
    with torch.device("meta"):
        model = MODELS["clip-vit-l14"]()
    assert {key: tuple(value.shape) for key, value in model.state_dict().items()} == published_shapes()
    assert list(model.state_dict()) == list(published_shapes())


def test_vit_l14_parameter_count_is_the_published_one():
    """123,060,480: SD1.5's text encoder (openai/clip-vit-large-patch14's text tower) as listed beside the UNet's
    859,520,964 and the VAE's 83,653,863: no position_ids buffer, no projection or logit_scale (the full CLIP
    model's)."""
    with torch.device("meta"):
        model = MODELS["clip-vit-l14"]()
    width, hidden = 768, 3072
    per_layer = 4 * (width * width + width) + (width * hidden + hidden) + (hidden * width + width) + 2 * 2 * width
    assert 49408 * width + 77 * width + 12 * per_layer + 2 * width == 123_060_480
    assert sum(parameter.numel() for parameter in model.parameters()) == 123_060_480
    assert [name for name, _ in model.named_buffers()] == []


def test_quick_gelu_is_x_times_sigmoid_of_1_702_x():
    values = [-4.0, -1.0, -0.3, 0.0, 0.5, 2.0, 6.0]
    expected = torch.tensor([x / (1 + math.exp(-1.702 * x)) for x in values], dtype=torch.float64)
    torch.testing.assert_close(quick_gelu(torch.tensor(values, dtype=torch.float64)), expected)


def test_changing_a_token_changes_only_its_position_and_later_ones():
    model = tiny()
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 50
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(after[:, :4], before[:, :4], rtol=0, atol=1e-6)
    assert ((after[:, 4:] - before[:, 4:]).abs().amax(dim=-1) > 1e-3).all()


def test_a_shorter_sequence_gives_the_first_positions_of_the_longer_one():
    model = tiny()
    tokens = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens[:, :5]), model(tokens)[:, :5], rtol=0, atol=1e-6)


def test_more_tokens_than_positions_are_refused():
    with pytest.raises(ValueError, match="9 tokens given; the text encoder has 8 positions"):
        tiny()(torch.zeros(1, 9, dtype=torch.long))


def test_hidden_states_are_the_embeddings_and_each_layers_output_and_clip_skip_reads_them():
    """clip_skip N equals the final LayerNorm over an encoder cut to depth - N layers (the same weights); the pooled
    output is the last hidden state at each row's end token (the highest id, 49 here)."""
    model = tiny(depth=3)
    tokens = torch.tensor([[5, 7, 49, 0, 49, 49], [5, 49, 3, 3, 3, 3]])
    with torch.no_grad():
        encoding = model.encode(tokens)
        assert len(encoding.hidden_states) == 4
        torch.testing.assert_close(encoding.hidden_states[0], model.text_model.embeddings(tokens), rtol=0, atol=0)
        torch.testing.assert_close(model(tokens), encoding.last_hidden_state, rtol=0, atol=0)
        for skip in (0, 1, 2):
            cut = tiny(depth=3 - skip)
            skipped = tuple(f"text_model.encoder.layers.{layer}." for layer in range(3 - skip, 3))
            cut.load_state_dict({key: value for key, value in model.state_dict().items()
                                 if not key.startswith(skipped)})
            torch.testing.assert_close(model(tokens, clip_skip=skip), cut(tokens), rtol=0, atol=0)
        torch.testing.assert_close(encoding.pooled, encoding.last_hidden_state[[0, 1], [2, 1]], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"clip skip must be from 0 \(the last layer\) to 2 \(the text encoder has 3 "
                                         r"layers\), got 3"):
        model(tokens, clip_skip=3)


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + 1e-5) * weight + bias


def test_one_layer_equals_plain_torch_ops():
    """Embeddings, one pre-LN layer (causal 2-head attention, quick-GELU MLP), final LayerNorm, written out."""
    model = tiny(depth=1)
    p = {key: value.double() for key, value in model.state_dict().items()}
    tokens = torch.tensor([[3, 7, 1, 49, 0, 7]])
    layer = "text_model.encoder.layers.0."
    x = p["text_model.embeddings.token_embedding.weight"][tokens[0]] + p[
        "text_model.embeddings.position_embedding.weight"][:6]  # (6, 16)

    def linear(name, h):
        return h @ p[layer + name + ".weight"].T + p[layer + name + ".bias"]

    h = layer_norm(x, p[layer + "layer_norm1.weight"], p[layer + "layer_norm1.bias"])
    q, k, v = (linear(f"self_attn.{name}_proj", h) for name in "qkv")
    heads = []
    for head in range(2):
        columns = slice(8 * head, 8 * head + 8)
        scores = q[:, columns] @ k[:, columns].T / math.sqrt(8)  # (6, 6)
        scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, columns])
    x = x + linear("self_attn.out_proj", torch.cat(heads, dim=-1))
    hidden = linear("mlp.fc1", layer_norm(x, p[layer + "layer_norm2.weight"], p[layer + "layer_norm2.bias"]))
    x = x + linear("mlp.fc2", hidden * torch.sigmoid(1.702 * hidden))
    expected = layer_norm(x, p["text_model.final_layer_norm.weight"], p["text_model.final_layer_norm.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model.double()(tokens)[0], expected)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def assert_same_weights(model, reference):
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_an_sd15_single_file_loads_from_disk(tmp_path):
    """cond_stage_model.transformer.text_model.* beside the UNet's and VAE's keys, the position_ids buffer of older
    files, under "state_dict" as in the LDM .ckpt."""
    source = tiny()
    state = {"cond_stage_model.transformer." + key: value for key, value in source.state_dict().items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(8)[None]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)
    torch.save({"state_dict": state, "global_step": 840000}, tmp_path / "sd15.ckpt")
    assert_same_weights(load_checkpoint(tiny(seed=5), tmp_path / "sd15.ckpt"), source)


@pytest.mark.parametrize("layout", ["bare", "sd_without_text_model", "full_clip"])
def test_other_key_layouts_load(layout):
    source = tiny()
    state = dict(source.state_dict())
    if layout == "sd_without_text_model":  # older transformers: cond_stage_model.transformer.embeddings...
        state = {"cond_stage_model.transformer." + key[len("text_model."):]: value for key, value in state.items()}
    if layout == "full_clip":  # openai/clip-vit-large-patch14 pytorch_model.bin: the image tower and projections too
        state.update({"vision_model.embeddings.class_embedding": torch.zeros(4), "logit_scale": torch.tensor(2.6),
                      "text_projection.weight": torch.zeros(4, 16), "visual_projection.weight": torch.zeros(4, 4),
                      "text_model.embeddings.position_ids": torch.arange(8.0)[None]})
    assert_same_weights(load_checkpoint(tiny(seed=5), state), source)


def test_a_model_on_meta_takes_the_checkpoint_tensors():
    source = tiny()
    with torch.device("meta"):
        model = CLIPTextModel(vocab_size=50, context_length=8, width=16, depth=2, num_heads=2)
    load_checkpoint(model, source.state_dict())
    assert not any(parameter.is_meta for parameter in model.parameters())
    tokens = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), source(tokens))


def test_bad_checkpoints_name_every_problem_and_copy_nothing():
    state = {"cond_stage_model.transformer." + key: value for key, value in tiny().state_dict().items()}
    del state["cond_stage_model.transformer.text_model.final_layer_norm.bias"]
    state["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(3, 16)
    state["cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(64, 16)
    model = tiny(seed=5)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_checkpoint(model, state)
    message = str(error.value)
    assert "missing keys (1): text_model.final_layer_norm.bias" in message
    assert "unexpected keys (1): cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight" in message
    assert "text_model.encoder.layers.0.mlp.fc1.weight expected (64, 16), got (3, 16)" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
