import torch

from ref import guidance


def test_weight_one_is_the_identity_and_zero_the_weaker_prediction():
    g = torch.Generator().manual_seed(0)
    strong, weak = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for method in (guidance.cfg, guidance.internal_guidance, guidance.autoguidance):
        assert torch.allclose(method(strong, weak, 1.0), strong)
        assert torch.allclose(method(strong, weak, 0.0), weak)
        assert torch.allclose(method(strong, weak, 2.5), weak + 2.5 * (strong - weak))


def test_ig_then_cfg_matches_the_formula():
    g = torch.Generator().manual_seed(1)
    fc, ic, fu, iu = (torch.randn(5, 2, generator=g) for _ in range(4))
    w, s = 1.4, 1.35
    expected_c, expected_u = ic + w * (fc - ic), iu + w * (fu - iu)
    expected = expected_u + s * (expected_c - expected_u)
    assert torch.allclose(guidance.ig_then_cfg(fc, ic, fu, iu, w, s), expected)
    # with both weights 1 it is the plain conditional final output
    assert torch.allclose(guidance.ig_then_cfg(fc, ic, fu, iu, 1.0, 1.0), fc)


def test_interval_weight_is_piecewise_constant():
    t = torch.tensor([0.0, 0.29, 0.3, 0.7, 1.0])
    assert torch.equal(guidance.interval_weight(2.3, t, (0.3, 1.0)), torch.tensor([1.0, 1.0, 2.3, 2.3, 2.3]))


class FakeModel:
    """Outputs that depend on x, t and the label, so mixing up branches or samples shows; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(len(x))
        final = x * 2 + t[:, None] + y[:, None].float() * 10
        intermediate = x - t[:, None] + y[:, None].float()
        return final, intermediate


def test_guided_denoiser_composes_ig_and_cfg_with_intervals_in_one_batched_call():
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(6, 2, generator=g), torch.tensor([0.1, 0.2, 0.5, 0.6, 0.9, 1.0])
    y, null = torch.tensor([0, 1, 2, 0, 1, 2]), 3
    model = FakeModel()
    assert torch.equal(guidance.guided_denoiser(model, y)(x, t), model(x, t, y)[0])  # w = 1: the plain output

    model.calls.clear()
    denoise = guidance.guided_denoiser(model, y, null, w_ig=1.7, w_cfg=1.5, ig_interval=(0.3, 1.0),
                                       cfg_interval=(0.0, 0.7))
    out = denoise(x, t)
    assert model.calls == [12]  # both branches in one evaluation
    fc, ic = model(x, t, y)
    fu, iu = model(x, t, torch.full_like(y, null))
    w = torch.where((t >= 0.3), 1.7, 1.0)[:, None]
    s = torch.where((t <= 0.7), 1.5, 1.0)[:, None]
    assert torch.allclose(out, guidance.ig_then_cfg(fc, ic, fu, iu, w, s))
    only_ig = guidance.guided_denoiser(model, y, w_ig=1.7)(x, t)
    assert torch.allclose(only_ig, guidance.internal_guidance(fc, ic, 1.7))
