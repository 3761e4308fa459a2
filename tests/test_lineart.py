"""LineArt annotator (ref/lineart.py): the published sk_model.pth layout and parameter count, the line map against a
functional re-derivation of the public forward on a file written in that layout, a hand-computed constant case,
gradients reaching the image, and files of other models refused by name."""
import math

import pytest
import torch
import torch.nn.functional as F

from ref.hed import HEDAnnotator
from ref.lineart import LineArtAnnotator
from tests.helpers import randomise

torch.set_num_threads(1)
# Generator(3, 1, 3) of ControlNet 1.1's annotator/lineart: model0 = [pad, conv 7x7 3->64, IN, ReLU]; model1 = [conv
# 64->128, IN, ReLU, conv 128->256, IN, ReLU] (3x3, stride 2); model2 = 3 x ResidualBlock(256) whose conv_block is
# [pad, conv, IN, ReLU, pad, conv, IN]; model3 = [convT 256->128, IN, ReLU, convT 128->64, IN, ReLU] (3x3, stride 2;
# a transposed conv's weight is (in, out, k, k)); model4 = [pad, conv 7x7 64->1, sigmoid]. InstanceNorm2d's defaults
# hold no tensors. Keys: each conv's index inside its nn.Sequential.
PUBLISHED_CONVS = {"model0.1": (64, 3, 7, 7), "model1.0": (128, 64, 3, 3), "model1.3": (256, 128, 3, 3),
                   **{f"model2.{block}.conv_block.{index}": (256, 256, 3, 3) for block in range(3) for index in (1, 5)},
                   "model3.0": (256, 128, 3, 3), "model3.3": (128, 64, 3, 3), "model4.1": (1, 64, 7, 7)}
TRANSPOSED = ("model3.0", "model3.3")
# 9,472 + 73,856 + 295,168 + 6 x 590,080 + 295,040 + 73,792 + 3,137 (weights and biases), summed by hand
PUBLISHED_PARAMETERS = 4_290_945


def published_layout():
    layout = {}
    for name, shape in PUBLISHED_CONVS.items():
        layout[f"{name}.weight"] = shape
        layout[f"{name}.bias"] = (shape[1] if name in TRANSPOSED else shape[0],)
    return layout


def test_layout_and_parameter_count_match_the_published_file():
    state = LineArtAnnotator().state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == published_layout()
    assert list(state) == list(published_layout())  # the file's order
    assert sum(value.numel() for value in state.values()) == PUBLISHED_PARAMETERS


def reference_drawing(state, image):
    """The public forward written out with functional ops on the state dict: reflection pads, convs, instance norm
    without affine weights after every conv but the last, residual adds, sigmoid."""
    def conv(x, name, pad=0, **kwargs):
        x = F.pad(x, (pad,) * 4, mode="reflect") if pad else x
        operation = F.conv_transpose2d if name in TRANSPOSED else F.conv2d
        return operation(x, state[f"{name}.weight"], state[f"{name}.bias"], **kwargs)

    def norm_relu(x):
        return F.relu(F.instance_norm(x))

    x = norm_relu(conv(image, "model0.1", pad=3))
    x = norm_relu(conv(x, "model1.0", stride=2, padding=1))
    x = norm_relu(conv(x, "model1.3", stride=2, padding=1))
    for block in range(3):
        inner = norm_relu(conv(x, f"model2.{block}.conv_block.1", pad=1))
        x = x + F.instance_norm(conv(inner, f"model2.{block}.conv_block.5", pad=1))
    x = norm_relu(conv(x, "model3.0", stride=2, padding=1, output_padding=1))
    x = norm_relu(conv(x, "model3.3", stride=2, padding=1, output_padding=1))
    return torch.sigmoid(conv(x, "model4.1", pad=3))


def test_a_file_in_the_published_layout_gives_the_public_forward(tmp_path):
    """A dict of the published keys saved as sk_model.pth is: loaded, the map is 1 - the public forward's drawing."""
    generator = torch.Generator().manual_seed(0)
    state = {key: 0.05 * torch.randn(shape, generator=generator) for key, shape in published_layout().items()}
    path = tmp_path / "sk_model.pth"
    torch.save(state, path)
    image = torch.rand(2, 3, 24, 32, generator=generator)
    with torch.no_grad():
        lines = LineArtAnnotator(str(path))(image)
        torch.testing.assert_close(lines, 1 - reference_drawing(state, image), rtol=1e-5, atol=1e-6)
    assert lines.shape == (2, 1, 24, 32) and lines.min() >= 0 and lines.max() <= 1 and lines.std() > 0


def test_instance_norm_before_the_last_conv_leaves_it_its_bias():
    """Every conv weight zero but the last, every bias about 1: each map is its conv's bias, constant over H, W, so
    each InstanceNorm (no affine weights, the instance's own statistics) outputs 0 and the last conv sees zeros:
    drawing = sigmoid(model4.1.bias) for any image, here sigmoid(log 3) = 3/4, line map 1/4. Without the norm after
    model3's last transposed conv the random last weights would read its bias, about 1, instead."""
    model = randomise(LineArtAnnotator())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("weight") and not name.startswith("model4."):
                parameter.zero_()
        model.model4[1].bias.fill_(math.log(3))
        lines = model(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(lines, torch.full((2, 1, 16, 16), 0.25), rtol=0, atol=1e-5)


def test_gradient_reaches_the_image_and_not_the_frozen_weights():
    model = randomise(LineArtAnnotator())
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
    target = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    (model(image) - target).square().mean().backward()  # the LineArt reward's MSE
    assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.parameters())


def test_files_of_the_other_annotator_and_odd_sizes_are_refused(tmp_path):
    hed, lineart = tmp_path / "ControlNetHED_Apache2.pth", tmp_path / "sk_model.pth"
    torch.save({"block1.convs.0.weight": torch.zeros(64, 3, 3, 3)}, hed)
    torch.save({"model0.1.weight": torch.zeros(64, 3, 7, 7)}, lineart)
    with pytest.raises(ValueError, match=r"ControlNetHED_Apache2\.pth holds the HED annotator's weights .*, not the "
                                         r"LineArt annotator's weights \(sk_model\.pth: model0 \.\.\. model4 keys\)"):
        LineArtAnnotator(str(hed))
    with pytest.raises(ValueError, match=r"sk_model\.pth holds the LineArt annotator's weights .*, not the HED "
                                         r"annotator's weights"):
        HEDAnnotator(str(lineart))
    with pytest.raises(ValueError, match=r"multiples of 4, got \(18, 16\)"):
        LineArtAnnotator()(torch.rand(1, 3, 18, 16))
