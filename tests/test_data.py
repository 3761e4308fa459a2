"""Data: shapes scenes (determinism, ranges, controls consistent with the scene and with each other, depth visible in
the image, max_objects bounding the object count), the ADM center crop and image folder, latent shards, the clear
errors on bad input, the resumable order."""
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from ref.data import ImageFolder, LatentShards, batch_indices, epoch_permutation
from shapes.data import (CAPTION_VOCABULARY, COLORS, GROUND_COLOR, MAX_OBJECTS, SHAPE_CLASSES, SHAPE_DISTANCES,
                         Shapes, occluding_contours, shade)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------------------

def test_shapes_deterministic_per_index():
    first, again = Shapes(32, seed=3), Shapes(32, seed=3)
    for index in (0, 7, 123):
        a, b = first[index], again[index]
        for field in ("image", "depth", "segmentation", "edges"):
            assert torch.equal(getattr(a, field), getattr(b, field))
        assert (a.label, a.caption) == (b.label, b.caption)
    assert not torch.equal(first[0].image, first[1].image)
    assert not torch.equal(first[0].image, Shapes(32, seed=4)[0].image)
    # the same scene at any resolution
    assert [Shapes(64, seed=3)[i][1:3] for i in range(20)] == [first[i][1:3] for i in range(20)]


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_ranges_dtypes_shapes(size):
    dataset = Shapes(size, num_items=40)
    for sample in dataset:
        assert sample.image.shape == (3, size, size) and sample.image.dtype == torch.float32
        assert sample.depth.shape == (1, size, size) and sample.depth.dtype == torch.float32
        assert sample.segmentation.shape == (size, size) and sample.segmentation.dtype == torch.int64
        assert sample.edges.shape == (1, size, size) and sample.edges.dtype == torch.float32
        assert -1 <= sample.image.min() and sample.image.max() <= 1
        assert 0 <= sample.depth.min() and sample.depth.max() <= 1
        assert 0 <= sample.segmentation.min() and sample.segmentation.max() <= len(SHAPE_CLASSES)
        assert set(sample.edges.unique().tolist()) <= {0.0, 1.0}
        assert isinstance(sample.label, int) and 0 <= sample.label < len(SHAPE_CLASSES)
        assert set(sample.caption.split()) <= set(CAPTION_VOCABULARY)
    with pytest.raises(IndexError):
        dataset[40]


def caption_objects(caption):
    """'a red circle and a blue square' -> [('red', 'circle'), ('blue', 'square')]."""
    words = caption.split()
    objects = [tuple(words[i + 1:i + 3]) for i in range(0, len(words), 4)]
    assert words == " and ".join(f"a {color} {shape}" for color, shape in objects).split()
    return objects


def test_shapes_label_caption_segmentation_agree():
    labels = []
    for sample in Shapes(32, num_items=200):
        objects = caption_objects(sample.caption)
        shapes = [shape for _, shape in objects]
        assert shapes[0] == SHAPE_CLASSES[sample.label]  # the front object, named first
        assert len(set(shapes)) == len(shapes) and all(color in COLORS for color, _ in objects)
        visible = set(sample.segmentation.unique().tolist()) - {0}
        assert sample.label + 1 in visible  # the front object is never hidden
        assert visible <= {SHAPE_CLASSES.index(shape) + 1 for shape in shapes}
        labels.append(sample.label)
    assert set(labels) == set(range(len(SHAPE_CLASSES)))


@pytest.mark.parametrize("max_objects", [1, 2])
def test_shapes_max_objects_bounds_the_count_and_keeps_the_front_label(max_objects):
    counts = []
    for sample in Shapes(32, num_items=150, max_objects=max_objects):
        objects = caption_objects(sample.caption)
        visible = set(sample.segmentation.unique().tolist()) - {0}
        assert objects[0][1] == SHAPE_CLASSES[sample.label] and sample.label + 1 in visible
        if max_objects == 1:  # the one object is all there is, on the ground plane
            assert visible == {sample.label + 1}
        counts.append(len(objects))
    assert set(counts) == set(range(1, max_objects + 1))


@pytest.mark.parametrize("max_objects", [0, MAX_OBJECTS + 1])
def test_shapes_max_objects_out_of_range_is_refused(max_objects):
    with pytest.raises(ValueError, match="max_objects"):
        Shapes(32, max_objects=max_objects)


def test_shapes_visible_object_is_the_nearest():
    """Recompute each object's pixels from the scene's draws: at each pixel the segmentation and depth are those of the
    nearest object covering it, else the ground plane, which lies behind every object."""
    dataset = Shapes(32, num_items=60)
    xs = (np.arange(32) + 0.5) / 32
    for index in range(len(dataset)):
        sample = dataset[index]
        segmentation, depth = sample.segmentation.numpy(), sample.depth[0].numpy()
        nearest = np.full((32, 32), -np.inf)
        expected = np.zeros((32, 32), dtype=np.int64)
        for shape_class, _, object_depth, radius, (cx, cy), angle in zip(*dataset.scene(index)):
            dx, dy = xs[None, :] - cx, xs[:, None] - cy
            u, v = math.cos(angle) * dx + math.sin(angle) * dy, math.cos(angle) * dy - math.sin(angle) * dx
            inside = (SHAPE_DISTANCES[SHAPE_CLASSES[shape_class]](u, v, radius) < 0) & (object_depth > nearest)
            nearest[inside], expected[inside] = object_depth, shape_class + 1
        assert np.array_equal(segmentation, expected)
        assert np.allclose(depth[expected > 0], nearest[expected > 0])
        assert depth[expected == 0].max() < depth[expected > 0].min()


