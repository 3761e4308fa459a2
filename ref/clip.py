"""CLIP's text encoder as Stable Diffusion 1.5 uses it: prompt tokens (B, 77) -> cross-attention context (B, 77, 768).

CLIP (Radford et al. 2021, Sec. 2.4): a Transformer over byte-level BPE tokens with learned position embeddings and
masked (causal) self-attention; the ViT-L/14 model's text tower is 12 layers wide 768 with 12 heads. Each layer is
pre-LayerNorm (eps 1e-5): x + attention(LN(x)), then x + MLP(LN(x)), the MLP 768 -> 3072 -> 768 with quick-GELU
x * sigmoid(1.702 x); a final LayerNorm closes the stack. SD1.5 (ldm FrozenCLIPEmbedder, openai/clip-vit-large-patch14)
reads `last_hidden_state`, the final LayerNorm's output at all 77 positions, padding included: no mask but the causal
one, and no pooling or projection. `encode` gives every layer's hidden state and the pooled output of one forward;
`forward(tokens, clip_skip)` the context of diffusers' StableDiffusionPipeline.encode_prompt (clip_skip N: the final
LayerNorm of hidden_states[-(N + 1)], the output of layer depth - N; pipeline_stable_diffusion.py, encode_prompt).

Parameter names are those of the published text encoder (transformers' CLIPTextModel, as in
openai/clip-vit-large-patch14 and the `text_encoder/` folder of SD1.5's diffusers layout):
`text_model.embeddings.token_embedding.weight`, `text_model.encoder.layers.0.self_attn.q_proj.weight`,
`text_model.final_layer_norm.weight`, ... SD1.5 single files hold them under `cond_stage_model.transformer.`;
`load_checkpoint` reads either.
"""
import functools
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.checkpoints import check_state_fits, read_checkpoint
from ref.unet import select_state


def quick_gelu(x):
    """CLIP's GELU approximation x * sigmoid(1.702 x) (Hendrycks & Gimpel 2016, Sec. 2)."""
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Causal multi-head self-attention with biased q/k/v/out projections (SDPA)."""

    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.k_proj = nn.Linear(width, width)  # the published order: k, v, q, out
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):  # (B, L, width)
        batch, length, width = x.shape
        q, k, v = (projection(x).view(batch, length, self.num_heads, -1).transpose(1, 2)  # (B, heads, L, head_dim)
                   for projection in (self.q_proj, self.k_proj, self.v_proj))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(head_dim)) v
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):  # (B, L, width)
        return self.fc2(quick_gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + attention(LN1(x)), then x + MLP(LN2(x))."""

    def __init__(self, width, num_heads, mlp_ratio, eps):
        super().__init__()
        self.self_attn = Attention(width, num_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_ratio * width)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x):  # (B, L, width)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, vocab_size, context_length, width):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(context_length, width)

    def forward(self, tokens):  # (B, L) -> (B, L, width)
        return self.token_embedding(tokens) + self.position_embedding.weight[:tokens.shape[1]]


class Encoder(nn.Module):
    def __init__(self, depth, **layer_config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer_config) for _ in range(depth))

    def forward(self, x):  # (B, L, width) -> depth + 1 of (B, L, width): x, then every layer's output
        hidden_states = [x]
        for layer in self.layers:
            hidden_states.append(layer(hidden_states[-1]))
        return hidden_states


class TextEncoding(NamedTuple):
    """One forward of the text encoder, as transformers' CLIPTextModel(output_hidden_states=True) returns it."""
    hidden_states: list  # depth + 1 of (B, L, width): the embeddings, then each layer's output
    last_hidden_state: torch.Tensor  # (B, L, width): the final LayerNorm of hidden_states[-1]
    pooled: torch.Tensor  # (B, width): last_hidden_state at each row's end token


class TextTransformer(nn.Module):
    def __init__(self, vocab_size, context_length, width, depth, num_heads, mlp_ratio, eps):
        super().__init__()
        self.context_length = context_length
        self.embeddings = Embeddings(vocab_size, context_length, width)
        self.encoder = Encoder(depth, width=width, num_heads=num_heads, mlp_ratio=mlp_ratio, eps=eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, tokens):  # (B, L) int64, L <= context_length -> depth + 1 of (B, L, width)
        if tokens.shape[-1] > self.context_length:
            raise ValueError(f"{tokens.shape[-1]} tokens given; the text encoder has {self.context_length} positions")
        return self.encoder(self.embeddings(tokens))


