"""Bad input to every script, one table (issue 23): each case runs a script's main() in-process on one bad value and
must end with exit status 2, one `error:` line naming the flag or file (no traceback) and every file under the test's
folder as it was (no output folder, no empty samples.npz). Besides: a file that is not a checkpoint is one ValueError
whatever its first bytes; a damaged latest.pt is refused, or replaced by the newest intact snapshot; a checkpoint cut
short plus a garbled snapshot still end in the uninterrupted run, bitwise."""
import gzip
import hashlib
import json
import io
import random
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script  # the script eval.py; named so the builtin eval stays unshadowed
import prepare
import sample
import train
from ref import latents, runtime, text_to_image
from ref.arguments import usable_device
from ref.checkpoints import read_checkpoint
from ref.safetensors import save_file
from ref.sd_checkpoints import save_diffusers
from ref.vae import MODELS as VAE_MODELS
from shapes import guidance_sweep
from tests.helpers import assert_same_state
from toy import run as toy_run

torch.set_num_threads(1)
TINY = ["--config", "shapes-tiny", "--depth", "2", "--hidden-size", "32", "--batch-size", "8", "--lr", "1e-3",
        "--log-every", "1"]
NOT_FINITE = "must be a finite number"
INTERVAL = "must be LOW HIGH with 0 <= LOW <= HIGH <= 1"


def largest_tensor(checkpoint):
    return max(checkpoint["model"].values(), key=lambda tensor: tensor.numel())


def garble(path, count=64):
    """Invert `count` bytes inside the largest model tensor of the checkpoint at `path` (the zip stays readable)."""
    data = bytearray(path.read_bytes())
    start = bytes(data).find(runtime.tensor_bytes(largest_tensor(torch.load(path, weights_only=True))).tobytes())
    assert start > 0
    data[start + 100:start + 100 + count] = bytes(255 - byte for byte in data[start + 100:start + 100 + count])
    path.write_bytes(bytes(data))


def write_images(path, array):
    np.savez(path, arr_0=array, arr_1=np.zeros(len(array), np.int64))
    return path


