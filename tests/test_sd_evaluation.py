"""`eval.py innercontrol-sd` (ref/sd_evaluation.py) on hand-made generated sets whose metric values are worked out by
hand: segmentation mIoU pooled over every seed's images (a TorchScript segmenter that labels pure red / green / blue
pixels 0 / 1 / 2), depth RMSE (the loader monkeypatched with a stand-in reading the red channel as depth: DPT-Large has
one size, too slow here; DPT-Hybrid only with --eval-model-kind), HED / LineArt MS-SSIM and SSIM of constant maps and
FID of the real images themselves (an Inception stand-in), HED maps too small for MS-SSIM refused; evaluation models
of another task, a DPT-Hybrid file as DPT-Large and samples of another folder refused."""
import json

import numpy as np
import pytest
import torch

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
from ref.hed import HEDAnnotator
from tests.helpers import write_image

torch.set_num_threads(1)
SIZE = 16
CAPTIONS = ["a cat", "the cat"]
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)  # classes 0, 1, 2 of ChannelSegmenter


class ChannelSegmenter(torch.nn.Module):
    """Logits = the normalised RGB channels: a pure red, green or blue pixel is class 0, 1 or 2."""

    def forward(self, x):
        return x


def write_data(folder, task, images, controls, hints=None):
    """A metadata.jsonl folder of the given real images and controls (and hints), SIZE x SIZE."""
    folder.mkdir()
    lines = []
    for index, (image, control) in enumerate(zip(images, controls)):
        line = dict(image=write_image(folder / f"image{index}.png", image), caption=CAPTIONS[index % 2],
                    control=write_image(folder / f"control{index}.png", control))
        if hints is not None:
            line["hint"] = write_image(folder / f"hint{index}.png", hints[index])
        lines.append(json.dumps(line))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def write_samples(folder, samples, seeds_per_prompt, task, captions=CAPTIONS):
    """What `sample.py sd15 --data-path` writes: samples.npz (arr_1: the pair of each) and settings.json."""
    folder.mkdir()
    pairs = np.arange(len(samples)) // seeds_per_prompt
    np.savez(folder / "samples.npz", arr_0=np.stack(samples), arr_1=pairs)
    settings = dict(job="sd15-controlnet", size=len(samples[0]), seeds_per_prompt=seeds_per_prompt, task=task,
                    pairs=[dict(prompt=captions[pair % 2], control="") for pair in range(pairs[-1] + 1)])
    (folder / "settings.json").write_text(json.dumps(settings))
    return folder


def evaluate(samples, data, task, model, tmp_path, *extra, extractor=None):
    out = tmp_path / "metrics.json"
    eval_script.main(list(map(str, ["innercontrol-sd", "--samples", samples, "--data-path", data, "--task", task,
                                    "--eval-model", model, "--device", "cpu", "--out", out, *extra])), extractor)
    return json.loads(out.read_text())["metrics"]


