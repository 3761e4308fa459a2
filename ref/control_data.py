"""Training data of a ControlNet at SD scale: (image, control, caption) triples listed in a folder's `metadata.jsonl`.

    folder/metadata.jsonl   one JSON object a line: {"image": path, "control": path, "caption": text}, paths relative
                            to the folder; a segmentation line also names "hint": the colour-coded map the ControlNet
                            reads (ControlNet's ADE20K hints), while "control" is the label map the reward and the
                            alignment compare against.
Controls by task (the kind of file each expects):
    depth, hed, lineart   a grey map (8-bit or 16-bit grey, or RGB with three equal channels) -> (1, S, S) in [0, 1];
                          the ControlNet's hint is the same map on three channels (ControlNet's grey hints)
    segmentation          a label map (8-bit grey or palette indices: class k = value k, 255 = no class) -> (S, S) long
Every file of a sample is cut the same way (`resize`): "crop", the short side resized to S (512 in the paper), then the
central S x S square; or "square", the whole file squashed to S x S whatever its aspect, as the InnerControl release
does (`train/reward_control_aligned.py`:1184-1205: Resize((resolution, resolution)), the CenterCrop commented out;
its evaluation too, `eval/eval.py`:172-188). Either way the image bicubic, a grey map bilinear, a label map and its
hint nearest (no invented classes). The image ends in [-1, 1] (the VAE's input), hint and control in pixel space.

Bad input raises one ValueError naming metadata.jsonl's line and what was expected: a line that is not JSON or lacks a
key, a caption that is not text, a path to no file; at loading, a control of the wrong kind (RGB where a label map is
expected), files of different sizes. No dataset holds random state: caption dropout for CFG is drawn in the training
step from each sample's generator (ref.losses.drop_captions).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ref.data import check_index, read_image

METADATA = "metadata.jsonl"
MAP_TASKS = ("depth", "hed", "lineart")
LABEL_TASKS = ("segmentation",)
CONTROL_TASKS = MAP_TASKS + LABEL_TASKS
RESIZE_MODES = ("crop", "square")
GREY_MODES = ("L", "I;16", "I")  # 8-bit, 16-bit and 32-bit grey maps
LABEL_MODES = ("L", "P")  # class indices as 8-bit grey or as a palette image's indices


@dataclass(frozen=True)
class Entry:
    """One line of metadata.jsonl: absolute paths, the caption, and where it came from (for errors)."""
    line: int
    image: Path
    control: Path
    hint: Path  # None for a map control (its hint is the map itself)
    caption: str


def read_metadata(folder, task):
    """metadata.jsonl of `folder` -> [Entry], every line checked: JSON object, the keys the task needs, a caption of
    text, existing files. Raises ValueError naming the first bad line and what was expected."""
    folder = Path(folder)
    path = folder / METADATA
    if not path.is_file():
        raise ValueError(f"{folder} holds no {METADATA} (one line per sample: {{\"image\": path, \"control\": path, "
                         f"\"caption\": text}})")
    keys = ("image", "control", "caption") + (("hint",) if task in LABEL_TASKS else ())
    entries = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON ({error.msg}); expected an object with keys {', '.join(keys)}")
        if not isinstance(record, dict):
            raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object with keys {', '.join(keys)}")
        missing = [key for key in keys if key not in record]
        if missing:
            why = " (a segmentation line names the colour-coded hint the ControlNet reads)" if "hint" in missing else ""
            raise ValueError(f"{where} has no {', no '.join(missing)}; expected the keys {', '.join(keys)}{why}")
        if not isinstance(record["caption"], str):
            raise ValueError(f"{where}: the caption must be text, got {json.dumps(record['caption'])}")
        files = {}
        for key in keys[:2] + keys[3:]:
            files[key] = folder / str(record[key])
            if not files[key].is_file():
                raise ValueError(f"{where}: {key} {record[key]!r} is no file in {folder}")
        entries.append(Entry(number, files["image"], files["control"], files.get("hint"), record["caption"]))
    if not entries:
        raise ValueError(f"{path} lists no samples")
    return entries


def crop_box(width, height, size):
    """The resize and cut of one sample: the short side to `size`, then the central size x size square. -> (scaled
    (w, h), box (left, top, right, bottom)) in the scaled image."""
    scale = size / min(width, height)
    scaled = (max(size, round(width * scale)), max(size, round(height * scale)))
    left, top = (scaled[0] - size) // 2, (scaled[1] - size) // 2
    return scaled, (left, top, left + size, top + size)


def cut(image, size, resample, resize):
    """One file at size x size: "crop" (crop_box) or "square" (squashed whole)."""
    if resize == "square":
        return image.resize((size, size), resample=resample)
    scaled, box = crop_box(*image.size, size)
    return image.resize(scaled, resample=resample).crop(box)


def grey_map(image):
    """A grey control map as float32 (H, W) in [0, 1], or None when the file holds a colour image."""
    if image.mode in ("RGB", "RGBA"):
        pixels = np.asarray(image.convert("RGB"))
        if not (pixels == pixels[..., :1]).all():
            return None
        return pixels[..., 0].astype(np.float32) / 255
    if image.mode not in GREY_MODES:
        return None
    peak = 255 if image.mode == "L" else 65535  # 16-bit depth maps (also read as mode I)
    return np.asarray(image, dtype=np.float32) / peak


class ControlDataset(torch.utils.data.Dataset):
    """(image (3, S, S) in [-1, 1], hint (3, S, S) in [0, 1], control, caption) per metadata.jsonl line; control
    (1, S, S) float in [0, 1] for a map task, (S, S) int64 class indices (255: no class) for segmentation."""

    def __init__(self, folder, task, size=512, resize="crop"):
        if task not in CONTROL_TASKS:
            raise ValueError(f"unknown control task {task!r}; choose one of {', '.join(CONTROL_TASKS)}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown --resize {resize!r}; choose one of {', '.join(RESIZE_MODES)}")
        self.task, self.size, self.resize = task, size, resize
        self.entries = read_metadata(folder, task)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        check_index(index, len(self))
        entry = self.entries[index]
        where = f"{METADATA} line {entry.line}"
        image = read_image(entry.image)
        control = read_image(entry.control, mode=None)
        if control.size != image.size:
            raise ValueError(f"{where}: control {entry.control} is {control.size[0]}x{control.size[1]}, the image "
                             f"{image.size[0]}x{image.size[1]}; expected the same size")
        image = np.asarray(cut(image, self.size, Image.BICUBIC, self.resize), dtype=np.float32)  # (S, S, 3)
        image = torch.from_numpy(image).permute(2, 0, 1) / 127.5 - 1  # (3, S, S) in [-1, 1]
        if self.task in LABEL_TASKS:
            if control.mode not in LABEL_MODES:
                raise ValueError(f"{where}: control {entry.control} is a {control.mode} image; expected a label map "
                                 f"(8-bit grey or palette indices, 255 = no class)")
            labels = np.asarray(cut(control, self.size, Image.NEAREST, self.resize), dtype=np.int64)  # (S, S)
            hint = read_image(entry.hint)
            if hint.size != control.size:
                raise ValueError(f"{where}: hint {entry.hint} is {hint.size[0]}x{hint.size[1]}, the control "
                                 f"{control.size[0]}x{control.size[1]}; expected the same size")
            hint = np.asarray(cut(hint, self.size, Image.NEAREST, self.resize), dtype=np.float32) / 255
            hint = torch.from_numpy(hint).permute(2, 0, 1)  # (3, S, S)
            return image, hint, torch.from_numpy(labels), entry.caption
        grey = grey_map(control)
        if grey is None:
            raise ValueError(f"{where}: control {entry.control} is a {control.mode} image with colour; expected a grey "
                             f"{self.task} map (8- or 16-bit grey, or RGB with three equal channels)")
        grey = Image.fromarray(grey)  # mode F
        control = torch.from_numpy(np.array(cut(grey, self.size, Image.BILINEAR, self.resize)))[None].clamp(0, 1)
        return image, control.expand(3, -1, -1).clone(), control, entry.caption  # (3, S, S), (1, S, S)


def collate_controls(samples, tokenizer):
    """Samples -> images (B, 3, S, S), hints (B, 3, S, S), controls, caption tokens (B, 77)."""
    images, hints, controls, captions = zip(*samples)
    return torch.stack(images), torch.stack(hints), torch.stack(controls), tokenizer(list(captions))
