"""FID while sampling (sample.py --fid-ref): the metrics it writes equal eval.py fid's on the same samples (a tiny DiT
run, an FID Inception of random weights written here), the images are not kept unless asked, the features of shares
taken apart (ranks) merge into those of the whole set, and bad flags are refused before anything is written."""
import json

import numpy as np
import pytest
import torch

import eval as eval_script
import sample
from tests.helpers import randomise
from ref import metrics, runtime
from ref.inception import FIDInceptionV3
from ref.internal_guidance import dit_from_config
from ref.metrics import ImageFeatures, ImageSource, merged_summary, summarise_images
from shapes.runs import SHAPES_CONFIGS

torch.set_num_threads(1)
SAMPLING = ["--num-samples", "5", "--batch-size", "2", "--steps", "4", "--ig", "1.5", "--cfg", "1.5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny shapes-tiny run (random weights), a random-weight Inception file and a reference batch of 4 images
    (no stored statistics: eval.py fid's default pipeline, tf1)."""
    folder = tmp_path_factory.mktemp("fid")
    config = dict(SHAPES_CONFIGS["shapes-tiny"], depth=2, hidden_size=32, num_heads=4, config="shapes-tiny")
    model = randomise(dit_from_config(config), scale=0.05)
    (folder / "run").mkdir()
    runtime.save_checkpoint(folder / "run" / "latest.pt", model, model, torch.optim.AdamW(model.parameters()), 0,
                            config)
    torch.manual_seed(0)
    torch.save(FIDInceptionV3(random_weights=True).state_dict(), folder / "inception.pt")
    images = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(folder / "ref.npz", arr_0=images)  # images only: both scripts take their features
    return folder


def recorded_reports(monkeypatch, *modules):
    """Each module's fid_report records its (samples, reference) summaries and returns the samples' IS alone: the
    Frechet distances of 2048-d features take scipy's sqrtm about a minute a matrix on one loaded core, and both
    scripts hand the summaries to the one ref.metrics.fid_report. -> the list the summaries go to"""
    recorded = []

    def record(samples, reference=None):
        recorded.append((samples, reference))
        return metrics.fid_report(samples)
    for module in modules:
        monkeypatch.setattr(module, "fid_report", record)
    return recorded


def assert_same_summary(a, b, rtol):
    assert a.count == b.count
    for got, expected in ((a.pool, b.pool), (a.logits, b.logits), *zip(a.pool_moments, b.pool_moments),
                          *zip(a.spatial_moments, b.spatial_moments)):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_inception_features_while_sampling_equal_eval_fid_s(files, tmp_path, monkeypatch):
    """With the FID Inception (random weights, from a file): the summaries behind the metrics, the features of the
    samples as decoded in batches of 2 and of the reference, equal eval.py fid's of the written samples."""
    recorded = recorded_reports(monkeypatch, sample, eval_script)
    sample.main([str(files / "run"), *SAMPLING, "--fid-ref", str(files / "ref.npz"), "--inception",
                 str(files / "inception.pt"), "--npz", "--out", str(tmp_path)])
    by_eval = eval_script.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--inception",
                                str(files / "inception.pt")])  # the reference goes through the same load_reference
    (streamed, streamed_reference), (evaluated, _) = recorded
    assert streamed.count == 5 and streamed.pool.shape == (5, 2048) and streamed_reference.count == 4
    assert_same_summary(streamed, evaluated, rtol=1e-5)  # batches of 2 against one of 5: float32 rounding apart
    assert json.loads((tmp_path / "fid.json").read_text())["metrics"]["inception_score"] == pytest.approx(
        by_eval["inception_score"], rel=1e-6)


class TinyInception:
    """Stands in for FIDInceptionV3(weights, resize=...) (built, moved): 12-d "pool", 5 "logits", 3-d "spatial"."""

    def __init__(self, weights=None, resize="tf1"):
        pass

    def to(self, device):
        return self

    def __call__(self, images):  # (N, 3, H, W) in [0, 1]
        pool = torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)  # (N, 12)
        return {"pool": pool, "logits": pool[:, :5] * 7, "spatial": images.mean(dim=(2, 3))}


def test_metrics_while_sampling_equal_eval_fid_s_and_the_images_are_not_kept(files, tmp_path, monkeypatch):
    """The whole report (IS, FID, sFID, precision/recall) through both scripts, on a small stand-in extractor whose
    Frechet distances are cheap; without --npz / --png only grid.png's first samples are kept."""
    monkeypatch.setattr(sample, "FIDInceptionV3", TinyInception)
    fid = ["--fid-ref", str(files / "ref.npz"), "--inception", str(files / "inception.pt")]
    sample.main([str(files / "run"), *SAMPLING, *fid, "--npz", "--out", str(tmp_path / "kept")])
    streamed = json.loads((tmp_path / "kept" / "fid.json").read_text())["metrics"]
    by_eval = eval_script.main(["fid", "--samples", str(tmp_path / "kept" / "samples.npz"), "--ref",
                                str(files / "ref.npz")], extractor=TinyInception())
    assert streamed.keys() == by_eval.keys() and streamed["samples"] == 5 and streamed["reference"] == 4
    for name, value in by_eval.items():
        assert streamed[name] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value)
    assert streamed["fid"] > 0 and streamed["sfid"] > 0 and streamed["precision"] is not None

    sample.main([str(files / "run"), *SAMPLING, *fid, "--grid-rows", "1", "--out", str(tmp_path / "scored")])
    assert sorted(path.name for path in (tmp_path / "scored").iterdir()) == ["fid.json", "grid.png", "settings.json"]
    assert json.loads((tmp_path / "scored" / "fid.json").read_text())["metrics"] == streamed  # the same samples
    assert json.loads((tmp_path / "scored" / "settings.json").read_text())["fid_feature_seconds"] > 0


def test_shares_of_the_ranks_merge_into_the_whole_set(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (11, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "all.npz", arr_0=images)
    whole = summarise_images(ImageSource(tmp_path / "all.npz", "RGB"), TinyInception(), batch_size=11)
    shares = []
    for rank in range(3):  # rank r holds samples r, r + 3, ..., fed in batches of 2 as sample_share does
        features, indices = ImageFeatures(TinyInception()), np.arange(rank, 11, 3)
        for start in range(0, len(indices), 2):
            features.update(images[indices[start:start + 2]], indices[start:start + 2])
        shares.append(features.share())
    merged = merged_summary(shares)
    assert merged.count == 11
    np.testing.assert_allclose(merged.pool, whole.pool, rtol=1e-6)  # back in sample order
    np.testing.assert_allclose(merged.logits, whole.logits, rtol=1e-6)
    for got, expected in (*zip(merged.pool_moments, whole.pool_moments),
                          *zip(merged.spatial_moments, whole.spatial_moments)):
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(merged.pool_moments[1], np.cov(whole.pool.astype(np.float64), rowvar=False),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--npz"], "--inception and --npz go with --fid-ref REF.npz"),
    (["--fid-ref", "{files}/ref.npz", "--inception", "{files}/nowhere.pth"], "nowhere.pth: no such file"),
    (["--fid-ref", "{files}/inception.pt", "--inception", "{files}/inception.pt"],
     "inception.pt: a reference needs images (arr_0) or statistics (mu, sigma)"),
])
def test_bad_fid_flags_exit_2_and_write_nothing(files, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.main([str(files / "run"), *SAMPLING, "--out", str(tmp_path / "out"),
                     *(flag.format(files=files) for flag in flags)])
    assert exit_info.value.code == 2 and not (tmp_path / "out").exists()
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message.format(files=files) in error
