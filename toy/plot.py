"""Pillow figure of the toy: one panel per sample set, drawn over the true class-A density (as the Autoguidance toy)."""
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

PANEL, MARGIN, TITLE = 320, 8, 34
VIEW_CENTER, VIEW_HALF = np.array([0.4, 0.42]), 1.05  # the square of the plane shown, around class A
DENSITY_T = 0.004  # the density is shown slightly smoothed, or its thin branches would vanish at this resolution


def density_image(mixture, size=PANEL):
    """Grayscale image of log p_t on the panel grid, dark where the density is high (float32: the shade moves by
    less than one grey level; toy.run draws it while its workers train)."""
    axis = np.linspace(-VIEW_HALF, VIEW_HALF, size)
    gx, gy = np.meshgrid(VIEW_CENTER[0] + axis, VIEW_CENTER[1] - axis)  # image rows go downwards
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1)).float()
    logp = mixture.log_prob(grid, DENSITY_T).double().numpy()
    shade = np.clip((logp - (logp.max() - 12)) / 12, 0, 1).reshape(size, size)
    return Image.fromarray((255 - 150 * shade).astype(np.uint8)).convert("RGB")


def _to_pixels(points, size):
    return (points - VIEW_CENTER) * np.array([1, -1]) / (2 * VIEW_HALF) * (size - 1) + (size - 1) / 2


def draw_panels(background, sample_sets, metrics, path, points_per_panel=2000):
    """background: density_image's; sample_sets: {name: (N, 2) array}; metrics: {name: dict with outlier_rate, recall,
    weights} where known."""
    columns = 4
    rows = -(-len(sample_sets) // columns)
    figure = Image.new("RGB", (columns * (PANEL + MARGIN) + MARGIN, rows * (PANEL + TITLE + MARGIN) + MARGIN), "white")
    font = ImageFont.load_default()
    for index, (name, points) in enumerate(sample_sets.items()):
        panel = background.copy()
        draw = ImageDraw.Draw(panel)
        for px, py in _to_pixels(np.asarray(points, dtype=np.float64)[:points_per_panel], PANEL):
            if 0 <= px < PANEL and 0 <= py < PANEL:
                draw.ellipse((px - 0.9, py - 0.9, px + 0.9, py + 0.9), fill=(200, 40, 30))
        left = MARGIN + (index % columns) * (PANEL + MARGIN)
        top = MARGIN + (index // columns) * (PANEL + TITLE + MARGIN)
        figure.paste(panel, (left, top + TITLE))
        caption = ImageDraw.Draw(figure)
        caption.text((left, top), name, fill="black", font=font)
        if name in metrics:
            m = metrics[name]
            weights = " ".join(f"{k}={v}" for k, v in m["weights"].items())
            caption.text((left, top + 14), f"outliers {100 * m['outlier_rate']:.2f}%  recall {m['recall']:.3f}  "
                         f"{weights}", fill="black", font=font)
    figure.save(path)
