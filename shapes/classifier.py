"""FD-shapes: the domain metric of the procedural Shapes data (ref/data.py), on the features of a small CNN trained to
name the class of a scene's front object.

FD-shapes is FID's recipe with a network that knows this domain: the Frechet distance between Gaussians fitted to the
classifier's penultimate features (the global average pool of its last convolution, 128-d) of generated and of true
images; precision/recall (k = 3) use the same features. Its numbers compare only with FD-shapes numbers from the same
classifier file, never with FID.

The classifier stands where the FID Inception stands in ref/metrics.py: it takes RGB (N, 3, H, W) in [0, 1] of any size
(resized to the size it was trained at, as the Inception resizes to 299) and returns {"pool": features, "logits"}, so
`summarise_images` reads sample sets for both metrics; `ShapesImages` renders true scenes as uint8 batches with the
interface of `ImageSource`, the reference made on the fly.

The classifier trains on seed TRAIN_SEED and is tested on TEST_SEED, away from the seed 0 that generative models train
on by default; its images are quantised to uint8 first, as generated samples are when saved.
"""
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ref.checkpoints import read_checkpoint
from ref.data import batch_indices, to_uint8
from ref.metrics import frechet_distance, precision_recall
from shapes.data import MAX_OBJECTS, SHAPE_CLASSES, Shapes

TRAIN_SEED, TEST_SEED = 1000, 1001  # Shapes seeds of the classifier's training and test scenes
TRAIN_ITEMS = 1_000_000  # the training stream: far more scenes than a training run reads, so none repeats


class ShapesClassifierError(ValueError):
    """The classifier file is missing, unreadable or not a shapes classifier of this layout."""


# ---------------------------------------------------------------------------------------------------------------------
# True scenes as uint8 images, the form samples take on disk
# ---------------------------------------------------------------------------------------------------------------------

def render(dataset, indices):
    """Scenes `indices` of a Shapes dataset -> (images (B, H, W, 3) uint8, front-object labels (B,) int64)."""
    scenes = [dataset[int(index)] for index in indices]
    images = to_uint8(torch.stack([scene.image for scene in scenes]))
    return images, torch.tensor([scene.label for scene in scenes])


def to_unit_range(images):
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1], the extractor input of ref/metrics.py."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


class ShapesImages:
    """The first `count` scenes of Shapes(size, seed, max_objects) as uint8 images, read in batches like an
    ImageSource."""

    def __init__(self, count, size=32, seed=0, max_objects=MAX_OBJECTS):
        self.dataset = Shapes(size, num_items=count, seed=seed, max_objects=max_objects)

    def __len__(self):
        return len(self.dataset)

    def batches(self, batch_size):
        """Yield (B, H, W, 3) uint8 arrays in index order."""
        for start in range(0, len(self), batch_size):
            yield render(self.dataset, range(start, min(start + batch_size, len(self))))[0]


# ---------------------------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------------------------

