"""eval.py end to end: ADM-style .npz round trips (FD 0 and precision = recall = 1 on the same images), reference
batches written and read back, folders, stored statistics, the control metrics, and the error without weights.

A small fixed feature extractor stands in for the FID Inception (injected through `eval.main(extractor=...)`), so no
weights file is needed; it has fewer dimensions than images so that covariances have full rank."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
from ref.metrics import ImageSource, frechet_distance

REPO = Path(__file__).resolve().parents[1]
PROJECTION = torch.randn(27, 10, generator=torch.Generator().manual_seed(0))


def tiny_extractor(images):
    """(N, 3, H, W) in [0, 1] -> 27-d "pool", 10 "logits", 12-d "spatial" (the FID Inception's output names)."""
    pool = F.adaptive_avg_pool2d(images, 3).flatten(1)  # (N, 27)
    return {"pool": pool, "logits": 10 * pool @ PROJECTION, "spatial": F.adaptive_avg_pool2d(images, 2).flatten(1)}


def features_of(images):
    return {name: value.double().numpy() for name, value in
            tiny_extractor(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).items()}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(64, 12, 12, 3), dtype=np.uint8)


@pytest.fixture
def samples_npz(images, tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=images, arr_1=np.arange(len(images)) % 10)
    return path


def run_fid(*args, capsys=None):
    report = eval_script.main(["fid", *map(str, args), "--batch-size", "10"], extractor=tiny_extractor)
    return report, (capsys.readouterr().out if capsys else "")