def test_occluding_contours_hand_made():
    """A near square (depth 0.9) overlapping a far one (0.5) on ground (0): outlines on the nearer side only."""
    segmentation = np.array([[0, 0, 0, 0, 0],
                             [0, 1, 1, 0, 0],
                             [0, 1, 2, 2, 0],
                             [0, 0, 2, 2, 0],
                             [0, 0, 0, 0, 0]])
    depth = np.choose(segmentation, [0.0, 0.5, 0.9])
    expected = np.array([[0, 0, 0, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0]], dtype=bool)
    assert np.array_equal(occluding_contours(segmentation, depth), expected)
    inner = np.zeros((5, 5), dtype=np.int64)
    inner[2, 2] = 1
    assert occluding_contours(inner, inner * 0.5).sum() == 1  # a lone pixel is its own outline


def test_shapes_edges_lie_on_occlusion_boundaries():
    """Edge pixels are exactly those with a 4-neighbour in another segment that is farther away (padding the maps
    with a copy of the border: the frame is no boundary), and every visible object has an outline."""
    for sample in Shapes(32, num_items=60):
        segmentation, depth = sample.segmentation.numpy(), sample.depth[0].numpy()
        edges = sample.edges[0].numpy().astype(bool)
        padded_segmentation, padded_depth = np.pad(segmentation, 1, mode="edge"), np.pad(depth, 1, mode="edge")
        expected = np.zeros_like(edges)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            neighbour = (slice(1 + dy, 33 + dy), slice(1 + dx, 33 + dx))
            expected |= (padded_segmentation[neighbour] != segmentation) & (padded_depth[neighbour] < depth)
        assert np.array_equal(edges, expected)
        assert not edges[segmentation == 0].any()
        for segment in set(np.unique(segmentation)) - {0}:
            assert edges[segmentation == segment].any()


def test_shapes_nearer_is_brighter():
    """Depth is visible in the image: the brightest channel of an object pixel is its shade, so it tracks depth; in
    every scene the nearer of two visible objects is the brighter on average; the ground is its own shade."""
    object_depths, object_brightness, pairs = [], [], 0
    for sample in Shapes(32, num_items=200):
        segmentation, depth = sample.segmentation.numpy(), sample.depth[0].numpy()
        brightness = (sample.image.numpy().max(axis=0) + 1) / 2  # (H, W) in [0, 1]
        objects = segmentation > 0
        object_depths.append(depth[objects])
        object_brightness.append(brightness[objects])
        segments, areas = np.unique(segmentation[objects], return_counts=True)
        by_depth = sorted((depth[segmentation == s][0], brightness[segmentation == s].mean())
                          for s in segments[areas >= 10])  # slivers are all outline, blended with their neighbours
        means = [mean for _, mean in by_depth]
        assert means == sorted(means)
        pairs += len(means) - 1
        ground = ~scipy.ndimage.binary_dilation(objects, np.ones((5, 5)))  # ground away from anti-aliased outlines
        assert np.allclose(brightness[ground], max(GROUND_COLOR) * shade(depth[ground]), atol=1e-6)
        assert brightness[ground].max() < shade(depth[objects].min())  # and darker than any object
    assert pairs > 100
    correlation = np.corrcoef(np.concatenate(object_depths), np.concatenate(object_brightness))[0, 1]
    assert correlation > 0.8  # 0.86; anti-aliased outline pixels are blends


# ---------------------------------------------------------------------------------------------------------------------
# Image folder
# ---------------------------------------------------------------------------------------------------------------------

def write_png(path, pixels, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)


