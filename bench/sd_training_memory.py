"""Memory of one SD1.5 ControlNet training step, estimated without a GPU from the tensors autograd keeps.

Usage (from the repository root): python -m bench.sd_training_memory [--batch-size 8] [--size 512]

The step runs on the meta device (shapes and dtypes, no data, no memory): the frozen UNet, VAE and CLIP text encoder
and the trainable ControlNet in bf16 (bf16 activations), CLIP and the VAE encoder under no_grad (the latents and the
text context are inputs), the ControlNet and the UNet with autograd recording, eps loss. A second variant adds the
reward branch of ControlNet++ / InnerControl (Eq. 5-6): the one-step x0 estimate through the frozen VAE decoder with
autograd recording (the reward model itself not counted). Counted:
  saved     every tensor autograd saves for the backward pass (torch.autograd.graph.saved_tensors_hooks), each storage
            once, parameters left out; with checkpointing, the inputs each checkpointed block keeps instead of its
            inner tensors;
  recompute with checkpointing, the largest block's saved tensors, which its recomputation holds during backward;
  weights   frozen networks in bf16 (2 B a parameter); the ControlNet in fp32 with fp32 gradients and AdamW's two
            fp32 moments (16 B), plus the bf16 copy autocast makes of its weights (2 B).
Attention is counted as flash / memory-efficient SDPA keeps it on a GPU (q, k, v, output, logsumexp): on meta, SDPA
takes its math path, which would count the (B, heads, L, L) attention matrix. Not counted: the gradients flowing
through backward (transient, about the size of the largest activations), the CUDA context and workspaces (~1 GiB),
allocator fragmentation. Real bf16 autocast keeps GroupNorm / LayerNorm / softmax outputs in fp32, which adds to
"saved"; the table is a lower bound of the peak and a guide to what checkpointing saves.
"""
import argparse
import contextlib

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ref.text_to_image import ARCHITECTURES

GIB = 2 ** 30


def storage_key(tensor):
    return tensor.untyped_storage()._cdata


class SavedTensors:
    """Tensors kept for backward, one entry a storage, parameters (`excluded` storages) left out."""

    def __init__(self, excluded):
        self.excluded, self.kept = excluded, {}

    def pack(self, tensor):
        if storage_key(tensor) not in self.excluded:
            self.kept[storage_key(tensor)] = tensor
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def bytes(self):
        return sum(tensor.untyped_storage().nbytes() for tensor in self.kept.values())


class FlashAttention(torch.autograd.Function):
    """What flash / memory-efficient attention saves: q, k, v, the output and the fp32 logsumexp (B, heads, L)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        return out


@contextlib.contextmanager
def counted_step(saved, recompute_peak):
    """SDPA as flash attention; every activation checkpoint that backward goes through counted: its tensor inputs into
    `saved`, its block's own saved tensors (measured by a forward of the block outside checkpointing, free on meta)
    into recompute_peak[0]."""
    original_sdpa, original_checkpoint = F.scaled_dot_product_attention, torch.utils.checkpoint.checkpoint

    def sdpa(q, k, v, **kwargs):
        return FlashAttention.apply(q, k, v)

    def checkpoint(block, *inputs, **kwargs):
        tensors = [tensor for tensor in inputs if isinstance(tensor, torch.Tensor)]
        if any(tensor.requires_grad for tensor in [*tensors, *block.parameters()]):  # a block backward goes through
            for tensor in tensors:
                saved.pack(tensor)
        inner = SavedTensors(saved.excluded)
        with inner.hooks():
            block(*inputs)
        recompute_peak[0] = max(recompute_peak[0], inner.bytes)
        return original_checkpoint(block, *inputs, **kwargs)

    F.scaled_dot_product_attention, torch.utils.checkpoint.checkpoint = sdpa, checkpoint
    try:
        yield
    finally:
        F.scaled_dot_product_attention, torch.utils.checkpoint.checkpoint = original_sdpa, original_checkpoint


def build(checkpointing, architecture="sd15"):
    """The SD1.5 networks (or ref.text_to_image's tiny ones) on meta in bf16; the ControlNet trainable, the rest
    frozen."""
    builds = ARCHITECTURES[architecture]
    with torch.device("meta"):
        networks = {name: (builds[name](gradient_checkpointing=checkpointing) if name != "text_encoder"
                           else builds[name]()).to(torch.bfloat16) for name in builds}
    for name, network in networks.items():
        network.requires_grad_(name == "controlnet")
    return networks


def measure(batch, size, checkpointing, reward, architecture="sd15"):
    """-> (saved bytes, recompute peak bytes, parameter count {name: n}) of one training step."""
    networks = build(checkpointing, architecture)
    parameters = {storage_key(p) for network in networks.values() for p in network.parameters()}
    saved, recompute_peak = SavedTensors(parameters), [0]
    side, bf16 = size // 8, dict(dtype=torch.bfloat16, device="meta")
    latents, noise = torch.empty(batch, 4, side, side, **bf16), torch.empty(batch, 4, side, side, **bf16)
    context = torch.empty(batch, 77, networks["unet"].encoder_config["context_dim"], **bf16)  # (B, 77, 768) for SD1.5
    hint = torch.empty(batch, 3, size, size, **bf16)
    t = torch.empty(batch, device="meta")
    with counted_step(saved, recompute_peak), saved.hooks():
        noisy = 0.5 * latents + 0.8 * noise  # x_t = alpha_t x0 + sigma_t eps (the coefficients do not matter here)
        residuals = networks["controlnet"](noisy, hint, t, context)
        eps = networks["unet"](noisy, t, context, control=residuals)
        loss = (eps - noise).square().mean()
        if reward:
            estimate = (noisy - 0.8 * eps) / 0.5  # the one-step x0 estimate
            loss = loss + networks["autoencoder"].decode(estimate / 0.18215).square().mean()
    counts = {name: sum(p.numel() for p in network.parameters()) for name, network in networks.items()}
    return saved.bytes, recompute_peak[0], counts


def weight_bytes(counts):
    frozen = sum(n for name, n in counts.items() if name != "controlnet")
    return 2 * frozen + (16 + 2) * counts["controlnet"]


def main(args):
    print(f"SD1.5 ControlNet training step, batch {args.batch_size} at {args.size} px, bf16 activations (GiB):")
    print("| step | checkpointing | saved activations | recompute peak | weights + grads + AdamW | total |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for reward in (False, True):
        for checkpointing in (False, True):
            saved, recompute, counts = measure(args.batch_size, args.size, checkpointing, reward)
            weights = weight_bytes(counts)
            step = "eps loss + reward decode" if reward else "eps loss"
            print(f"| {step} | {'on' if checkpointing else 'off'} | {saved / GIB:.1f} | {recompute / GIB:.1f} | "
                  f"{weights / GIB:.1f} | {(saved + recompute + weights) / GIB:.1f} |")
    print("parameters: " + ", ".join(f"{name} {n / 1e6:.1f} M" for name, n in counts.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    main(parser.parse_args())