def write_tiny_sd15(root):
    """A diffusers SD1.5 pipeline folder of the tiny networks (ref.text_to_image), a CLIP vocabulary, one prompt with
    its control image."""
    builds = text_to_image.ARCHITECTURES["tiny"]
    save_diffusers(builds["unet"](), root / "pipeline" / "unet")
    for name, file in (("autoencoder", "vae/diffusion_pytorch_model.safetensors"),
                       ("text_encoder", "text_encoder/model.safetensors")):
        (root / "pipeline" / file).parent.mkdir(parents=True)
        save_file(builds[name]().state_dict(), root / "pipeline" / file)
    with gzip.open(root / "vocab.txt.gz", "wt", encoding="utf-8") as file:
        file.write("#version: 0.2\na </w>\nc a\nca t</w>\n")
    (root / "prompts.txt").write_text("a cat\n")
    (root / "controls").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "controls" / "0.png")
    # an SD1.5 single file cut short: its header promises more bytes than the file holds
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4096)}, root / "whole.safetensors")
    (root / "cut.safetensors").write_bytes((root / "whole.safetensors").read_bytes()[:2000])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Every input the cases need, made once: a trained run, its damaged copy, a file of random bytes after a zip
    header, image arrays of the right and wrong layouts, an image folder and a tiny VAE, the tiny SD1.5 files, and a
    plain file that no output folder can be made under."""
    root = tmp_path_factory.mktemp("bad-input")
    train.main([*TINY, "--steps", "2", "--out", str(root / "run")])
    (root / "damaged").mkdir()
    (root / "damaged" / "latest.pt").write_bytes((root / "run" / "latest.pt").read_bytes())
    garble(root / "damaged" / "latest.pt")
    (root / "pk.pt").write_bytes(b"PK\x03\x04" + random.Random(0).randbytes(4000))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    write_images(root / "images.npz", pixels)
    write_images(root / "nchw.npz", pixels.transpose(0, 3, 1, 2).copy())
    write_images(root / "float.npz", pixels / 255.0)
    (root / "folder" / "cat").mkdir(parents=True)
    Image.fromarray(pixels[0]).save(root / "folder" / "cat" / "0.png")
    save_file(VAE_MODELS["tiny"]().state_dict(), root / "vae.safetensors")
    write_tiny_sd15(root)
    (root / "blocker").write_text("a file, not a folder\n")
    (root / "empty").mkdir()
    (root / "empty.pt").write_bytes(b"")
    return root


def sd15(root, *extra):
    return ["sd15", "--architecture", "tiny", "--sd15", root / "pipeline", "--controlnet", root / "pk.pt",
            "--tokenizer", root / "vocab.txt.gz", "--prompts", root / "prompts.txt", "--controls", root / "controls",
            "--size", "64", "--steps", "2", "--out", root / "out", *extra]


def fid(root, *extra):
    return ["fid", "--samples", root / "images.npz", "--out", root / "metrics.json", *extra]


def prepare_latents(root, *extra):
    return ["latents", "--data-path", root / "folder", "--vae", root / "vae.safetensors", "--vae-kind", "tiny",
            "--image-size", "16", "--out", root / "shards", "--workers", "0", *extra]


def trained(root, *extra):
    return [*TINY, "--steps", "2", "--out", root / "run", *extra]


# (script's main, argv given the fixture folder, what the one error line must say)
CASES = {
    "sample: random bytes after a zip header": (sample.main, lambda r: [r / "pk.pt"], "pk.pt is a zip archive"),
    "sample: --num-samples 0": (sample.main, lambda r: [r / "run", "--num-samples", 0], "--num-samples must be "),
    "sample: --num-samples -3": (sample.main, lambda r: [r / "run", "--num-samples", -3], "--num-samples must be "),
    "sample: --steps 0": (sample.main, lambda r: [r / "run", "--steps", 0], "--steps must be positive, got 0"),
    "sample: --steps -5": (sample.main, lambda r: [r / "run", "--steps", -5], "--steps must be positive"),
    "sample: --batch-size 0": (sample.main, lambda r: [r / "run", "--batch-size", 0], "--batch-size must be "),
    "sample: --batch-size -2": (sample.main, lambda r: [r / "run", "--batch-size", -2], "--batch-size must be "),
    "sample: --ig nan": (sample.main, lambda r: [r / "run", "--ig", "nan"], "--ig " + NOT_FINITE),
    "sample: --cfg inf": (sample.main, lambda r: [r / "run", "--cfg", "inf"], "--cfg " + NOT_FINITE),
    "sample: --cfg-interval 0.7 0.2": (sample.main, lambda r: [r / "run", "--cfg-interval", 0.7, 0.2],
                                       "--cfg-interval " + INTERVAL),
    "sample: --ig-interval 1 0.3": (sample.main, lambda r: [r / "run", "--ig-interval", 1, 0.3],
                                    "--ig-interval " + INTERVAL),
    "sample: --ig-interval -3 7": (sample.main, lambda r: [r / "run", "--ig-interval", -3, 7], "got -3 7"),
    "sample: --ig-interval nan 1": (sample.main, lambda r: [r / "run", "--ig-interval", "nan", 1], INTERVAL),
    "sample: --seed -5": (sample.main, lambda r: [r / "run", "--labels", "random", "--seed", -5], "--seed must be in"),
    "sample: seeds past 2**32": (sample.main, lambda r: [r / "run", "--seed", 2 ** 32 - 2, "--num-samples", 3],
                                 "--seed must be in 0..4294967293"),
    "sample: --out under a file": (sample.main, lambda r: [r / "run", "--out", r / "blocker" / "out"],
                                   "--out " + "{root}/blocker/out: cannot create"),
    "sample: damaged latest.pt": (sample.main, lambda r: [r / "damaged"], "latest.pt is damaged"),
    "sd15: --cfg nan": (sample.main, lambda r: sd15(r, "--cfg", "nan"), "--cfg " + NOT_FINITE),
    "sd15: --control-scale inf": (sample.main, lambda r: sd15(r, "--control-scale", "inf"), "--control-scale "),
    "sd15: --steps 0": (sample.main, lambda r: sd15(r, "--steps", 0), "--steps must be positive"),
    "sd15: --seed -5": (sample.main, lambda r: sd15(r, "--seed", -5), "--seed must be in 0..4294967295"),
    "sd15: SD1.5 file cut short": (sample.main, lambda r: sd15(r, "--sd15", r / "cut.safetensors"),
                                   "truncated: tensor 'model.diffusion_model.conv_in.weight'"),
    "sd15: SD1.5 file cut short, named as one": (sample.main, lambda r: sd15(r, "--sd15", r / "cut.safetensors"),
                                                 "here the weights of an SD1.5 single file (UNet, VAE and text "
                                                 "encoder) were expected"),
    "sd15: missing file": (sample.main, lambda r: sd15(r, "--sd15", r / "absent.safetensors"), "no such file: --sd15"),
    "sd15: vocabulary of the wrong kind": (sample.main, lambda r: sd15(r, "--tokenizer", r / "prompts.txt"),
                                           "expected bpe_simple_vocab_16e6.txt.gz"),
    "sd15: --controlnet of random bytes": (sample.main, sd15, "ControlNet file: {root}/pk.pt is a zip archive"),
    "eval fid: (N, 3, H, W) samples": (eval_script.main, lambda r: fid(r, "--samples", r / "nchw.npz"),
                                       "nchw.npz: arr_0: expected images (N, H, W, 3) uint8"),
    "eval fid: float samples": (eval_script.main, lambda r: fid(r, "--samples", r / "float.npz"), "got (4, 16, 16, 3) "
                                "float64"),
    "eval fid: (N, 3, H, W) --ref": (eval_script.main, lambda r: fid(r, "--ref", r / "nchw.npz"), "nchw.npz: arr_0"),
    "eval fid: --ref a folder": (eval_script.main, lambda r: fid(r, "--ref", r / "folder"),
                                 "--ref {root}/folder: a folder; expected an ADM reference batch"),
    "eval fid: --ref missing": (eval_script.main, lambda r: fid(r, "--ref", r / "ref.npz"),
                                "--ref {root}/ref.npz: no such file; expected an ADM reference batch"),
    "eval fid: --batch-size 0": (eval_script.main, lambda r: fid(r, "--batch-size", 0), "--batch-size must be "),
    "eval fid: --out under a file": (eval_script.main, lambda r: fid(r, "--out", r / "blocker" / "m.json"),
                                     "is a file, not a folder"),
    "eval fid: --samples a missing folder": (eval_script.main, lambda r: fid(r, "--samples", r / "real_images",
                                                                             "--write-ref", r / "my_ref.npz"),
                                             "{root}/real_images: no such file or folder; expected a folder"),
    "eval control: --generated a missing folder": (eval_script.main, lambda r: [
        "control", "--task", "depth", "--generated", r / "depth_of_generated", "--controls", r / "controls"],
        "{root}/depth_of_generated: no such file or folder"),
    "eval control: --controls not an archive": (eval_script.main, lambda r: [
        "control", "--task", "edges", "--generated", r / "controls", "--controls", r / "blocker"],
        "{root}/blocker: not an .npz archive"),
    "eval fd-shapes: float --ref": (eval_script.main, lambda r: ["fd-shapes", "--samples", r / "images.npz", "--ref",
                                                                 r / "float.npz"], "float.npz: arr_0: expected"),
    "eval fd-shapes: (N, 3, H, W) samples": (eval_script.main, lambda r: ["fd-shapes", "--samples", r / "nchw.npz",
                                                                          "--ref-shapes", 4], "nchw.npz: arr_0"),
    "eval fd-shapes: --device cdua": (eval_script.main, lambda r: ["fd-shapes", "--samples", r / "images.npz",
                                                                  "--ref-shapes", 4, "--device", "cdua"],
                                      "--device must be a torch device such as cpu, cuda or cuda:1, got 'cdua'"),
    "eval classifier: --lr nan": (eval_script.main, lambda r: ["train-shapes-classifier", "--lr", "nan",
                                                               "--classifier", r / "c.pt"], "--lr " + NOT_FINITE),
    "eval classifier: --seed -1": (eval_script.main, lambda r: ["train-shapes-classifier", "--seed", -1,
                                                                "--classifier", r / "c.pt"], "--seed must be in"),
    "train: --lr nan": (train.main, lambda r: trained(r, "--lr", "nan"), "--lr " + NOT_FINITE),
    "train: --seed -5": (train.main, lambda r: trained(r, "--seed", -5), "--seed must be in 0..4294967295"),
    "train: --seed 2**32": (train.main, lambda r: trained(r, "--seed", 2 ** 32), "--seed must be in"),
    "train: --out under a file": (train.main, lambda r: trained(r, "--out", r / "blocker" / "run"), "cannot create"),
    "train: --base of random bytes": (train.main, lambda r: ["--config", "shapes-probe", "--base", r / "pk.pt",
                                                             "--out", r / "probe"], "pk.pt is a zip archive"),
    "train: missing image folder": (train.main, lambda r: trained(r, "--data", "images", "--data-path",
                                                                  r / "nowhere"), "does not exist"),
    "train: empty image folder": (train.main, lambda r: trained(r, "--data", "images", "--data-path", r / "empty"),
                                  "is empty"),
    "train: resumed as another model": (train.main, lambda r: trained(r, "--hidden-size", 64),
                                        "hidden_size: stored 32, given 64"),
    "train: an empty file as --base": (train.main, lambda r: ["--config", "shapes-probe", "--base", r / "empty.pt",
                                                              "--out", r / "probe"], "empty.pt is empty"),
    "train: damaged latest.pt, no snapshot": (train.main, lambda r: trained(r, "--out", r / "damaged", "--steps", 4),
                                              "latest.pt is damaged: "),
    "prepare: --batch-size 0": (prepare.main, lambda r: prepare_latents(r, "--batch-size", 0), "--batch-size must "),
    "prepare: --seed -1": (prepare.main, lambda r: prepare_latents(r, "--seed", -1), "--seed must be in"),
    "prepare: --vae of random bytes": (prepare.main, lambda r: prepare_latents(r, "--vae", r / "pk.pt"), "pk.pt is a "
                                       "zip archive"),
    "prepare: empty folder": (prepare.main, lambda r: prepare_latents(r, "--data-path", r / "empty"), "empty"),
    "prepare: --out under a file": (prepare.main, lambda r: prepare_latents(r, "--out", r / "blocker" / "shards"),
                                    "cannot create"),
    "toy: --seeds 0": (toy_run.main, lambda r: ["--seeds", 0, "--out", r / "toy"], "expected --seeds >= 1"),
    "toy: --out under a file": (toy_run.main, lambda r: ["--out", r / "blocker" / "toy"], "cannot create"),
    "guidance sweep: --num-samples 0": (guidance_sweep.main, lambda r: [r / "run", "--classifier", r / "c.pt",
                                                                        "--num-samples", 0], "--num-samples must be"),
    "guidance sweep: --ig nan": (guidance_sweep.main, lambda r: [r / "run", "--classifier", r / "c.pt", "--ig",
                                                                 "1.5,nan"], "--ig " + NOT_FINITE),
}


def tree(folder):
    """Every path under `folder` with the digest of its bytes (None for a folder)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_error_line_and_writes_nothing(case, root, capsys, monkeypatch):
    monkeypatch.chdir(root)  # a default output folder would land here, and be seen
    main, argv, expected = CASES[case]
    before = tree(root)
    with pytest.raises(SystemExit) as exit_info:
        main([str(value) for value in argv(root)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    assert error.startswith("error: ") and error.count("\n") == 1 and "Traceback" not in error, error
    assert expected.format(root=root) in error, error
    assert tree(root) == before


def test_cuda_without_a_cuda_device_is_one_error_line(root, capsys, monkeypatch):
    """--device cuda where torch sees no CUDA device (forced here, so the check holds on a GPU machine too): eval.py
    ends with the error line (the benchmarks use the same check), not torch's AssertionError from the first .to()."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["fd-shapes", "--samples", str(root / "images.npz"), "--ref-shapes", "4", "--device", "cuda"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert error == "error: --device cuda: this torch sees no CUDA device (a CPU build, or no GPU on this machine); " \
                    "use --device cpu\n"
    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device cuda:0: this torch sees no CUDA device"):
        usable_device("cuda:0")


@pytest.mark.parametrize("seed", range(12))
def test_a_file_that_is_not_a_checkpoint_is_one_value_error_whatever_its_bytes(seed, root, tmp_path, recwarn):
    """Random bytes after each magic the reader looks at, a real checkpoint with its pickle cut and overwritten, or
    64 bytes of it overwritten anywhere, or cut short: always the one ValueError naming the file (and no warning from
    torch.load beside it)."""
    generator = random.Random(seed)
    whole = (root / "run" / "latest.pt").read_bytes()
    with zipfile.ZipFile(io.BytesIO(whole)) as archive:
        pickle_name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
        members = {name: archive.read(name) for name in archive.namelist()}
    members[pickle_name] = members[pickle_name][:generator.randrange(len(members[pickle_name]))] + generator.randbytes(
        generator.randrange(1, 64))
    rewritten = io.BytesIO()
    with zipfile.ZipFile(rewritten, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    position = generator.randrange(len(whole) - 64)
    contents = [b"PK\x03\x04" + generator.randbytes(generator.randrange(1, 5000)),
                b"\x80" + generator.randbytes(generator.randrange(1, 5000)), generator.randbytes(100),
                rewritten.getvalue(), whole[:position] + generator.randbytes(64) + whole[position + 64:],
                whole[:generator.randrange(len(whole))]]
    for index, data in enumerate(contents):
        path = tmp_path / f"file{index}.pt"
        path.write_bytes(data)
        recwarn.clear()
        try:
            runtime.read_run_checkpoint(path)
        except ValueError as error:
            assert str(error).startswith(str(path)) and "\n" not in str(error) and not recwarn.list


def test_a_damaged_latest_checkpoint_resumes_from_the_newest_intact_snapshot_bitwise(root, tmp_path, capsys):
    """As if killed while latest.pt was written in place (cut short) after the last good snapshot was garbled: the
    rerun says so and resumes from the older snapshot, and ends with the uninterrupted run's weights and snapshots."""
    flags = [*TINY, "--steps", "6", "--checkpoint-every", "2", "--snapshot-every", "16"]  # snapshots at steps 2, 4, 6
    train.main([*flags, "--out", str(tmp_path / "whole")])
    train.main([*flags, "--out", str(tmp_path / "cut"), "--stop-after", "5"])
    latest, snapshot = tmp_path / "cut" / "latest.pt", tmp_path / "cut" / "snapshot-000000032.pt"
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])
    garble(snapshot)
    capsys.readouterr()
    train.main([*flags, "--out", str(tmp_path / "cut")])
    warnings = capsys.readouterr().err.splitlines()
    assert warnings[0].startswith(f"warning: {snapshot} is damaged: ") and "model/" in warnings[0]
    assert warnings[1].startswith(f"warning: {latest} is a zip archive that torch.load cannot read")
    assert warnings[1].endswith(f"resuming from {tmp_path / 'cut' / 'snapshot-000000016.pt'} (step 2), the newest "
                                f"intact snapshot")
    for name in ("latest.pt", "snapshot-000000032.pt", "snapshot-000000048.pt"):
        resumed, whole = (read_checkpoint(tmp_path / run / name) for run in ("cut", "whole"))
        for part in ("model", "ema", "opt", "step"):
            assert_same_state(resumed[part], whole[part])