def segmentation_case(tmp_path):
    """2 pairs x 2 seeds. Labels (row 0 unlabelled): pair 0 left half 0, right half 1; pair 1 all 2. Seed 0 paints
    the labels' colours (mIoU 1); seed 1 is all red (class 0) for both pairs."""
    labels = np.zeros((2, SIZE, SIZE), np.uint8)
    labels[0, :, SIZE // 2:], labels[1] = 1, 2
    labels[:, 0] = 255
    exact = [COLOURS[np.where(label == 255, 0, label)] for label in labels]
    red = np.broadcast_to(COLOURS[0], (SIZE, SIZE, 3))
    data = write_data(tmp_path / "data", "segmentation", exact, labels, hints=exact)
    samples = write_samples(tmp_path / "samples", [exact[0], red, exact[1], red], 2, "segmentation")
    segmenter = tmp_path / "segmenter.pt"
    torch.jit.script(ChannelSegmenter()).save(str(segmenter))
    return samples, data, segmenter


def test_segmentation_miou_is_pooled_over_every_seeds_images(tmp_path, capsys):
    samples, data, segmenter = segmentation_case(tmp_path)
    metrics = evaluate(samples, data, "segmentation", segmenter, tmp_path, "--num-classes", 3)
    # seed 1 over 15 labelled rows: class 0 I = 120 (pair 0's left), U = 480 predicted; classes 1, 2: I = 0
    assert [seed["miou"] for seed in metrics["per_seed"]] == pytest.approx([1.0, (120 / 480) / 3])
    # all four images (mmseg's IoUMetric on the seed folders as one set): class 0 I = 120 + 120, U = 600 predicted;
    # class 1 I = 120, U = 240 labelled; class 2 I = 240, U = 480 labelled. The mean of the seeds' would be 0.5417,
    # the mean of the images' (1 + 1 + 1/4 + 0) / 4 = 0.5625.
    assert metrics["miou"] == pytest.approx((240 / 600 + 120 / 240 + 240 / 480) / 3)
    assert metrics["samples"] == 4 and metrics["pairs"] == 2 and "fid" not in metrics
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "| segmentation | 4 | 0.4667 | n/a |"


class RedDepth(torch.nn.Module):
    """A depth-model stand-in: the red channel is the depth."""

    def forward(self, image):
        return image[:, :1]


def test_depth_rmse_compares_the_max_normalised_reading_with_the_min_max_scaled_control(tmp_path, monkeypatch):
    presets = []  # the DPT preset eval.py asks for: DPT-Large unless --eval-model-kind says otherwise
    monkeypatch.setattr(eval_script, "control_model",
                        lambda task, path, num_classes, depth_model: presets.append(depth_model) or RedDepth())
    depth = np.zeros((2, SIZE, SIZE), np.uint8)
    depth[0, :, SIZE // 2:], depth[1, :SIZE // 2], depth[1, SIZE // 2:] = 255, 64, 192  # min-max: 0 / 255 halves
    scaled = [np.repeat(((d - d.min()) / (d.max() - d.min()) * 255).astype(np.uint8)[..., None], 3, -1)
              for d in depth]
    white = np.full((SIZE, SIZE, 3), 255, np.uint8)  # read as depth 1 everywhere: off by 255 on half the pixels
    data = write_data(tmp_path / "data", "depth", scaled, depth)
    samples = write_samples(tmp_path / "samples", [scaled[0], white, scaled[1], white], 2, "depth")
    metrics = evaluate(samples, data, "depth", tmp_path / "unused", tmp_path)
    assert [seed["rmse"] for seed in metrics["per_seed"]] == pytest.approx([0.0, 255 / np.sqrt(2)], abs=1e-9)
    assert metrics["rmse"] == pytest.approx(255 / np.sqrt(2) / 2)
    evaluate(samples, data, "depth", tmp_path / "unused", tmp_path, "--eval-model-kind", "dpt-hybrid-midas")
    assert presets == ["dpt-large", "dpt-hybrid-midas"]


def mean_colour(images):
    """An Inception stand-in: the mean colour as the features, and as IS's logits."""
    colour = images.mean(dim=(2, 3))  # (B, 3)
    return {"pool": colour, "logits": colour}


@pytest.mark.parametrize("task", ["hed", "lineart"])
def test_edge_headline_is_ms_ssim_with_ssim_beside_and_fid_of_the_real_images(task, tmp_path, monkeypatch, capsys):
    """Constant maps a (the annotator on the real image) and b (on the generated one), 176 px, MS-SSIM's smallest
    side: every scale's contrast-structure term is 1 (no variance), so MS-SSIM = l(a, b)^0.1333 with l = (2ab + C1) /
    (a^2 + b^2 + C1) the luminance term, SSIM = l."""
    monkeypatch.setattr(eval_script, "control_model", lambda task, path, num_classes, kind: RedDepth())  # red: edges
    side, a, b = 176, 51, 153  # 0.2 and 0.6
    real = [np.full((side, side, 3), (a, 0, 0), np.uint8), np.full((side, side, 3), (b, 0, 0), np.uint8)]
    data = write_data(tmp_path / "data", task, real, [np.zeros((side, side), np.uint8)] * 2)
    samples = write_samples(tmp_path / "samples", real[::-1], 1, task)  # each pair's generated image: the other's
    metrics = evaluate(samples, data, task, tmp_path / "unused", tmp_path, "--inception", "stand-in",
                       extractor=mean_colour)
    c1 = 0.01 ** 2
    luminance = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)
    assert metrics["ssim"] == pytest.approx(luminance, rel=1e-6)  # the maps pass float32 pixels
    assert metrics["ms_ssim"] == pytest.approx(luminance ** 0.1333, rel=1e-6)
    assert capsys.readouterr().out.splitlines()[-1] == (f"| {task} | 2 | {luminance ** 0.1333:.4f} | {luminance:.4f} | "
                                                        f"{metrics['fid']['fid']:.2f} |")  # MS-SSIM first
    assert metrics["fid"]["fid"] == pytest.approx(0.0, abs=1e-6) and metrics["fid"]["reference"] == 2


def test_hed_below_ms_ssims_smallest_side_is_refused(tmp_path, capsys):
    """torchmetrics refuses MS-SSIM on maps below 176 px; so does the evaluation (the real HED annotator, 16 px)."""
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    data = write_data(tmp_path / "data", "hed", images, generator.integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8))
    samples = write_samples(tmp_path / "samples", list(images), 1, "hed")
    torch.manual_seed(0)
    torch.save(HEDAnnotator().state_dict(), tmp_path / "hed.pth")
    with pytest.raises(SystemExit) as exit_info:
        evaluate(samples, data, "hed", tmp_path / "hed.pth", tmp_path)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert error.startswith("error: hed maps of (16, 16) pixels: MS-SSIM, the released metric") and "176" in error
    assert not (tmp_path / "metrics.json").exists()


