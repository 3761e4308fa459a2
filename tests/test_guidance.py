"""Guidance formulas on hand-computed numbers, and guided_denoiser: IG then CFG, intervals, the unconditional branch
run only where CFG acts, DiT's 3-channel CFG, and the missing null label refused."""
import pytest
import torch

from ref import guidance


def test_extrapolation_on_hand_computed_numbers():
    strong, weak = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    # w = 2: 1 + 2 (3 - 1) = 5 and 1 + 2 (-1 - 1) = -3; w = 1 the stronger, w = 0 the weaker prediction
    for method in (guidance.cfg, guidance.internal_guidance, guidance.autoguidance):
        assert method(strong, weak, 2.0).tolist() == [5.0, -3.0]
        assert method(strong, weak, 1.0).tolist() == [3.0, -1.0] and method(strong, weak, 0.0).tolist() == [1.0, 1.0]


def test_ig_then_cfg_on_hand_computed_numbers():
    # label 0 -> (D_f, D_i) = (2, 1); null label 1 -> (1, 0).
    # IG w = 2 on each branch: cond 1 + 2 (2 - 1) = 3, uncond 0 + 2 (1 - 0) = 2; CFG s = 3: 2 + 3 (3 - 2) = 5
    def model(x, t, y):
        return torch.tensor([2.0, 1.0])[y][:, None], torch.tensor([1.0, 0.0])[y][:, None]
    x, t, y = torch.zeros(1, 1), torch.tensor([0.5]), torch.tensor([0])
    assert guidance.guided_denoiser(model, y, 1, w_ig=2.0, w_cfg=3.0)(x, t).item() == 5.0
    assert guidance.guided_denoiser(model, y, 1)(x, t).item() == 2.0  # the conditional final


def test_interval_weight_is_piecewise_constant():
    t = torch.tensor([0.0, 0.29, 0.3, 0.7, 1.0])
    assert torch.equal(guidance.interval_weight(2.3, t, (0.3, 1.0)), torch.tensor([1.0, 1.0, 2.3, 2.3, 2.3]))


class LabelTable:
    """final = F[y], intermediate = I[y], whatever x and t are (two channels); counts the rows it is given."""
    final = torch.tensor([[1.0, 10.0], [2.0, 20.0], [0.0, 0.0]])  # labels 0, 1 and the null label 2
    intermediate = torch.tensor([[0.5, 5.0], [1.0, 10.0], [-1.0, -2.0]])

    def __init__(self):
        self.rows = []

    def __call__(self, x, t, y):
        self.rows.append(len(x))
        return self.final[y], self.intermediate[y]


def test_guided_denoiser_on_hand_computed_values_with_intervals():
    """t = 0.2: CFG only (s = 3): F_null + 3 (F - F_null) = 3 F. t = 0.9: IG only (w = 2): I + 2 (F - I) = 2 F - I.
    t = 0.5: both: IG first on each branch, then CFG."""
    model = LabelTable()
    denoise = guidance.guided_denoiser(model, torch.tensor([0, 1, 1]), null_y=2, w_ig=2.0, w_cfg=3.0,
                                       ig_interval=(0.4, 1.0), cfg_interval=(0.0, 0.6))
    out = denoise(torch.zeros(3, 2), torch.tensor([0.2, 0.9, 0.5]))
    # label 1 at t = 0.5: IG cond 2 F - I = (3, 30), IG null 2 (0, 0) - (-1, -2) = (1, 2); CFG 1 + 3 (3 - 1) = 7, ...
    assert out.tolist() == [[3.0, 30.0], [3.0, 30.0], [7.0, 86.0]]
    assert model.rows == [5]  # three conditional rows and the unconditional rows of t = 0.2 and 0.5 only


def test_cfg_outside_its_interval_costs_one_evaluation_and_changes_nothing():
    model = LabelTable()
    denoise = guidance.guided_denoiser(model, torch.tensor([0, 1]), null_y=2, w_cfg=3.0, cfg_interval=(0.0, 0.7))
    out = denoise(torch.zeros(2, 2), torch.tensor([0.9, 0.9]))
    assert model.rows == [2] and torch.equal(out, LabelTable.final[:2])


def test_cfg_channels_guides_the_first_channels_and_takes_the_rest_from_the_conditional_branch():
    """DiT's forward_with_cfg: only channel 0 here (of 2) is guided; channel 1 is the conditional output."""
    model = LabelTable()
    out = guidance.guided_denoiser(model, torch.tensor([1]), null_y=2, w_cfg=3.0, cfg_channels=1)(
        torch.zeros(1, 2), torch.tensor([0.5]))
    assert out.tolist() == [[6.0, 20.0]]  # 0 + 3 (2 - 0) = 6; 20 as the conditional branch gives it


def test_cfg_without_a_null_label_is_refused():
    with pytest.raises(ValueError, match="needs the null label"):
        guidance.guided_denoiser(LabelTable(), torch.tensor([0]), w_cfg=1.5)
