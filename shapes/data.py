"""The CPU testbed's data: procedural scenes of flat shapes on a ground plane with their exact controls.

`Shapes`: `ShapesSample(image, label, caption, depth, segmentation, edges)`, rendered from (seed, index) alone, so no
dataset holds random state and a scene is the same at any resolution and in any order of reads.
"""
import math
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from ref.data import check_index

SHAPE_CLASSES = ("circle", "square", "triangle", "ring", "cross")
COLORS = {  # RGB in [0, 1], each with a largest channel of 1, so a surface's brightest channel is its shade
    "red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.2), "blue": (0.25, 0.4, 1.0),
    "yellow": (1.0, 0.9, 0.1), "magenta": (1.0, 0.2, 0.9), "cyan": (0.1, 0.9, 1.0),
}
CAPTION_VOCABULARY = ("a", "and", *COLORS, *SHAPE_CLASSES)  # captions split on whitespace into these words
MAX_OBJECTS = 3
OBJECT_DEPTH_RANGE = (0.35, 1.0)  # objects lie in front of the whole ground plane, whose depth is in [0, 0.3]
OBJECT_DEPTH_GAP = 0.15  # least depth difference between two objects of a scene
GROUND_DEPTH_RANGE = (0.0, 0.3)  # top row (far) .. bottom row (near)
GROUND_COLOR = (0.55, 0.55, 0.55)


def shade(depth):
    """Brightness of a surface at `depth` (1 = nearest): nearer is brighter. The colour drawn is COLOR * shade."""
    return 0.3 + 0.7 * depth


def _box(u, v, half_width, half_height):
    return np.maximum(np.abs(u) - half_width, np.abs(v) - half_height)


_TRIANGLE_NORMALS = [(math.cos(a), math.sin(a)) for a in math.pi / 2 + 2 * math.pi / 3 * np.arange(3)]

# Signed distance (negative inside) of each shape of radius r, in its own frame (u, v); every shape fits in the disc r.
SHAPE_DISTANCES = {
    "circle": lambda u, v, r: np.hypot(u, v) - r,
    "square": lambda u, v, r: _box(u, v, 0.7 * r, 0.7 * r),
    "triangle": lambda u, v, r: np.maximum.reduce([nu * u + nv * v for nu, nv in _TRIANGLE_NORMALS]) - r / 2,
    "ring": lambda u, v, r: np.abs(np.hypot(u, v) - 0.75 * r) - 0.25 * r,
    "cross": lambda u, v, r: np.minimum(_box(u, v, 0.9 * r, 0.3 * r), _box(u, v, 0.3 * r, 0.9 * r)),
}


def occluding_contours(segmentation, depth):
    """Edges: the pixels of a segment that have a 4-neighbour in another segment farther away, i.e. each visible
    object's outline against the background and against what it occludes, one pixel wide, on the nearer side.
    (H, W) long, (H, W) float -> (H, W) bool."""
    edges = np.zeros(segmentation.shape, dtype=bool)
    for segments, depths, outline in ((segmentation, depth, edges), (segmentation.T, depth.T, edges.T)):  # down, right
        boundary = segments[:-1] != segments[1:]  # neighbours in different segments
        upper_nearer = depths[:-1] > depths[1:]
        outline[:-1] |= boundary & upper_nearer
        outline[1:] |= boundary & ~upper_nearer
    return edges


class ShapesSample(NamedTuple):
    image: torch.Tensor  # (3, H, W) float32 in [-1, 1]
    label: int  # class of the front object, an index into SHAPE_CLASSES
    caption: str  # e.g. "a red circle and a blue square", front object first
    depth: torch.Tensor  # (1, H, W) float32 in [0, 1], 1 = nearest
    segmentation: torch.Tensor  # (H, W) int64: 0 background, 1 + class of the visible object
    edges: torch.Tensor  # (1, H, W) float32 in {0, 1}: occluding contours


