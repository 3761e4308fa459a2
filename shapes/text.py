"""Captions -> the context tokens of cross-attention: the stand-in for SD1.5's CLIP text encoder on the shapes data.

A word tokenizer over a closed vocabulary (the shapes captions' words) and a small transformer encoder, trained with
the UNet from scratch. The empty caption (all padding) is the null condition of classifier-free guidance, as the empty
prompt is for SD1.5. Padding is not masked: like CLIP's padding tokens in SD1.5 it is context the UNet can read, and
an all-padding caption still has keys to attend to.
"""
import torch
import torch.nn as nn

PAD = 0  # token id of padding; word i of the vocabulary has id i + 1


class Tokenizer:
    """Caption strings -> (B, max_length) token ids, words split on whitespace, padded with PAD at the end."""

    def __init__(self, vocabulary, max_length):
        self.vocabulary, self.max_length = tuple(vocabulary), max_length
        self.ids = {word: index + 1 for index, word in enumerate(self.vocabulary)}

    def __len__(self):
        """Number of token ids, padding included."""
        return len(self.vocabulary) + 1

    def __call__(self, captions):
        tokens = torch.full((len(captions), self.max_length), PAD, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = caption.split()
            if len(words) > self.max_length:
                raise ValueError(f"caption {caption!r} has {len(words)} words; at most {self.max_length} fit")
            unknown = [word for word in words if word not in self.ids]
            if unknown:
                raise ValueError(f"caption {caption!r} has words outside the vocabulary: {unknown}; "
                                 f"known words: {' '.join(self.vocabulary)}")
            tokens[row, :len(words)] = torch.tensor([self.ids[word] for word in words], dtype=torch.long)
        return tokens


class TextEncoder(nn.Module):
    """tokens (B, L) -> context (B, L, width): token + learned position embeddings, pre-norm transformer layers, a
    final LayerNorm (CLIP's final_layer_norm, whose output SD1.5 reads)."""

    def __init__(self, num_tokens, max_length, width, depth=2, num_heads=2):
        super().__init__()
        self.token_embedding = nn.Embedding(num_tokens, width)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.position_embedding, std=0.01)
        layer = nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.final_layer_norm = nn.LayerNorm(width)

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.position_embedding[:tokens.shape[1]]  # (B, L, width)
        return self.final_layer_norm(self.layers(x))
