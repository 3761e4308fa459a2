"""Parity of ref.clip / ref.tokenizer with transformers' CLIPTextModel / CLIPTokenizer (skipped without transformers):
the same weights give the same last hidden state, every layer's hidden state and the pooled output; with
CLIP_BPE_PATH set to a tokenizer folder (vocab.json + merges.txt, e.g. SD1.5's tokenizer/), the same prompts give the
same ids."""
import os

import pytest
import torch

from ref.clip import CLIPTextModel, load_checkpoint
from ref.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_last_hidden_state_matches_transformers(attention):
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                         layer_norm_eps=1e-5, attn_implementation=attention)
    reference = transformers.CLIPTextModel(config).eval()
    model = load_checkpoint(CLIPTextModel(vocab_size=1000, width=64, depth=3, num_heads=4), reference.state_dict())
    tokens = torch.randint(0, 1000, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(input_ids=tokens).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_hidden_states_and_pooled_output_match_transformers():
    """Rows ending in the end token (999, the highest id, as CLIP's 49407) and then padding with it."""
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                         layer_norm_eps=1e-5, bos_token_id=998, eos_token_id=999, pad_token_id=999)
    reference = transformers.CLIPTextModel(config).eval()
    model = load_checkpoint(CLIPTextModel(vocab_size=1000, width=64, depth=3, num_heads=4), reference.state_dict())
    tokens = torch.randint(0, 998, (2, 77), generator=torch.Generator().manual_seed(1))
    tokens[0, 5:], tokens[1, 40:] = 999, 999
    with torch.no_grad():
        ours, theirs = model.encode(tokens), reference(input_ids=tokens, output_hidden_states=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for mine, expected in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.pooled, theirs.pooler_output, rtol=1e-5, atol=1e-5)


def test_prompts_tokenize_as_transformers_does():
    folder = os.environ.get("CLIP_BPE_PATH", "")
    if not os.path.isfile(os.path.join(folder, "vocab.json")):
        pytest.skip("CLIP_BPE_PATH is not a tokenizer folder holding vocab.json and merges.txt")
    reference = transformers.CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    prompts = ["a photo of a cat", "Hello, world!", "an astronaut riding a horse on mars, 4k, trending on artstation",
               "it's the dog's 2nd birthday!!", " ".join(["word"] * 90)]
    expected = reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with pytest.warns(UserWarning, match="truncated"):
        assert torch.equal(CLIPTokenizer.from_path(folder)(prompts), expected.input_ids)