WRONG_MODELS = {  # a file of another task's model, named by what it holds
    "dpt-as-hed": ("hed", {"dpt.embeddings.cls_token": torch.zeros(1)}, "holds DPT depth weights (dpt.* keys), not "
                   "the HED annotator's weights"),
    "lineart-as-hed": ("hed", {"model0.1.weight": torch.zeros(1)}, "holds the LineArt annotator's weights "
                       "(sk_model.pth: model0 ... model4 keys), not the HED annotator's weights"),
    "hed-as-lineart": ("lineart", {"block1.convs.0.weight": torch.zeros(1)}, "holds the HED annotator's weights "
                       "(ControlNetHED_Apache2: norm, block1.convs.0 ... block5.projection), not the LineArt "
                       "annotator's"),
    "dpt-hybrid-as-dpt-large": ("depth", {"dpt.embeddings.backbone.bit.embedder.convolution.weight": torch.zeros(1)},
                                "holds DPT-Hybrid depth weights (Intel/dpt-hybrid-midas, the reward model: "
                                "dpt.embeddings.backbone.bit.* keys), not DPT-Large depth weights (model.safetensors "
                                "of Intel/dpt-large, from huggingface.co/Intel/dpt-large: "),
    "hed-as-segmenter": ("segmentation", {"block1.convs.0.weight": torch.zeros(1)}, "holds the HED annotator's "
                         "weights (ControlNetHED_Apache2: norm, block1.convs.0 ... block5.projection), not a "
                         "TorchScript segmenter"),
}


@pytest.mark.parametrize("case", [*WRONG_MODELS, "other-captions"])
def test_bad_input_exits_2_with_one_error_line(case, tmp_path, capsys):
    samples, data, model = segmentation_case(tmp_path)
    task, expected = "segmentation", "pair 1's prompt is 'a dog', "
    if case in WRONG_MODELS:
        task, state, expected = WRONG_MODELS[case]
        model = tmp_path / "model.pth"
        torch.save(state, model)
        settings = json.loads((samples / "settings.json").read_text())
        (samples / "settings.json").write_text(json.dumps(dict(settings, task=task)))
    else:
        settings = json.loads((samples / "settings.json").read_text())
        settings["pairs"][1]["prompt"] = "a dog"
        (samples / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(SystemExit) as exit_info:
        evaluate(samples, data, task, model, tmp_path, "--num-classes", 3)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and not (tmp_path / "metrics.json").exists()
    assert error.startswith("error: ") and error.count("\n") == 1 and expected in error, error