class CLIPTextModel(nn.Module):
    """tokens (B, L) -> context (B, L, width): the final LayerNorm of the last hidden state, or with clip_skip N of
    the hidden state N layers before it."""

    def __init__(self, vocab_size=49408, context_length=77, width=768, depth=12, num_heads=12, mlp_ratio=4, eps=1e-5):
        super().__init__()
        self.text_model = TextTransformer(vocab_size, context_length, width, depth, num_heads, mlp_ratio, eps)

    def check_clip_skip(self, clip_skip):
        depth = len(self.text_model.encoder.layers)
        if not 0 <= clip_skip < depth:
            raise ValueError(f"clip skip must be from 0 (the last layer) to {depth - 1} (the text encoder has {depth} "
                             f"layers), got {clip_skip}")

    def encode(self, tokens):
        """tokens (B, L) -> TextEncoding. The pooled output reads the position of each row's highest id, the end
        token in CLIP's vocabulary (openai/CLIP model.py encode_text, `text.argmax(dim=-1)`; transformers'
        CLIPTextTransformer reads the first end token, the same position)."""
        hidden_states = self.text_model(tokens)
        last = self.text_model.final_layer_norm(hidden_states[-1])  # (B, L, width)
        pooled = last[torch.arange(len(tokens), device=tokens.device), tokens.argmax(dim=-1)]  # (B, width)
        return TextEncoding(hidden_states, last, pooled)

    def forward(self, tokens, clip_skip=0):
        """tokens (B, L) -> (B, L, width): the final LayerNorm of hidden_states[-(clip_skip + 1)]; 0 gives the last
        hidden state, 1 the penultimate layer's output (A1111's "Clip skip 2")."""
        self.check_clip_skip(clip_skip)
        return self.text_model.final_layer_norm(self.text_model(tokens)[-(clip_skip + 1)])


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

CONFIGS = {
    # openai/clip-vit-large-patch14 text_config (CLIP paper Table 20): 123,060,480 parameters
    "clip-vit-l14": dict(vocab_size=49408, context_length=77, width=768, depth=12, num_heads=12),
    # the same vocabulary and positions (real prompts tokenize for it), a tiny body for tests
    "clip-tiny": dict(vocab_size=49408, context_length=77, width=32, depth=2, num_heads=2),
}

MODELS = {name: functools.partial(CLIPTextModel, **config) for name, config in CONFIGS.items()}  # keywords override


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------

SD15_PREFIX = "cond_stage_model.transformer."  # the text encoder's keys in an SD1.5 single file
TEXT_MODEL = "text_model."
# Not this model's: the position_ids buffer some files keep, and the image tower, projections and logit scale of a
# full CLIP file (openai/clip-vit-large-patch14's pytorch_model.bin), which SD1.5 does not use.
SKIPPED = ("text_model.embeddings.position_ids", "vision_model.", "visual_projection.", "text_projection.",
           "logit_scale")


def published_key(key):
    """A text-encoder key with its SD prefix removed -> the published name. Older transformers versions wrote SD1.x
    files without the `text_model.` level (`cond_stage_model.transformer.embeddings...`); it is added back."""
    bare = key.startswith(("embeddings.", "encoder.", "final_layer_norm."))
    return TEXT_MODEL + key if bare else key


def load_checkpoint(model, checkpoint):
    """Load CLIP text-encoder weights into `model`, all or nothing.

    checkpoint: a path or a dict: the text encoder alone (`text_model.*`, a full CLIP file's other tower skipped) or an
    SD1.5 single file (`cond_stage_model.transformer.text_model.*`, the UNet's and VAE's keys left aside), raw or under
    "state_dict". Missing keys, unexpected keys and shape mismatches raise a ValueError naming each of them, before
    anything is copied. A model built on the meta device takes the file's tensors as they are."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_checkpoint(checkpoint)
    state, original = select_state(checkpoint, SD15_PREFIX)
    kept = [key for key in state if not published_key(key).startswith(SKIPPED)]
    state = {published_key(key): state[key] for key in kept}
    original = {published_key(key): original[key] for key in kept}
    check_state_fits(model, state, original)
    on_meta = any(parameter.is_meta for parameter in model.parameters())
    model.load_state_dict(state, assign=on_meta)
    return model