class Shapes(Dataset):
    """1 to max_objects (at most MAX_OBJECTS) flat shapes of distinct classes on a ground plane, rendered from a
    generator seeded by (seed, index) alone: the same (seed, index) gives the same scene at any resolution, and nothing
    depends on the order of reads. `num_items` only sets the epoch length.

    Depth (1 = nearest, like the disparity maps ControlNet is trained with) is visible in three ways: objects are drawn
    back to front, so nearer ones occlude farther ones; every surface is shaded by its depth (`shade`, nearer is
    brighter); and an object's radius grows with its depth. The ground plane recedes from the bottom row (depth 0.3)
    to the top row (0) and lies behind every object. Objects sit wholly inside the frame, so the front one is never
    hidden; the label is its class, and the caption names it first. Image edges are anti-aliased from the signed
    distance; the controls are exact at the pixel centres, where a pixel belongs to a shape iff its coverage > 1/2.
    max_objects 1 gives one object on the ground plane, the easiest class-conditional task; below MAX_OBJECTS the
    scenes are another draw than the default ones of the same (seed, index)."""

    def __init__(self, size=32, num_items=50_000, seed=0, max_objects=MAX_OBJECTS):
        if not 1 <= max_objects <= MAX_OBJECTS:
            raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
        self.size, self.num_items, self.seed, self.max_objects = size, num_items, seed, max_objects
        centres = (np.arange(size) + 0.5) / size  # pixel centres in units of the image side
        self.xs, self.ys = centres[None, :], centres[:, None]  # (1, W), (H, 1)

    def __len__(self):
        return self.num_items

    def scene(self, index):
        """The random draws of scene `index`, objects ordered far to near: classes, colour names, depths, radii,
        centres (n, 2) as (x, y), angles; all lengths in units of the image side."""
        rng = np.random.default_rng([self.seed, index])
        count = int(rng.integers(1, self.max_objects + 1))
        classes = rng.permutation(len(SHAPE_CLASSES))[:count]
        colors = [list(COLORS)[i] for i in rng.integers(0, len(COLORS), count)]
        low, high = OBJECT_DEPTH_RANGE  # sorted draws spread by the gap: increasing, OBJECT_DEPTH_GAP apart at least
        depths = low + np.sort(rng.uniform(0, high - low - (count - 1) * OBJECT_DEPTH_GAP, count))
        depths += OBJECT_DEPTH_GAP * np.arange(count)
        radii = (0.1 + 0.16 * depths) * rng.uniform(0.85, 1.15, count)
        centres = radii[:, None] + (1 - 2 * radii[:, None]) * rng.uniform(0, 1, (count, 2))
        angles = rng.uniform(0, 2 * math.pi, count)
        return classes, colors, depths, radii, centres, angles

    def __getitem__(self, index):
        check_index(index, len(self))
        classes, colors, depths, radii, centres, angles = self.scene(index)
        ground_low, ground_high = GROUND_DEPTH_RANGE
        depth = np.broadcast_to(ground_low + (ground_high - ground_low) * self.ys, (self.size, self.size)).copy()
        image = np.asarray(GROUND_COLOR)[:, None, None] * shade(depth)  # (3, H, W)
        segmentation = np.zeros((self.size, self.size), dtype=np.int64)  # (H, W)
        for shape_class, color, object_depth, radius, (cx, cy), angle in zip(classes, colors, depths, radii, centres,
                                                                           angles):
            dx, dy = self.xs - cx, self.ys - cy  # (1, W), (H, 1)
            cos, sin = math.cos(angle), math.sin(angle)
            distance = SHAPE_DISTANCES[SHAPE_CLASSES[shape_class]](cos * dx + sin * dy, cos * dy - sin * dx, radius)
            coverage = np.clip(0.5 - distance * self.size, 0, 1)  # (H, W), distance in pixels, 1/2 at the outline
            image += coverage * (np.asarray(COLORS[color])[:, None, None] * shade(object_depth) - image)
            inside = distance < 0
            segmentation[inside], depth[inside] = shape_class + 1, object_depth
        edges = occluding_contours(segmentation, depth)
        caption = " and ".join(f"a {color} {SHAPE_CLASSES[c]}" for c, color in zip(classes[::-1], colors[::-1]))
        return ShapesSample(image=torch.from_numpy(image * 2 - 1).float(), label=int(classes[-1]), caption=caption,
                            depth=torch.from_numpy(depth).float()[None], segmentation=torch.from_numpy(segmentation),
                            edges=torch.from_numpy(edges).float()[None])
