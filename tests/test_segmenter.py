"""Segmentation plug-in (ref/segmenter.py): tiny TorchScript segmenters written to tmp_path; the ImageNet normalisation
, the logits at the program's own size, the cross-entropy reward against a hand computation with label
255 left out, gradients reaching the image, and every file or output that is not TorchScript class logits refused
with the file named."""
import math

import pytest
import torch
import torch.nn as nn

from ref.hed import HEDAnnotator
from ref.segmenter import TorchScriptSegmenter, segmentation_reward


class StridedSegmenter(nn.Module):
    """A stride-4 conv to `classes` logits: (B, 3, H, W) -> (B, K, H/4, W/4)."""

    def __init__(self, classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


class Passthrough(nn.Module):
    """Its input as 3-class logits: shows what the wrapper feeds the program."""

    def forward(self, x):
        return x.clone()


class ClassIndices(nn.Module):
    def forward(self, x):
        return x.argmax(1)  # (B, H, W) integer: a prediction, not logits


class LogitsAndAuxiliary(nn.Module):
    def forward(self, x):
        return x, x.mean(1)


def script(module, path):
    torch.jit.trace(module.eval(), torch.zeros(1, 3, 16, 16)).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def strided(tmp_path_factory):
    torch.manual_seed(0)
    return TorchScriptSegmenter(script(StridedSegmenter(), tmp_path_factory.mktemp("seg") / "strided.pt"),
                                num_classes=5, probe_size=32)


def test_images_are_imagenet_normalised(tmp_path):
    segmenter = TorchScriptSegmenter(script(Passthrough(), tmp_path / "passthrough.pt"), probe_size=16)
    image = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(segmenter(image), (image - mean) / std)
    assert segmenter.num_classes == 3


def test_reward_is_the_cross_entropy_over_labelled_pixels(tmp_path):
    segmenter = TorchScriptSegmenter(script(Passthrough(), tmp_path / "passthrough.pt"), probe_size=16)
    image = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(2))
    labels[0, :2] = 255  # half of sample 0 has no class
    labels[1] = 255  # sample 1 has none at all
    logits = segmenter(image)
    expected = []
    for b in range(2):  # -log softmax of the labelled class, averaged over the labelled pixels by hand
        terms = [math.log(sum(math.exp(v) for v in logits[b, :, i, j].tolist())) - logits[b, labels[b, i, j], i, j]
                 for i in range(4) for j in range(4) if labels[b, i, j] != 255]
        expected.append(sum(terms) / len(terms) if terms else 0.0)
    torch.testing.assert_close(segmentation_reward(segmenter, image, labels), torch.tensor(expected))


def test_reward_at_the_control_size_passes_gradients_to_the_image(strided):
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    labels = torch.randint(0, 5, (2, 32, 48), generator=torch.Generator().manual_seed(4))
    labels[:, :4] = 255
    reward = segmentation_reward(strided, image, labels)
    assert reward.shape == (2,) and torch.isfinite(reward).all()
    reward.sum().backward()
    assert image.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in strided.parameters())
    assert strided(image).shape == (2, 5, 16, 16)  # the labels are brought to the logits, not the reverse


def test_outputs_that_are_not_logits_are_refused(tmp_path):
    cases = {"indices.pt": (ClassIndices(), r"torch.int64 \(2, 32, 32\) .*: 3 dimensions, not logits \(B, K, h, w\)"),
             "tuple.pt": (LogitsAndAuxiliary(), r"a tuple for a probe batch .*, not one tensor of logits"),
             "one_class.pt": (StridedSegmenter(classes=1), r"torch.float32 \(2, 1, 8, 8\) .*: 1 channel\(s\)"),
             "wrong_classes.pt": (StridedSegmenter(classes=4),
                                  r".*: 4 channel\(s\), not logits \(B, K, h, w\) = \(2, 5, h, w\)")}
    for name, (module, message) in cases.items():
        with pytest.raises(ValueError, match=rf"{name} returned {message}"):
            TorchScriptSegmenter(script(module, tmp_path / name), num_classes=5, probe_size=32)


def test_files_that_are_not_torchscript_are_refused_by_name(tmp_path):
    hed = tmp_path / "ControlNetHED_Apache2.pth"
    torch.save(HEDAnnotator().state_dict(), hed)
    with pytest.raises(ValueError, match=r"ControlNetHED_Apache2\.pth holds the HED annotator's weights .*, not a "
                                         r"TorchScript segmenter"):
        TorchScriptSegmenter(str(hed))
    state_dict = tmp_path / "upernet_state_dict.pth"
    torch.save(StridedSegmenter().state_dict(), state_dict)
    with pytest.raises(ValueError, match=r"upernet_state_dict\.pth holds no TorchScript program"):
        TorchScriptSegmenter(str(state_dict))
    with pytest.raises(ValueError, match=r"missing\.pt: no such file \(a TorchScript segmenter"):
        TorchScriptSegmenter(str(tmp_path / "missing.pt"))
    # and the other way round: the segmenter's file given as the HED annotator
    segmenter = script(StridedSegmenter(), tmp_path / "segmenter.pt")
    with pytest.raises(ValueError, match=r"segmenter\.pt holds a TorchScript program \(a segmenter plug-in\?\), not "
                                         r"the HED annotator's weights"):
        HEDAnnotator(segmenter)


def test_a_program_that_fails_on_the_probe_is_refused(tmp_path):
    path = script(StridedSegmenter(), tmp_path / "strided.pt")
    with pytest.raises(ValueError, match=r"strided\.pt failed on a probe batch \(2, 3, 2, 2\)"):
        TorchScriptSegmenter(path, probe_size=2)  # smaller than its 4x4 kernel