def test_fid_round_trip_on_the_same_images(images, samples_npz, tmp_path, capsys):
    reference, metrics_json = tmp_path / "ref.npz", tmp_path / "metrics.json"
    run_fid("--samples", samples_npz, "--write-ref", reference)
    with np.load(reference) as stored:
        assert sorted(stored.files) == ["arr_0", "inception_resize", "mu", "mu_s", "sigma", "sigma_s"]
        assert stored["inception_resize"] == "tf1"  # the default pipeline, recorded
        np.testing.assert_array_equal(stored["arr_0"], images)
        features = features_of(images)
        np.testing.assert_allclose(stored["mu"], features["pool"].mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(stored["sigma"], np.cov(features["pool"], rowvar=False), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(stored["sigma_s"], np.cov(features["spatial"], rowvar=False), rtol=1e-4, atol=1e-9)
    capsys.readouterr()

    report, out = run_fid("--samples", samples_npz, "--ref", reference, "--out", metrics_json, capsys=capsys)
    assert abs(report["fid"]) < 1e-9 and abs(report["sfid"]) < 1e-9
    assert report["precision"] == 1.0 and report["recall"] == 1.0
    assert report["samples"] == report["reference"] == 64
    assert "samples: 64/64 images" in out and "reference: 64/64 images" in out  # progress lines
    assert [line.split()[0] for line in out.splitlines()[-8:]] == [
        "resize", "samples", "inception_score", "reference", "fid", "sfid", "precision", "recall"]
    saved = json.loads(metrics_json.read_text())
    assert saved["command"] == "fid" and saved["metrics"] == pytest.approx(report)


def test_fid_of_different_images_matches_the_direct_computation(images, samples_npz, tmp_path):
    reference = tmp_path / "ref.npz"
    run_fid("--samples", samples_npz, "--write-ref", reference)
    darker = (images * 0.8).astype(np.uint8)
    np.savez(tmp_path / "darker.npz", arr_0=darker)
    report, _ = run_fid("--samples", tmp_path / "darker.npz", "--ref", reference)
    ours, theirs = features_of(darker), features_of(images)
    expected = frechet_distance(ours["pool"].mean(axis=0), np.cov(ours["pool"], rowvar=False),
                                theirs["pool"].mean(axis=0), np.cov(theirs["pool"], rowvar=False))
    assert expected > 0.01
    assert report["fid"] == pytest.approx(expected, rel=1e-4)
    assert report["precision"] < 1.0


def test_folder_of_images_reads_as_the_npz(images, samples_npz, tmp_path):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    batches = list(ImageSource(folder, "RGB").batches(25))
    assert [len(b) for b in batches] == [25, 25, 14]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    reference = tmp_path / "ref.npz"
    run_fid("--samples", samples_npz, "--write-ref", reference)
    report, _ = run_fid("--samples", folder, "--ref", reference)
    assert abs(report["fid"]) < 1e-9 and report["precision"] == report["recall"] == 1.0


def test_npz_reader_streams_compressed_archives_and_converts_modes(images, tmp_path):
    path = tmp_path / "compressed.npz"
    np.savez_compressed(path, arr_0=images)
    source = ImageSource(path, "L")
    assert len(source) == 64
    gray = np.concatenate(list(source.batches(7)))
    np.testing.assert_array_equal(gray, np.stack([np.asarray(Image.fromarray(i).convert("L")) for i in images]))


def test_reference_with_stored_statistics_only(images, samples_npz, tmp_path):
    stats_only = tmp_path / "stats.npz"
    shifted = features_of(images)["pool"] + 0.05
    np.savez(stats_only, mu=shifted.mean(axis=0), sigma=np.cov(shifted, rowvar=False))
    report, _ = run_fid("--samples", samples_npz, "--ref", stats_only)
    assert report["fid"] == pytest.approx(27 * 0.05 ** 2, rel=1e-4)  # same covariance, mean moved by 0.05 in 27 dims
    assert report["sfid"] is None and report["precision"] is None and report["recall"] is None


def test_control_cli_on_identical_maps(tmp_path):
    rng = np.random.default_rng(1)
    maps = {"edges": (rng.random((3, 192, 192)) * 255).astype(np.uint8),
            "depth": rng.integers(0, 256, (3, 32, 32)).astype(np.uint8),
            "seg": rng.integers(0, 5, (3, 32, 32)).astype(np.uint8)}
    maps["depth"][:, 0, 0], maps["depth"][:, 0, 1] = 0, 255  # 0-255 maps: unchanged by the protocol's scalings
    expected = {"edges": {"ssim": 1.0, "ms_ssim": 1.0}, "depth": {"rmse": 0.0}, "seg": {"miou": 1.0}}
    for task, task_maps in maps.items():
        folder = tmp_path / task
        folder.mkdir()
        for i, image in enumerate(task_maps):
            Image.fromarray(image).save(folder / f"{i}.png")
        np.savez(tmp_path / f"{task}.npz", arr_0=task_maps)
        report = eval_script.main(["control", "--task", task, "--generated", str(folder),
                                "--controls", str(tmp_path / f"{task}.npz"), "--num-classes", "5"])
        assert report == {"images": 3, **{name: pytest.approx(value, abs=1e-12)
                                          for name, value in expected[task].items()}}


def test_resize_follows_the_reference_and_refuses_a_mismatch(images, samples_npz, tmp_path, capsys, monkeypatch):
    """The pipeline a --write-ref reference records is the default; another one is refused; pytorch against an ADM
    batch's stored statistics (no record) is warned about. The FID Inception is built with the chosen pipeline."""
    built = []

    class Inception:  # stands in for FIDInceptionV3(weights, resize=...).to(device)
        def __init__(self, weights, resize):
            built.append(resize)

        def to(self, device):
            return tiny_extractor

    monkeypatch.setattr(eval_script, "FIDInceptionV3", Inception)
    pytorch_ref, adm_ref = tmp_path / "pytorch_ref.npz", tmp_path / "adm_ref.npz"
    eval_script.main(["fid", "--samples", str(samples_npz), "--write-ref", str(pytorch_ref), "--resize", "pytorch"])
    with np.load(pytorch_ref) as stored:
        assert stored["inception_resize"] == "pytorch"
        np.savez(adm_ref, mu=stored["mu"], sigma=stored["sigma"])  # stored statistics, no record: an ADM batch
    assert eval_script.main(["fid", "--samples", str(samples_npz), "--ref", str(pytorch_ref)])["resize"] == "pytorch"
    assert eval_script.main(["fid", "--samples", str(samples_npz), "--ref", str(adm_ref)])["resize"] == "tf1"
    assert eval_script.main(["fid", "--samples", str(samples_npz)])["resize"] == "tf1"
    assert built == ["pytorch", "pytorch", "tf1", "tf1"]
    capsys.readouterr()
    report = eval_script.main(["fid", "--samples", str(samples_npz), "--ref", str(adm_ref), "--resize", "pytorch"])
    assert report["resize"] == "pytorch" and abs(report["fid"]) < 1e-9
    assert "warning: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        eval_script.main(["fid", "--samples", str(samples_npz), "--ref", str(pytorch_ref), "--resize", "tf1"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"error: {pytorch_ref} holds statistics of --resize pytorch; scoring the "
                                       f"samples with --resize tf1 would compare two input pipelines (leave --resize "
                                       f"out to follow the reference)\n")


def test_inception_file_that_is_not_the_weights(samples_npz, tmp_path, capsys):
    """One error line naming the file and what it holds, exit status 2, no download advice (the file exists)."""
    not_weights = tmp_path / "model.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "args": {"lr": 1e-4}}, not_weights)
    with pytest.raises(SystemExit) as stopped:
        eval_script.main(["fid", "--samples", str(samples_npz), "--inception", str(not_weights)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {not_weights} (0.0 MB) holds 2 entries (0 tensors; keys model, args), none of the "
                          f"FID Inception's keys (expected e.g. Conv2d_1a_3x3.conv.weight); --inception expects "
                          f"pt_inception-2015-12-05-6726825d.pth")
    assert err.count("\n") == 1 and "https://" not in err and "weights_only" not in err


def test_cli_runs_as_a_script_and_explains_missing_weights(samples_npz, tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "REF_INCEPTION_WEIGHTS"}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "eval.py", "fid", "--samples", str(samples_npz)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "pt_inception-2015-12-05-6726825d.pth" in result.stderr and "REF_INCEPTION_WEIGHTS" in result.stderr
    assert "https://github.com/mseitzer/pytorch-fid/releases" in result.stderr  # where to get them

    maps = np.random.default_rng(2).integers(0, 5, (2, 16, 16)).astype(np.uint8)
    np.savez(tmp_path / "seg.npz", arr_0=maps)
    result = subprocess.run([sys.executable, "eval.py", "control", "--task", "seg", "--num-classes", "5",
                             "--generated", str(tmp_path / "seg.npz"), "--controls", str(tmp_path / "seg.npz"),
                             "--out", str(tmp_path / "seg.json")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "miou" in result.stdout and json.loads((tmp_path / "seg.json").read_text())["metrics"]["miou"] == 1.0
