"""The main job in its quick configuration: outputs, their layout, and IG's effect on a trained model."""
import json

import numpy as np
import pytest

from toy import run

METHODS = {"unguided", "ig", "cfg", "ig+cfg", "autoguidance", "exact"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    metrics = run.main(["--quick", "--seeds", "1", "--out", str(out)])
    return out, metrics


def test_writes_metrics_samples_and_figure(quick_run):
    out, metrics = quick_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert set(on_disk["methods"]) == METHODS
    for entry in on_disk["methods"].values():
        assert {"outlier_rate", "logp_outlier_rate", "precision", "recall", "mean_logp", "median_logp",
                "network_evals_per_sample", "weights"} <= set(entry)
    assert "threshold_logp" in on_disk and on_disk["wall_time_s"] > 0
    samples = np.load(out / "samples.npz")
    assert set(samples.files) == METHODS and samples["ig"].shape == (3000, 2)
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_network_evaluations(quick_run):
    methods = quick_run[1]["methods"]
    heun = 2 * 32 - 1
    assert methods["unguided"]["network_evals_per_sample"] == methods["ig"]["network_evals_per_sample"] == heun
    assert methods["cfg"]["network_evals_per_sample"] == methods["autoguidance"]["network_evals_per_sample"] == 2 * heun


def test_exact_denoiser_is_the_ceiling_and_ig_lowers_outliers(quick_run):
    methods = quick_run[1]["methods"]
    assert methods["exact"]["outlier_rate"] < 0.005
    assert methods["unguided"]["outlier_rate"] > 5 * methods["exact"]["outlier_rate"]
    # same initial noise for every method, so the difference is paired; the quick run trains 1/2 as long as the full one
    assert methods["ig"]["outlier_rate"] < 0.92 * methods["unguided"]["outlier_rate"]
