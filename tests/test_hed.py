"""HED annotator (ref/hed.py): the ControlNetHED_Apache2 layout and parameter count, the edge map as an independent
functional re-derivation of the public forward, a hand-computed constant case, the 512 px forward on random weights,
gradients reaching the image, and files for other tasks refused by name."""
import pytest
import torch
import torch.nn.functional as F

from ref.hed import HEDAnnotator

# ControlNetHED_Apache2 (ControlNet 1.1 annotator/hed): norm (1, 3, 1, 1), then DoubleConvBlock(in, out, n) x 5 with
# (3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3): `convs.i` 3x3 convs and a 1x1 `projection`.
PUBLIC_BLOCKS = [(3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3)]
PUBLIC_PARAMETERS = 14_716_168  # summed by hand from the layout; the notes give the same count


def public_layout():
    layout = {"norm": (1, 3, 1, 1)}
    for block, (c_in, c_out, convs) in enumerate(PUBLIC_BLOCKS, start=1):
        for i in range(convs):
            layout[f"block{block}.convs.{i}.weight"] = (c_out, c_in if i == 0 else c_out, 3, 3)
            layout[f"block{block}.convs.{i}.bias"] = (c_out,)
        layout[f"block{block}.projection.weight"] = (1, c_out, 1, 1)
        layout[f"block{block}.projection.bias"] = (1,)
    return layout


@pytest.fixture(scope="module")
def hed():
    torch.manual_seed(0)
    model = HEDAnnotator()
    with torch.no_grad():
        model.norm.copy_(torch.tensor([104.0, 117.0, 123.0]).reshape(1, 3, 1, 1))  # about the BSDS mean
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model


def test_layout_and_parameter_count_match_the_public_file():
    state = HEDAnnotator().state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == public_layout()
    assert list(state) == list(public_layout())  # same order as the file
    assert sum(value.numel() for value in state.values()) == PUBLIC_PARAMETERS


def reference_edges(state, image):
    """The public forward written out with functional ops on the state dict: 255 x RGB - norm, blocks of conv + ReLU
    with a 2x2 max pool before blocks 2-5, five 1x1 side outputs upsampled bilinearly, sigmoid of their mean."""
    x = image * 255 - state["norm"]
    sides = []
    for block, (_, _, convs) in enumerate(PUBLIC_BLOCKS, start=1):
        if block > 1:
            x = F.max_pool2d(x, 2)
        for i in range(convs):
            x = F.relu(F.conv2d(x, state[f"block{block}.convs.{i}.weight"], state[f"block{block}.convs.{i}.bias"],
                                padding=1))
        side = F.conv2d(x, state[f"block{block}.projection.weight"], state[f"block{block}.projection.bias"])
        sides.append(F.interpolate(side, size=image.shape[-2:], mode="bilinear", align_corners=False))
    return torch.sigmoid(sum(sides) / len(sides))


def test_edges_match_a_functional_rederivation(hed):
    image = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hed(image), reference_edges(hed.state_dict(), image), rtol=1e-4, atol=1e-5)


def test_constant_side_outputs_give_the_sigmoid_of_their_mean():
    # All conv weights zero: each projection outputs its bias b_k everywhere, so edge = sigmoid(mean_k b_k).
    model = HEDAnnotator()
    biases = torch.tensor([2.0, -1.0, 0.5, 3.0, -4.0])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for block, bias in enumerate(biases, start=1):
            getattr(model, f"block{block}").projection.bias.fill_(bias)
        edges = model(torch.rand(1, 3, 32, 32))
    torch.testing.assert_close(edges, torch.full((1, 1, 32, 32), torch.sigmoid(biases.mean()).item()))


def test_forward_at_512_px_on_random_weights(hed):
    with torch.no_grad():  # a VGG-16 trunk at 512 px: about 80 GMAC, the slowest test here
        edges = hed(torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(2)))
    assert edges.shape == (1, 1, 512, 512)
    assert edges.min() >= 0 and edges.max() <= 1 and edges.std() > 0


def test_gradient_reaches_the_image_and_not_the_frozen_weights(hed):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    target = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    (hed(image) - target).square().mean().backward()  # the HED reward's MSE
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in hed.parameters())


def test_weights_file_round_trip(hed, tmp_path):
    path = tmp_path / "ControlNetHED_Apache2.pth"
    torch.save(hed.state_dict(), path)
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(HEDAnnotator(str(path))(image), hed(image), rtol=0, atol=0)


def test_files_of_other_tasks_are_refused_by_name(tmp_path):
    dpt = tmp_path / "dpt-hybrid-midas.bin"
    torch.save({"dpt.embeddings.cls_token": torch.zeros(1, 1, 8), "head.head.0.weight": torch.zeros(4, 8, 3, 3)}, dpt)
    with pytest.raises(ValueError, match=r"dpt-hybrid-midas\.bin holds DPT depth weights \(dpt\.\* keys\), not the "
                                         r"HED annotator's weights \(ControlNetHED_Apache2: norm, block1\.convs\.0"):
        HEDAnnotator(str(dpt))
    original_hed = tmp_path / "network-bsds500.pth"
    torch.save({"moduleVggOne.0.weight": torch.zeros(64, 3, 3, 3)}, original_hed)
    with pytest.raises(ValueError, match="holds the original HED's weights"):
        HEDAnnotator(str(original_hed))
    segmenter = tmp_path / "segmenter.pt"
    torch.jit.trace(torch.nn.Conv2d(3, 2, 1), torch.zeros(1, 3, 4, 4)).save(str(segmenter))
    with pytest.raises(ValueError, match="segmenter.pt holds a TorchScript program"):
        HEDAnnotator(str(segmenter))


def test_a_damaged_hed_file_lists_what_differs(hed, tmp_path):
    state = dict(hed.state_dict())
    del state["block5.projection.bias"]
    state["block1.convs.0.weight"] = state["block1.convs.0.weight"][:32]
    path = tmp_path / "damaged.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        HEDAnnotator(str(path))
    message = str(error.value)
    assert "damaged.pth" in message and "block5.projection.bias" in message
    assert "block1.convs.0.weight expected (64, 3, 3, 3), got (32, 3, 3, 3)" in message
    unreadable = tmp_path / "page.html"
    unreadable.write_text("<html>not found</html>")
    with pytest.raises(ValueError, match="page.html is not a PyTorch checkpoint"):
        HEDAnnotator(str(unreadable))
