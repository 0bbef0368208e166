"""Classification heads: formulas, invariances, numerical safety and the tSP gradient claim."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pancls.errors import UserError
from pancls.eval.diagnostics import centre_parameter
from pancls.heads import GAMMA_MIN, HEADS, CosineHead, LinearHead, TSPHead

TSP_FORMS = ("kernel", "paper")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _identity_tsp(dim: int, num_classes: int, **options) -> TSPHead:
    """A tSP head whose projection is the identity, so a feature on mu_k has cos_k = 1 exactly."""
    head = TSPHead(dim, num_classes, dim=dim, **options)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(dim))
    return head


def test_paper_form_softmax_is_eq12():
    head = TSPHead(24, 5, dim=16, form="paper", gamma_init=GAMMA_MIN * 1.001, learn_gamma=False)
    features = torch.randn(32, 24)
    probs = head(features).softmax(dim=1).double()

    # eq. 12 directly, in float64, from the head's own parameters
    x = F.normalize(features.double() @ head.proj.weight.double().T, dim=1)
    mu = F.normalize(head.mu.double(), dim=1)
    kernel = 1.0 / (1.0 - (1.0 + x @ mu.T) / 2.0)
    expected = kernel / kernel.sum(dim=1, keepdim=True)
    torch.testing.assert_close(probs, expected, rtol=1e-4, atol=1e-6)


def test_paper_form_logit_range_with_relaxed_gamma():
    # gamma well away from 0, so the (1 - cos) / 2 scaling matters; x on mu_1 and on -mu_1
    gamma, nu = 0.3, 2.0
    head = _identity_tsp(8, 4, form="paper", gamma_init=gamma, nu=nu)
    features = torch.stack([head.mu[1].detach(), -head.mu[1].detach()])
    logits = head(features)[:, 1]
    torch.testing.assert_close(logits, torch.tensor([-nu * math.log(gamma), -nu * math.log(1 + gamma)]))


def test_kernel_form_logits_follow_formula_and_range():
    head = TSPHead(24, 5, dim=16, form="kernel", kappa=4.0, scale_init=3.0)
    features = torch.randn(64, 24)
    cos = F.normalize(head.proj(features), dim=1) @ head.centres().T
    logits = head(features)
    torch.testing.assert_close(logits, 2 * 3.0 / (1 + 4.0 * (1 - cos)))
    assert logits.max() <= 2 * 3.0 + 1e-5 and logits.min() >= 2 * 3.0 / (1 + 2 * 4.0) - 1e-5


@pytest.mark.parametrize("name,options", [("cosine", {}), ("tsp", {"form": "kernel"}), ("tsp", {"form": "paper"})])
@pytest.mark.parametrize("factor", [1e-3, 7.5, 1e3])
def test_normalising_heads_ignore_feature_scale(name, options, factor):
    head = HEADS.create(name, in_features=20, num_classes=6, **options)
    features = torch.randn(8, 20)
    torch.testing.assert_close(head(features * factor), head(features), rtol=1e-4, atol=1e-4)


def test_linear_head_is_not_scale_invariant():
    # the invariance test above must be able to fail: a head that does not normalise changes
    head = HEADS.create("linear", in_features=20, num_classes=6)
    features = torch.randn(8, 20)
    assert not torch.allclose(head(features * 7.5), head(features), atol=1e-3)


@pytest.mark.parametrize("options", [{"form": "kernel"}, {"form": "paper"}])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_tsp_gradients_finite_at_cos_plus_and_minus_one(options, sign):
    head = _identity_tsp(8, 4, **options)
    features = (sign * head.mu[1].detach()).repeat(3, 1).requires_grad_(True)
    cos = head.cosines(features)
    assert torch.allclose(cos[:, 1], torch.full((3,), sign), atol=1e-6)
    loss = F.cross_entropy(head(features), torch.tensor([0, 1, 2]))
    loss.backward()
    grads = [features.grad] + [p.grad for p in head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert head.mu.grad.abs().sum() > 0  # something is learned at the poles


def _push_down(head, parameter_name: str, steps: int = 5, lr: float = 1e3):
    """Large-lr SGD on a loss that wants the head's scale-like parameter to shrink; returns it per step."""
    optimiser = torch.optim.SGD(head.parameters(), lr=lr)
    features = torch.randn(16, head.in_features)
    target = head(features).argmax(dim=1)
    if parameter_name == "scale":  # wrong targets: a softer head loses less
        target = (target + 1) % head.num_classes
    values = []
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(head(features), target).backward()
        optimiser.step()
        values.append(getattr(head, parameter_name).item())
    return values