def test_image_folder_crop_labels_and_flip(tmp_path):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)  # (h, w, 3)
    # 4x4 constant blocks: BOX halving twice gives `small` back exactly, the bicubic step is then the identity
    write_png(tmp_path / "b_dog" / "big.png", small.repeat(4, axis=0).repeat(4, axis=1))
    stripes = np.zeros((16, 48, 3), dtype=np.uint8)
    stripes[:, 16:32] = (10, 200, 30)
    write_png(tmp_path / "a_cat" / "1_stripes.png", stripes)
    write_png(tmp_path / "a_cat" / "2_gray.png", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), mode="L")

    dataset = ImageFolder(tmp_path, size=16)
    assert dataset.classes == ["a_cat", "b_dog"] and len(dataset) == 3
    assert [label for _, label in dataset] == [0, 0, 1]
    for image, _ in dataset:
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
    to_pixels = lambda image: ((image + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.array_equal(to_pixels(dataset[0][0]), np.broadcast_to([10, 200, 30], (16, 16, 3)))  # the middle third
    assert np.array_equal(to_pixels(dataset[2][0]), small[:, 8:24])

    flipped = ImageFolder(tmp_path, size=16, flip=True)
    assert len(flipped) == 6
    for index in range(3):
        assert torch.equal(flipped[index][0], dataset[index][0])
        assert torch.equal(flipped[3 + index][0], dataset[index][0].flip(2))
        assert flipped[3 + index][1] == dataset[index][1]


def test_image_folder_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(tmp_path / "missing", size=16)
    with pytest.raises(ValueError, match=f"{tmp_path} is empty"):
        ImageFolder(tmp_path, size=16)
    write_png(tmp_path / "loose.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path, size=16)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="cat holds no images"):
        ImageFolder(tmp_path, size=16)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt is not an image file"):
        ImageFolder(tmp_path, size=16)
    (tmp_path / "cat" / "notes.txt").unlink()
    (tmp_path / "cat" / "fake.png").write_text("not a png either")
    dataset = ImageFolder(tmp_path, size=16)  # the content is checked when read
    with pytest.raises(ValueError, match="cannot read image .*fake.png"):
        dataset[0]


# ---------------------------------------------------------------------------------------------------------------------
# Latent shards
# ---------------------------------------------------------------------------------------------------------------------

def test_latent_shards_read_scaled_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    first, second = rng.standard_normal((3, 4, 2, 2)).astype(np.float16), rng.standard_normal((2, 4, 2, 2))
    np.save(tmp_path / "latents_00000.npy", first)
    np.save(tmp_path / "labels_00000.npy", np.array([5, 0, 2]))
    np.save(tmp_path / "latents_00001.npy", second.astype(np.float32))
    np.save(tmp_path / "labels_00001.npy", np.array([1, 7], dtype=np.int32))
    dataset = LatentShards(tmp_path, latent_shape=(4, 2, 2), scale_factor=0.5)
    assert len(dataset) == 5 and isinstance(dataset.shards[0], np.memmap)
    stored = np.concatenate([first.astype(np.float32), second.astype(np.float32)])
    for index, label in enumerate([5, 0, 2, 1, 7]):
        latent, got_label = dataset[index]
        assert latent.dtype == torch.float32 and latent.shape == (4, 2, 2)
        assert torch.equal(latent, torch.from_numpy(stored[index]) * 0.5) and got_label == label
    with pytest.raises(IndexError):
        dataset[5]


def test_latent_shards_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no latent shards"):
        LatentShards(tmp_path)
    np.save(tmp_path / "latents_00000.npy", np.zeros((3, 4, 32, 32), dtype=np.float16))
    with pytest.raises(ValueError, match="labels_00000.npy"):  # missing
        LatentShards(tmp_path)
    np.save(tmp_path / "labels_00000.npy", np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match=r"labels_00000.npy: expected shape \(3,\) .* got \(2,\)"):
        LatentShards(tmp_path)
    np.save(tmp_path / "labels_00000.npy", np.zeros(3, dtype=np.int64))
    assert len(LatentShards(tmp_path)) == 3
    np.save(tmp_path / "latents_00001.npy", np.zeros((3, 4, 16, 16), dtype=np.float32))
    np.save(tmp_path / "labels_00001.npy", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"latents_00001.npy: expected shape \(N, 4, 32, 32\) .* got \(3, 4, 16, 16\)"):
        LatentShards(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------------------

def global_batch(step, world_size, batch_size=8, seed=0, num_items=20):
    return np.concatenate([batch_indices(step, batch_size, rank, world_size, seed, num_items)
                           for rank in range(world_size)])


def test_batch_indices_disjoint_ranks_and_independent_of_world_size():
    for step in range(6):
        shares = [batch_indices(step, 8, rank, 4, 0, 20) for rank in range(4)]
        assert all(len(share) == 2 for share in shares)
        for world_size in (1, 2, 4):
            assert np.array_equal(global_batch(step, world_size), global_batch(step, 1))
        within_epoch = (step * 8) // 20 == (step * 8 + 7) // 20
        if within_epoch:
            assert len(set(np.concatenate(shares).tolist())) == 8


def test_batch_indices_cover_each_epoch_and_resume_exactly():
    stream = np.concatenate([global_batch(step, 2) for step in range(10)])  # 80 positions = 4 epochs of 20
    epochs = stream.reshape(4, 20)
    for order in epochs:
        assert sorted(order.tolist()) == list(range(20))
    assert len({tuple(order) for order in epochs}) == 4  # a fresh order each epoch
    epoch_permutation.cache_clear()
    resumed = np.concatenate([global_batch(step, 2) for step in range(7, 10)])  # a run restarted at step 7
    assert np.array_equal(resumed, stream[56:])
    assert not np.array_equal(global_batch(3, 2, seed=1), global_batch(3, 2))


def test_batch_indices_bad_arguments():
    with pytest.raises(ValueError, match="not divisible"):
        batch_indices(0, 6, 0, 4, 0, 20)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        batch_indices(0, 8, 2, 2, 0, 20)