def test_digests_name_the_damaged_tensor(root):
    checkpoint = read_checkpoint(root / "damaged" / "latest.pt")
    name = next(key for key, tensor in checkpoint["model"].items() if tensor is largest_tensor(checkpoint))
    with pytest.raises(ValueError, match=f"1 of its .* differ from the digests written with them \\(first: "
                                         f"model/{name}\\)"):
        runtime.verify_digests(checkpoint, "latest.pt")


def test_a_damaged_shard_is_refused_when_training_opens_it(root, tmp_path):
    """prepare.py records the CRC-32 of every file in prepare.json; a shard garbled afterwards is named when the
    shards are opened for training, before a step is taken."""
    prepare.main([str(value) for value in prepare_latents(root, "--out", tmp_path / "shards")])
    digests = json.loads((tmp_path / "shards" / "prepare.json").read_text())["digests"]
    assert sorted(digests) == ["labels_00000.npy", "latents_00000.npy"]
    latents.TrainingLatents(tmp_path / "shards", "tiny", (4, 4, 4))  # intact: opens
    shard = tmp_path / "shards" / "latents_00000.npy"
    data = bytearray(shard.read_bytes())
    data[-8:] = bytes(255 - byte for byte in data[-8:])
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard} is missing or damaged: its bytes differ from the digest in "):
        latents.TrainingLatents(tmp_path / "shards", "tiny", (4, 4, 4))


def test_a_rerun_encodes_a_damaged_staged_shard_again(root, tmp_path, capsys):
    (tmp_path / "images" / "cat").mkdir(parents=True)
    for index in range(2):
        (tmp_path / "images" / "cat" / f"{index}.png").write_bytes((root / "folder" / "cat" / "0.png").read_bytes())
    flags = [str(value) for value in prepare_latents(root, "--data-path", tmp_path / "images", "--shard-size", 1)]
    prepare.main([*flags, "--out", str(tmp_path / "whole")])
    prepare.main([*flags, "--out", str(tmp_path / "cut"), "--stop-after-shards", "1"])
    staged = tmp_path / "cut.partial" / "latents_00000.npy"
    staged.write_bytes(staged.read_bytes()[:-8] + bytes(8))
    capsys.readouterr()
    prepare.main([*flags, "--out", str(tmp_path / "cut")])
    assert f"warning: shard 0 in {tmp_path / 'cut.partial'} is damaged (latents_00000.npy" in capsys.readouterr().err
    assert tree(tmp_path / "cut") == tree(tmp_path / "whole")
