"""bench/gpu_check.py --cpu-smoke: every section of the device check runs on the CPU at tiny sizes, so the check is
ready for a GPU window. What could fail: any section's code path (an error is recorded in its row), float32 against
float64 beyond rounding, the sampler's evaluation count of a full run against the formula, the report files. The
torchrun kill-and-rerun section is left out here (four launches of torchrun, ~100 s on two loaded cores); it was run
by hand (see the report of issue 25)."""
import json

import pytest
import torch

from bench import gpu_check

torch.set_num_threads(1)


def test_cpu_smoke_runs_every_section(tmp_path):
    data = gpu_check.main(["--cpu-smoke", "--skip", "torchrun", "--out", str(tmp_path)])
    sections = data["sections"]
    assert list(sections) == ["correctness", "training", "controlnet", "sampling"]
    rows = [row for section in sections.values() for row in section]
    assert not [row for row in rows if "error" in row or "skipped" in row]
    assert json.loads((tmp_path / "gpu-check.json").read_text()) == json.loads(json.dumps(data))
    assert "| DiT-tiny/2 plain |" in (tmp_path / "gpu-check.md").read_text()

    correctness = {row["part"]: row for row in sections["correctness"]}
    assert len(correctness) == 5 and all(row["fp32 vs fp64"] < 1e-5 for row in correctness.values())
    assert correctness["DiT-tiny/2"]["bf16 vs fp32"] > 1e-4  # bf16 autocast does round: the comparison is real
    assert len(sections["training"]) == 4 and all(row["batch"] == 4 and row["images_per_s"] > 0
                                                  for row in sections["training"])
    assert [row["part"] for row in sections["controlnet"]] == [
        "diffusion only, checkpointing off", "+ reward + alignment, checkpointing off",
        "diffusion only, checkpointing on", "+ reward + alignment, checkpointing on"]
    sit = sections["sampling"][0]
    # Euler-Maruyama on 250 points t_i = 1 - 0.96 i / 249, each one evaluation, plus the unconditional branch where
    # t_i <= 0.7 (i >= 78): 250 + 172; LightningDiT's Heun makes 2 x 124 conditional evaluations, 139 of them at
    # t <= 0.81 on its shifted grid (the count the README's time estimate took) also unconditional.
    assert sit["sampler"] == "em 250" and sit["evaluations_per_sample"] == 250 + 172
    lightningdit = sections["sampling"][1]
    assert lightningdit["sampler"] == "heun 124" and lightningdit["evaluations_per_sample"] == 248 + 139
    assert sit["minutes_per_50k_with_fid"] > 0 and sit["best_batch"] in (2, 3)
    assert set(data["goals"]) == {"DiT-XL/2 bf16 training MFU >= 50% (40% at least)",
                                  "IG overhead <= 1% of a sampling step",
                                  "50K SiT-XL/2 + IG + CFG samples with FID <= 90 min (H200)"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this would run the whole check")
def test_without_a_gpu_the_full_check_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "check")])
    assert exit_info.value.code == 2 and not (tmp_path / "check").exists()
    assert capsys.readouterr().err == ("error: no CUDA device: the check is for a GPU (--cpu-smoke runs its code on "
                                       "the CPU)\n")
