"""Activation checkpointing of the UNet, ControlNet and VAE decoder blocks: the same outputs and gradients with it on
and off (dropout included: the RNG state is replayed), fewer activations kept for the backward pass, and no
checkpointing where autograd does not record."""
import pytest
import torch

from ref.controlnet import MODELS as CONTROLNETS
from ref.unet import MODELS as UNETS
from ref.vae import MODELS as VAES
from tests.helpers import randomise

torch.set_num_threads(1)


def saved_tensor_count(run):
    """How many tensors autograd saves for the backward pass of run() outside checkpointed regions."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, count


def controlled_unet_step(checkpointing):
    """A controlled tiny UNet in training mode with dropout, a loss through both networks and its gradients.
    -> (output, gradients of the ControlNet and UNet parameters, saved tensors)"""
    unet = randomise(UNETS["tiny"](dropout=0.3, gradient_checkpointing=checkpointing), scale=0.2).train()
    controlnet = randomise(CONTROLNETS["tiny"](dropout=0.3, gradient_checkpointing=checkpointing), seed=2, scale=0.2)
    controlnet.train()
    generator = torch.Generator().manual_seed(3)
    x, hint = torch.randn(2, 3, 16, 16, generator=generator), torch.rand(2, 3, 16, 16, generator=generator)
    context, t = torch.randn(2, 5, 32, generator=generator), torch.tensor([10, 900])
    torch.manual_seed(0)  # the dropout masks
    out, count = saved_tensor_count(lambda: unet(x, t, context, control=controlnet(x, hint, t, context)))
    out.square().mean().backward()
    return out, [p.grad for p in (*controlnet.parameters(), *unet.parameters())], count


def test_unet_and_controlnet_give_the_same_outputs_and_gradients_with_checkpointing():
    out_off, grads_off, saved_off = controlled_unet_step(False)
    out_on, grads_on, saved_on = controlled_unet_step(True)
    assert torch.equal(out_on, out_off)
    assert all(torch.allclose(on, off, rtol=1e-5, atol=1e-7) for on, off in zip(grads_on, grads_off))
    assert saved_on < saved_off / 4  # the blocks' inner activations were not kept


def vae_decode_step(checkpointing):
    autoencoder = randomise(VAES["tiny"](gradient_checkpointing=checkpointing), scale=0.2)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out, count = saved_tensor_count(lambda: autoencoder.decode(z))
    out.square().mean().backward()
    return out, [z.grad, *(p.grad for p in autoencoder.decoder.parameters())], count


def test_vae_decoder_gives_the_same_outputs_and_gradients_with_checkpointing():
    out_off, grads_off, saved_off = vae_decode_step(False)
    out_on, grads_on, saved_on = vae_decode_step(True)
    assert torch.equal(out_on, out_off)
    assert all(torch.allclose(on, off, rtol=1e-5, atol=1e-7) for on, off in zip(grads_on, grads_off))
    assert saved_on < saved_off / 4


@pytest.mark.parametrize("grad", [False, True])
def test_checkpointing_runs_only_where_autograd_records(grad, monkeypatch):
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs))
    autoencoder = VAES["tiny"](gradient_checkpointing=True)
    with torch.set_grad_enabled(grad):
        autoencoder.decode(torch.randn(1, 4, 4, 4))
    assert bool(calls) == grad
    assert all(kwargs == {"use_reentrant": False} for kwargs in calls)


@pytest.mark.parametrize("taps", ["conv", "attn"])
def test_tap_features_and_their_gradients_are_the_same_with_checkpointing(taps):
    """InnerControl's alignment loss reads decoder features; its gradient reaches the ControlNet through them."""
    results = []
    for checkpointing in (False, True):
        unet = randomise(UNETS["tiny"](gradient_checkpointing=checkpointing), scale=0.2).requires_grad_(False)
        controlnet = randomise(CONTROLNETS["tiny"](gradient_checkpointing=checkpointing), seed=2, scale=0.2)
        generator = torch.Generator().manual_seed(5)
        x, hint = torch.randn(2, 3, 16, 16, generator=generator), torch.rand(2, 3, 16, 16, generator=generator)
        context, t = torch.randn(2, 5, 32, generator=generator), torch.tensor([10, 900])
        _, features = unet(x, t, context, control=controlnet(x, hint, t, context), taps=taps)
        sum(feature.square().mean() for feature in features).backward()
        results.append((features, [p.grad for p in controlnet.parameters()]))
    (features_off, grads_off), (features_on, grads_on) = results
    assert all(torch.equal(on, off) for on, off in zip(features_on, features_off))
    reached = [off is not None for off in grads_off]  # the zero convs of skips read after the last tap get none
    assert any(reached) and reached == [on is not None for on in grads_on]
    assert all(torch.allclose(on, off, rtol=1e-5, atol=1e-7) for on, off in zip(grads_on, grads_off) if off is not None)
