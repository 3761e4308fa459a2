"""Issue 12's chain end to end on the CPU, each stage through its script: an image folder -> `prepare.py latents`
(a tiny VAE, posterior samples and their statistics: the LightningDiT recipe) -> `train.py` (a tiny LightningDiT with
the IG head) -> `sample.py` with IG, decoded through the VAE into PNGs -> `eval.py fid` against the real images, with
an FID Inception of random weights written here. What could fail: any stage's outputs not fitting the next one's
inputs, the decoded images differing from the sampled latents decoded by hand, a non-finite or negative FID."""
import json

import numpy as np
import torch
from PIL import Image

import eval as eval_script
import prepare
import sample
import train
from ref.data import to_uint8
from ref.inception import FIDInceptionV3
from ref.latents import STATS_FILE, read_vae
from ref.vae import MODELS as VAES

torch.set_num_threads(1)


def write_image_folder(root, flat, rng):
    """2 classes x 4 images of 32 px in root/<class>/ (the training data) and all 8 in `flat` (eval.py's reference
    folder): a bright or a dark square on noise, so the classes differ."""
    flat.mkdir()
    for label in range(2):
        (root / f"class{label}").mkdir(parents=True)
        for index in range(4):
            pixels = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8)
            pixels[8:24, 8:24] = 230 if label else 20
            Image.fromarray(pixels).save(root / f"class{label}" / f"{index}.png")
            Image.fromarray(pixels).save(flat / f"{label}-{index}.png")


def test_image_folder_to_fid_through_the_scripts(tmp_path, capsys):
    write_image_folder(tmp_path / "images", tmp_path / "real", np.random.default_rng(0))
    torch.manual_seed(0)
    torch.save(VAES["tiny"]().state_dict(), tmp_path / "vae.pt")
    torch.save(FIDInceptionV3(random_weights=True).state_dict(), tmp_path / "inception.pt")  # the public layout

    prepare.main(["latents", "--data-path", str(tmp_path / "images"), "--vae", str(tmp_path / "vae.pt"),
                  "--vae-kind", "tiny", "--image-size", "32", "--store", "sample", "--out", str(tmp_path / "shards"),
                  "--batch-size", "4", "--workers", "0"])
    assert (tmp_path / "shards" / STATS_FILE).is_file()

    train.main(["--config", "lightningdit-xl1-imagenet", "--vae", "tiny", "--image-size", "32", "--num-classes", "2",
                "--depth", "2", "--hidden-size", "32", "--num-heads", "4", "--intermediate-block", "1",
                "--batch-size", "4", "--steps", "3", "--log-every", "1", "--workers", "0",
                "--data-path", str(tmp_path / "shards"), "--out", str(tmp_path / "run")])

    common = [str(tmp_path / "run"), "--num-samples", "4", "--batch-size", "2", "--sampler", "heun", "--steps", "3",
              "--ig", "1.5"]
    sample.main([*common, "--out", str(tmp_path / "latents")])
    sample.main([*common, "--vae", str(tmp_path / "vae.pt"), "--png", "--out", str(tmp_path / "samples")])
    with np.load(tmp_path / "samples" / "samples.npz") as stored:
        images, labels = stored["arr_0"], stored["arr_1"]
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8 and labels.tolist() == [0, 1, 0, 1]
    vae = read_vae(tmp_path / "vae.pt", "tiny")
    latents = torch.from_numpy(np.load(tmp_path / "latents" / "latents.npy"))  # denormalised: the decoder's input
    assert latents.shape == (4, 4, 8, 8)
    by_hand = to_uint8(vae.decode(latents))
    assert np.abs(by_hand.astype(int) - images).max() <= 1  # float rounding may move a pixel by one level
    pngs = sorted((tmp_path / "samples" / "images").glob("*.png"))
    assert len(pngs) == 4 and all(np.array_equal(np.asarray(Image.open(path)), image)
                                  for path, image in zip(pngs, images))

    inception = ["--inception", str(tmp_path / "inception.pt"), "--batch-size", "4"]
    eval_script.main(["fid", "--samples", str(tmp_path / "real"), "--write-ref", str(tmp_path / "ref.npz"),
                      *inception])
    eval_script.main(["fid", "--samples", str(tmp_path / "samples" / "images"), "--ref", str(tmp_path / "ref.npz"),
                      "--out", str(tmp_path / "fid.json"), *inception])
    metrics = json.loads((tmp_path / "fid.json").read_text())["metrics"]
    assert metrics["samples"] == 4 and metrics["reference"] == 8
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > -1e-6  # random features: the value means nothing
