"""The 2D fractal mixture-of-Gaussians toy that reproduces Internal Guidance's outlier reduction."""