class ShapesClassifier(nn.Module):
    """Conv 3x3 -> BatchNorm -> ReLU stages, widths (16, 32, 64, 128), a 2x2 max pool between stages; the global
    average of the last stage is the feature vector, a linear layer the class logits. Global pooling makes it run at
    any size; inputs of another size than `image_size` are resized to it first (bilinear, antialiased)."""

    def __init__(self, image_size=32, widths=(16, 32, 64, 128), num_classes=len(SHAPE_CLASSES)):
        super().__init__()
        self.config = {"image_size": image_size, "widths": list(widths), "num_classes": num_classes}
        self.image_size = image_size
        layers, channels = [], 3
        for stage, width in enumerate(widths):
            if stage:
                layers.append(nn.MaxPool2d(2))
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.stages = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, images):
        """RGB (N, 3, H, W) in [0, 1] -> {"pool": (N, widths[-1]) features, "logits": (N, num_classes)}."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        x = self.stages(2 * images - 1)  # (N, widths[-1], S / 2^(stages - 1), same)
        pool = x.mean(dim=(2, 3))  # (N, widths[-1])
        return {"pool": pool, "logits": self.classifier(pool)}


def train_classifier(image_size=32, steps=2000, batch_size=64, lr=3e-3, seed=0, on_step=None):
    """Train a ShapesClassifier on the front-object class with cross-entropy: AdamW (weight decay 1e-4), one-cycle
    learning rate (15% warm-up to `lr`, cosine down), batches of scenes from the TRAIN_SEED stream in the order
    `batch_indices` gives for `seed`. Deterministic: the same arguments (and thread count) give the same weights.
    on_step(step, loss) is called after each step. Returns the model in eval mode."""
    with torch.random.fork_rng():  # the initial weights come from `seed`, without touching the caller's generator
        torch.manual_seed(seed)
        model = ShapesClassifier(image_size)
    dataset = Shapes(image_size, num_items=TRAIN_ITEMS, seed=TRAIN_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(steps):
        images, labels = render(dataset, batch_indices(step, batch_size, 0, 1, seed, TRAIN_ITEMS))
        loss = F.cross_entropy(model(to_unit_range(images))["logits"], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step:
            on_step(step, loss.item())
    return model.eval()


@torch.inference_mode()
def held_out_accuracy(model, count=2000, size=None, batch_size=250):
    """Fraction of the first `count` TEST_SEED scenes (at `size`, default the model's) whose class the model names."""
    dataset = Shapes(size or model.image_size, num_items=count, seed=TEST_SEED)
    correct = 0
    for start in range(0, count, batch_size):
        images, labels = render(dataset, range(start, min(start + batch_size, count)))
        correct += int((model(to_unit_range(images))["logits"].argmax(dim=1) == labels).sum())
    return correct / count


# ---------------------------------------------------------------------------------------------------------------------
# The classifier file
# ---------------------------------------------------------------------------------------------------------------------

def save_classifier(model, path, **metadata):
    """Write {"config", "state_dict", "metadata"} to `path` (a temporary file renamed into place, so an interrupted
    write never leaves a half-written classifier)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"config": model.config, "state_dict": model.state_dict(), "metadata": metadata}, partial)
    os.replace(partial, path)


def load_classifier(path):
    """A classifier written by `save_classifier`, in eval mode. Raises ShapesClassifierError, saying how to train one,
    for a missing file, a file torch cannot read, or weights of another layout."""
    train_hint = f"train one with: python eval.py train-shapes-classifier --classifier {path}"
    if not os.path.isfile(path):
        raise ShapesClassifierError(f"shapes classifier {path}: no such file; {train_hint}")
    try:
        saved = read_checkpoint(path)
    except ValueError as error:
        raise ShapesClassifierError(f"shapes classifier {path}: cannot read it ({error}); {train_hint}") from None
    if not isinstance(saved, dict) or not {"config", "state_dict"} <= saved.keys():
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise ShapesClassifierError(f"shapes classifier {path}: not a shapes classifier file (expected keys config, "
                                    f"state_dict; found {found}); {train_hint}")
    model = ShapesClassifier(**saved["config"])
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as error:
        raise ShapesClassifierError(f"shapes classifier {path}: weights do not fit its config "
                                    f"{saved['config']}: {error}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------------
# FD-shapes
# ---------------------------------------------------------------------------------------------------------------------

def fd_shapes_report(samples, reference, sample_labels=None):
    """FD-shapes and precision/recall (k = 3) of two FeatureSummary's of the classifier's features; with the labels
    the samples were generated for, label_accuracy: the fraction the classifier names as that class, and
    label_accuracy_<class>: the same among the samples of each class (None for a class with no sample)."""
    precision, recall = precision_recall(reference.pool, samples.pool)
    report = {"samples": samples.count, "reference": reference.count,
              "fd_shapes": frechet_distance(*samples.pool_moments, *reference.pool_moments),
              "precision": precision, "recall": recall}
    if sample_labels is not None:
        if len(sample_labels) != samples.count:
            raise ValueError(f"{len(sample_labels)} labels for {samples.count} samples")
        labels = np.asarray(sample_labels)
        named_right = samples.logits.argmax(axis=1) == labels  # (N,) bool
        report["label_accuracy"] = float(named_right.mean())
        for index, name in enumerate(SHAPE_CLASSES):
            of_class = labels == index
            report[f"label_accuracy_{name}"] = float(named_right[of_class].mean()) if of_class.any() else None
    return report