@pytest.mark.parametrize("make,parameter,start", [
    (lambda: TSPHead(12, 4, dim=8, form="paper"), "gamma", 0.01),
    (lambda: TSPHead(12, 4, dim=8, form="kernel"), "scale", 1 + math.log(2)),
    (lambda: CosineHead(12, 4, scale=16.0, learn_scale=True), "scale", 16.0),
])
def test_scale_parameters_stay_positive_under_large_lr(make, parameter, start):
    head = make()
    values = _push_down(head, parameter)
    assert values[-1] < start  # the loss did push it down ...
    assert all(v > 0 and math.isfinite(v) for v in values)  # ... and it stayed a valid scale
    assert torch.isfinite(head(torch.randn(4, 12))).all()


DIM = 32


def _centre_gradient(head, centres: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dCE(head(x), class 0)/d centres, through the head's own forward in float64.

    The head is given the raw ``centres`` (its ``mu`` or ``weight``) and, for tSP, an identity projection, so
    that the cosine of ``x`` to centre k is exactly ``normalize(centres[k]) . x``; everything after the cosine
    (scale, kappa, gamma, nu, the relaxation) is whatever ``forward`` computes.
    """
    head = head.double()
    centre = centre_parameter(head)
    with torch.no_grad():
        if isinstance(head, TSPHead):
            head.proj.weight.copy_(torch.eye(DIM, dtype=torch.float64))
        centre.copy_(centres)
    head.zero_grad()
    F.cross_entropy(head(x[None]), torch.tensor([0])).backward()
    return centre.grad


def _tail_centre_gradient(head, tail_cos: float, num_classes: int = 10) -> float:
    """||dCE/d mu_tail|| for a feature sitting on the head-class centre (class 0, its target).

    All heads see the same raw centres and the same feature; only the head differs.
    The tail centre (last class) is placed at cosine ``tail_cos`` from the head centre.
    """
    generator = torch.Generator().manual_seed(1)
    mu = F.normalize(torch.randn(num_classes, DIM, generator=generator, dtype=torch.float64), dim=1)
    ortho = F.normalize(mu[-1] - (mu[-1] @ mu[0]) * mu[0], dim=0)
    mu[-1] = tail_cos * mu[0] + math.sqrt(1 - tail_cos ** 2) * ortho
    return _centre_gradient(head, mu, mu[0].clone())[-1].norm().item()


def _tsp(**options) -> TSPHead:
    return TSPHead(DIM, 10, dim=DIM, **options)


def _vmf(scale: float = 16.0) -> CosineHead:
    return CosineHead(DIM, 10, scale=scale)


@pytest.mark.parametrize("form", TSP_FORMS)
def test_tsp_gradient_on_tail_centres_decays_polynomially(form):
    """Figure 2 of the tSP paper, measured: which centres does a head-class sample push away?

    With the feature on its head-class centre, the cosine (vMF, s = 16) head puts the larger
    gradient on a *nearby* tail centre, but its push decays like exp(s (cos - 1)), so on a *far*
    tail centre it is orders of magnitude smaller than tSP's, whose kernel decays polynomially
    (heavy tail). The ratio tSP / cosine therefore grows steadily with the angle.
    """
    angles = (0.9, 0.5, 0.0, -0.5)
    ratios = [_tail_centre_gradient(_tsp(form=form), c) / _tail_centre_gradient(_vmf(), c) for c in angles]
    assert ratios[0] < 1.0  # near tail centre: tSP pushes less than vMF
    assert ratios[2] > 100.0 and ratios[3] > ratios[2]  # far tail centres: tSP pushes far more
    assert all(a < b for a, b in zip(ratios, ratios[1:], strict=False))


def test_fig2_claim_holds_only_at_a_matched_scale():
    """At the cosine head's scale (s = 16) the kernel form does what the paper's Fig. 2 says: a
    head-class sample barely pushes any other centre, near or far (its logit gap saturates at
    2 s * 2 kappa / (1 + 2 kappa) instead of growing like s (1 - cos)). The default initial scale
    (1.69) is what breaks the claim (previous test)."""
    for c in (0.9, 0.5, 0.0, -0.5):
        assert _tail_centre_gradient(_tsp(form="kernel", scale_init=16.0), c) < 1e-2 * _tail_centre_gradient(_vmf(), c)


def _own_centre_gradient(head, own_cos: float, num_classes: int = 10) -> float:
    """||dCE/d mu_y|| for a feature at cosine ``own_cos`` from its own centre, orthogonal to the others."""
    mu = torch.eye(num_classes, DIM, dtype=torch.float64)
    x = torch.zeros(DIM, dtype=torch.float64)
    x[0], x[-1] = own_cos, math.sqrt(1 - own_cos ** 2)
    return _centre_gradient(head, mu, x)[0].norm().item()


def test_flat_far_field_also_mutes_the_pull_of_hard_samples():
    """The other side of the heavy tail: a misclassified sample far from its own centre (cos 0.1)
    pulls that centre several times less under tSP than under vMF, at either scale; tail classes,
    whose samples are mostly hard, learn slowly. Near the centre the default scale keeps pulling on
    samples that are already right (bounded logits: the loss never gets small)."""
    for scale in (None, 16.0):
        assert _own_centre_gradient(_tsp(form="kernel", scale_init=scale), 0.1) < 0.25 * _own_centre_gradient(_vmf(), 0.1)
    assert _own_centre_gradient(_tsp(form="kernel"), 0.95) > 1e3 * _own_centre_gradient(_vmf(), 0.95)


@pytest.mark.parametrize("name", sorted(HEADS.names()))
def test_registry_builds_every_head_with_unit_centres(name):
    head = HEADS.create(name, in_features=20, num_classes=7)
    logits = head(torch.randn(5, 20))
    assert logits.shape == (5, 7)
    centres = head.centres()
    assert centres.shape[0] == 7 and centres.shape[1] == (head.dim if isinstance(head, TSPHead) else 20)
    torch.testing.assert_close(centres.norm(dim=1), torch.ones(7))
    assert not centres.requires_grad
    summary = head.summary()
    assert summary["head"] in HEADS.names() and all(isinstance(v, (str, float)) for v in summary.values())


def test_unknown_form_names_form():
    with pytest.raises(UserError) as info:
        HEADS.create("tsp", in_features=8, num_classes=3, form="student")
    assert info.value.where == "form" and "kernel" in info.value.reason


@pytest.mark.parametrize("options,where", [
    ({"form": "paper", "kappa": 8.0}, "kappa"),
    ({"form": "kernel", "gamma_init": 0.1}, "gamma_init"),
    ({"form": "kernel", "scale_init": 0.5}, "scale_init"),
    ({"form": "paper", "gamma_init": 0.0}, "gamma_init"),
    ({"dim": 0}, "dim"),
])
def test_bad_tsp_options_are_user_errors(options, where):
    with pytest.raises(UserError) as info:
        HEADS.create("tsp", in_features=8, num_classes=3, **options)
    assert info.value.where == where


def test_unknown_head_and_option_are_user_errors():
    with pytest.raises(UserError, match="cosine"):
        HEADS.create("arcface", in_features=8, num_classes=3)
    with pytest.raises(UserError, match="scael"):
        HEADS.create("cosine", in_features=8, num_classes=3, scael=10.0)


def test_learnable_kappa_is_a_positive_parameter_that_training_moves():
    torch.manual_seed(0)
    head = TSPHead(8, 3, dim=6, form="kernel", kappa=4.0, learn_kappa=True)
    assert float(head.kappa) == pytest.approx(4.0) and isinstance(head.log_kappa, torch.nn.Parameter)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    F.cross_entropy(head(x), y).backward()
    assert head.log_kappa.grad is not None and head.log_kappa.grad.abs() > 0
    # d logit / d log kappa = -2 s kappa (1 - cos) / (1 + kappa (1 - cos))^2: the autograd value, by hand
    head.zero_grad()
    cos = head.cosines(x)
    by_hand = (-2 * head.scale * head.kappa * (1 - cos) / (1 + head.kappa * (1 - cos)) ** 2).sum()
    head(x).sum().backward()
    torch.testing.assert_close(head.log_kappa.grad, by_hand.detach())
    with torch.no_grad():
        head.log_kappa.fill_(-50.0)  # far below: still positive
    assert float(head.kappa) > 0


def test_a_fixed_kappa_head_keeps_its_state_dict_keys():
    """Checkpoints written before learn_kappa existed hold no kappa entry; a fixed-kappa head still loads them."""
    fixed = TSPHead(8, 3, dim=6, form="kernel", kappa=4.0)
    assert not any("kappa" in key for key in fixed.state_dict())
    assert "log_kappa" in TSPHead(8, 3, dim=6, form="kernel", learn_kappa=True).state_dict()
    with pytest.raises(UserError) as info:
        TSPHead(8, 3, form="paper", learn_kappa=True)
    assert info.value.where == "learn_kappa"


HEAD_OPTIONS = [("linear", {}), ("cosine", {}), ("tsp", {"form": "kernel", "scale_init": 16.0}),
                ("tsp", {"form": "paper"})]


@pytest.mark.parametrize("name, options", HEAD_OPTIONS)
def test_heads_compute_in_float32_inside_bf16_autocast(name, options):
    """Autocast must not lower a head: the same features give the same float32 logits (and gradients)
    with and without a bf16 autocast region, and bf16 features are read as float32."""
    head = HEADS.create(name, in_features=24, num_classes=6, **options)
    features = torch.randn(8, 24).relu().requires_grad_(True)
    plain = head(features)
    plain.square().sum().backward()
    grad = features.grad.clone()
    features.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = head(features)
        from_bf16 = head(features.detach().bfloat16())
    under.square().sum().backward()
    assert under.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    torch.testing.assert_close(features.grad, grad, rtol=0, atol=0)
    torch.testing.assert_close(from_bf16, head(features.detach().bfloat16().float()), rtol=0, atol=0)


def test_tsp_kernel_top_logit_is_not_quantised_by_autocast():
    """Next to a centre bf16 would round cos to steps of 2^-8, moving the kernel logit 2s / (1 + kappa (1 - cos))
    by ~2 per step at s = kappa = 16; in float32 a sample with 1 - cos = 0.0029 (between two bf16 steps) keeps
    its exact logit."""
    head = _identity_tsp(16, 4, form="kernel", scale_init=16.0, kappa=16.0)
    centre = F.normalize(head.mu.detach(), dim=1)[0]
    noise = torch.randn(16)
    other = F.normalize(noise - (noise @ centre) * centre, dim=0)
    angle = math.acos(1 - 0.0029)
    x = (math.cos(angle) * centre + math.sin(angle) * other)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        top = head(x)[0, 0].item()
    scale = float(head.scale)
    expected = 2 * scale / (1 + 16.0 * (1 - math.cos(angle)))
    assert top == pytest.approx(expected, rel=1e-5)


def test_the_nu7_preset_is_the_paper_form_with_nu_7_bit_for_bit():
    """``tsp_paper_nu7`` builds exactly ``TSPHead(form="paper", nu=7)``: the same parameters from the same seed
    (so runs of either spelling are the same network), and ``nu`` is its name's, not an option."""
    torch.manual_seed(3)
    preset = HEADS.create("tsp_paper_nu7", in_features=12, num_classes=5, dim=8)
    torch.manual_seed(3)
    spelled = HEADS.create("tsp", in_features=12, num_classes=5, dim=8, form="paper", nu=7.0)
    assert (preset.form, preset.nu) == ("paper", 7.0)
    assert preset.state_dict().keys() == spelled.state_dict().keys()
    assert all(torch.equal(preset.state_dict()[k], spelled.state_dict()[k]) for k in preset.state_dict())
    x = torch.randn(4, 12)
    torch.testing.assert_close(preset(x), spelled(x), rtol=0, atol=0)
    # the logit width nu * log((1 + gamma) / gamma) at gamma = 0.01: 32.3, a cosine head's 2 s at s = 16
    assert 7.0 * math.log(1.01 / 0.01) == pytest.approx(32.3, abs=0.05)
    with pytest.raises(UserError, match=r"^nu: not an option of head 'tsp_paper_nu7'") as info:
        HEADS.create("tsp_paper_nu7", in_features=12, num_classes=5, nu=1.0)
    assert info.value.where == "nu"


@pytest.mark.parametrize("name, options", [("cosine", {"scale": 9.0}), ("tsp", {"form": "kernel", "scale_init": 5.0}),
                                           ("tsp", {"form": "paper", "gamma_init": 0.03}), ("tsp_paper_nu7", {})])
def test_summary_logit_width_is_what_the_logits_span(name, options):
    """summary()'s logit width is the logit of a feature on its centre minus that of the antipodal feature."""
    dim = {"dim": 6} if name.startswith("tsp") else {}
    head = HEADS.create(name, in_features=6, num_classes=3, **dim, **options)
    if isinstance(head, TSPHead):
        with torch.no_grad():
            head.proj.weight.copy_(torch.eye(6))  # the identity projection: a feature on mu_k has cos_k = 1
        centre = F.normalize(head.mu.detach(), dim=1)[0]
    else:
        centre = F.normalize(head.weight.detach(), dim=1)[0]
    with torch.no_grad():
        width = (head(centre[None]) - head(-centre[None]))[0, 0].item()
    summary = head.summary()
    assert summary["logit_width"] == pytest.approx(width, rel=1e-5)
    if name == "tsp_paper_nu7":
        assert (summary["form"], summary["nu"]) == ("paper", 7.0)
        assert summary["logit_width"] == pytest.approx(7 * math.log(1.01 / 0.01), rel=1e-5)  # 32.3 at init


def test_linear_summary_has_no_width():
    head = LinearHead(5, 3)
    assert set(head.summary()) == {"head", "weight_norm_mean"}
