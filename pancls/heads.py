"""Classification heads: feature vector ``(N, in_features)`` -> logits ``(N, K)``.

Every head also exposes ``centres() -> (K, d)``, its K unit-norm class directions, from which the
tSP paper's crowding measure (mean angle from each class centre to the others) is computed for any
head alike, and ``embed(features) -> (N, d)``, the unit vectors of the same space (the normalised feature;
tSP: the normalised projection ``x``), so that the angle of a sample to a centre means the same for every head.

========  =====================================================================================
name      head
========  =====================================================================================
linear    :class:`LinearHead`, the plain softmax classifier ``W x + b`` (alias ``softmax``)
cosine    :class:`CosineHead`, cosine (vMF) softmax ``s * cos(w_k, x)``
tsp       :class:`TSPHead`, the T-distributed spherical classifier (AAAI 2023), two forms
tsp_p...  :func:`tsp_paper_nu7`, the preset ``TSPHead(form="paper", nu=7)``: the clinical default
========  =====================================================================================

``summary()`` gives what a head learned in numbers: its scale, gamma or kappa and its logit width (the span
between a logit at ``cos = 1`` and one at ``cos = -1``, which bounds how confident it can be); ``pancls lt``
writes it into ``results.json``.

Every head computes in float32, also inside a bf16/fp16 autocast region (:func:`in_float32`): the angular
heads read a cosine next to 1, where bf16 has a step of 2^-8; a tSP kernel logit ``2 s / (1 + kappa (1 - cos))``
at ``s = kappa = 16`` moves by about 2 per step there, so autocast would quantise exactly the logits that
training sharpens. The heads are a K x d matrix product, so float32 costs nothing measurable.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

from pancls.registry import Registry
from pancls.validation import InvalidParameter, check_choice, check_scalar

HEADS = Registry("head")

#: Floor of the tSP "paper" form's gamma. In float32, (1 - cos) / 2 next to a centre is resolved to
#: about 6e-8 only, so a smaller gamma would not sharpen the head, just quantise its top logit.
GAMMA_MIN = 1e-6


_HALF = (torch.float16, torch.bfloat16)


def in_float32(forward):
    """Decorate a head's ``forward(features)`` to run in float32 with autocast off.

    Half-precision features are cast to float32 (float64 stays float64) and every op of the head, including
    the matrix products that autocast would lower to bf16/fp16, runs in float32, so the logits are float32.
    Outside autocast and with float32 features this is the identity: float32 training is unchanged bit for bit.
    """

    @functools.wraps(forward)
    def wrapper(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return forward(self, features.float() if features.dtype in _HALF else features)

    return wrapper


def _check_int(value, name: str, minimum: int) -> int:
    return check_scalar(value, name, int, min_val=minimum)


def _check_number(value, name: str, above: float) -> float:
    return float(check_scalar(value, name, float, min_val=above, include_boundaries="neither"))


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def _scalar(value: float, learnable: bool, module: nn.Module, name: str) -> None:
    """Register a 0-d tensor as a parameter when it is learned, else as a buffer (so it follows .to())."""
    tensor = torch.tensor(float(value))
    if learnable:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


class _WeightRowDirections:
    """The eigenspace API of a head whose class directions are its ``weight`` rows (linear, cosine): centres
    ``w_k / ||w_k||`` and the features' own directions."""

    @torch.no_grad()
    def centres(self) -> torch.Tensor:
        """Unit class directions, ``(K, in_features)``, detached."""
        return F.normalize(self.weight, dim=1)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The features' directions ``x / ||x||``, the space of :meth:`centres`."""
        return F.normalize(features, dim=1)


class LinearHead(_WeightRowDirections, nn.Linear):
    """Plain softmax classifier: ``logit_k = w_k . x + b_k``.

    Its centres are the normalised weight rows ``w_k / ||w_k||``.
    """

    def __init__(self, in_features: int, num_classes: int):
        super().__init__(_check_int(in_features, "in_features", 1), _check_int(num_classes, "num_classes", 2))

    @in_float32
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features)

    @torch.no_grad()
    def summary(self) -> Dict[str, Any]:
        """What the head learned, in numbers (see :meth:`TSPHead.summary`): a linear head's logits are unbounded,
        so only its weight rows' mean norm."""
        return {"head": "linear", "weight_norm_mean": float(self.weight.norm(dim=1).mean())}


class CosineHead(_WeightRowDirections, nn.Module):
    """Cosine (von Mises-Fisher) softmax: ``logit_k = s * cos(w_k, x) = s * w_k . x / (||w_k|| ||x||)``.

    The softmax of these logits is the posterior of K vMF components with equal concentration ``s``
    on the unit sphere. Reference: Wang et al., "NormFace: L2 Hypersphere Embedding for Face
    Verification", ACM MM 2017.

    Parameters
    ----------
    scale : float
        ``s > 0`` (initial ``s > 1`` when learned); the logits lie in ``[-s, s]``, so ``s`` bounds how
        confident the head can be.
    learn_scale : bool
        Learn ``s``, as ``s = 1 + softplus(rho)`` like the tSP kernel form: it cannot collapse to 0
        under a large step, and a scale below 1 would leave every softmax near uniform anyway.
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 16.0, learn_scale: bool = False):
        super().__init__()
        self.in_features = _check_int(in_features, "in_features", 1)
        self.num_classes = _check_int(num_classes, "num_classes", 2)
        self.weight = nn.Parameter(torch.randn(num_classes, in_features))
        self.learn_scale = bool(learn_scale)
        if self.learn_scale:
            self.rho = nn.Parameter(torch.tensor(_inverse_softplus(_check_number(scale, "scale", 1.0) - 1.0)))
        else:
            self.register_buffer("fixed_scale", torch.tensor(_check_number(scale, "scale", 0.0)))

    @property
    def scale(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.rho) if self.learn_scale else self.fixed_scale

    @in_float32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit_of_cos(F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)))

    def logit_of_cos(self, cos: torch.Tensor) -> torch.Tensor:
        """The logit of a sample whose cosine to the class direction is ``cos``: ``s * cos``."""
        return self.scale * cos

    @torch.no_grad()
    def summary(self) -> Dict[str, Any]:
        """The scale ``s`` and the logit width ``2 s`` (logits in ``[-s, s]``)."""
        return {"head": "cosine", "scale": float(self.scale), "logit_width": _width(self)}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, scale={self.scale.item():.4g}, "
                f"learn_scale={self.learn_scale}")


class TSPHead(nn.Module):
    """T-distributed spherical (tSP) classifier.

    The feature is projected linearly (no bias, so the head ignores the feature's scale) to ``dim``
    dimensions and L2-normalised to ``x``; each class has a learnable centre ``mu_k``, also
    L2-normalised, and ``cos_k = mu_k . x``. On the unit sphere the squared distance is
    ``||x - mu_k||^2 = 2 (1 - cos_k)``, and both forms are Student-t kernels of that distance. In the
    paper form the kernel is the class probability's own (``p_k`` decays polynomially in the distance, not
    exponentially as the cosine (vMF) head's); in the kernel form it is the *logit*, and ``p_k ∝ exp(logit_k)``
    levels off at a constant ratio far from the centre (the logit's floor ``2 s / (1 + 2 kappa)``).

    Reference: Yang et al., "T-distributed Spherical Feature Representation for Imbalanced
    Classification", AAAI 2023.

    ``form="paper"`` (eq. 12 with the margin relaxation ``gamma``)::

        logit_k = -nu * log(gamma + (1 - cos_k) / 2)
        p_k     = (gamma + (1 - cos_k) / 2)^-nu / sum_j (gamma + (1 - cos_j) / 2)^-nu

    which is eq. 12, ``p_k ∝ (1 - (1 + mu_k . x) / 2)^-1``, when ``gamma -> 0`` and ``nu = 1``.
    ``gamma = GAMMA_MIN + exp(theta)`` is learned (``learn_gamma``) and stays positive; ``nu`` is
    fixed. Logit range: ``[-nu log(1 + gamma), -nu log(gamma)]``, a width of
    ``nu * log((1 + gamma) / gamma)`` (4.6 at ``gamma = 0.01``, ``nu = 1``), which widens without
    bound as ``gamma`` shrinks; so training pushes ``gamma`` down and the head can become confident.

    ``form="kernel"`` (the first author's later public code)::

        logit_k = s * 2 / (1 + kappa * (1 - cos_k)),    s = 1 + softplus(rho)

    Logit range: ``[2 s / (1 + 2 kappa), 2 s]``. The logits are bounded by the scale, so even a
    feature exactly on its centre with every other centre antipodal has at most
    ``p_max = 1 / (1 + (K - 1) exp(-2 s * 2 kappa / (1 + 2 kappa)))`` and cross-entropy at least
    ``-log p_max``. At the default ``s = 1 + log 2 ≈ 1.69`` (``rho = 0``), ``kappa = 16`` and K = 10
    that is ``p_max ≈ 0.75``, loss ``>= 0.29``: cross-entropy can never get small and keeps pushing
    on samples that are already right, which are mostly the head classes'. ``scale_init`` (larger
    ``s``) and ``learn_scale`` are the knobs for this: an independent check found a plain tSP head
    only tied the linear softmax on long-tailed CIFAR and that a larger initial scale closed about
    half of a short run's gap.

    The polynomial tail decides which centres a sample pushes away. Measured at default parameters
    with a feature on its own centre (``tests/test_heads.py``): against a cosine head with ``s = 16``,
    tSP puts 2.5 to 4 times less cross-entropy gradient on a nearby centre (``cos = 0.9``) but
    10^3 to 10^4 times more on an orthogonal one, where the cosine head's push has decayed like
    ``exp(s (cos - 1))``.

    Both forms clamp ``cos`` to ``[-1, 1]`` and use no ``acos``, so their gradients are finite at
    ``cos = +1`` and ``cos = -1``.

    Parameters
    ----------
    in_features, num_classes : int
        Feature width of the backbone and K.
    dim : int
        Width of the spherical embedding (128 in the paper).
    form : {"kernel", "paper"}
    kappa : float, default 16 (kernel form only)
        Sharpness of the kernel; larger is more peaked. With ``learn_kappa`` its initial value.
    learn_kappa : bool, default False (kernel form only)
        Learn ``kappa = exp(log_kappa)`` (positive by construction) with the rest of the network: the kernel's
        flatness is then found by training instead of fixed (issue 16's "learnable kappa" recipe).
    scale_init : float, default ``1 + log 2`` (kernel form only)
        Initial ``s``; must be > 1 since ``s = 1 + softplus(rho)``.
    learn_scale : bool, default True (kernel form only)
    gamma_init : float, default 0.01 (paper form only)
        Initial ``gamma``; must exceed :data:`GAMMA_MIN`.
    learn_gamma : bool, default True (paper form only)
    nu : float, default 1 (paper form only)
        Exponent of the kernel (``nu = 1`` is eq. 12).
    """

    FORMS = ("kernel", "paper")
    _FORM_OPTIONS = {"kernel": ("kappa", "scale_init", "learn_scale", "learn_kappa"),
                     "paper": ("gamma_init", "learn_gamma", "nu")}

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        dim: int = 128,
        form: str = "kernel",
        *,
        kappa: float | None = None,
        scale_init: float | None = None,
        learn_scale: bool | None = None,
        learn_kappa: bool | None = None,
        gamma_init: float | None = None,
        learn_gamma: bool | None = None,
        nu: float | None = None,
    ):
        super().__init__()
        if form not in self.FORMS:
            check_choice(form, "form", self.FORMS)
        given = {"kappa": kappa, "scale_init": scale_init, "learn_scale": learn_scale, "learn_kappa": learn_kappa,
                 "gamma_init": gamma_init, "learn_gamma": learn_gamma, "nu": nu}
        for name, value in given.items():
            if value is not None and name not in self._FORM_OPTIONS[form]:
                other = "paper" if form == "kernel" else "kernel"
                raise InvalidParameter(f"is an option of tSP form {other!r}, not of form={form!r}", name)
        self.in_features = _check_int(in_features, "in_features", 1)
        self.num_classes = _check_int(num_classes, "num_classes", 2)
        self.dim = _check_int(dim, "dim", 2)
        self.form = form
        self.proj = nn.Linear(in_features, dim, bias=False)
        self.mu = nn.Parameter(torch.randn(num_classes, dim))
        if form == "kernel":
            kappa = _check_number(16.0 if kappa is None else kappa, "kappa", 0.0)
            self.learn_kappa = bool(learn_kappa)
            if self.learn_kappa:
                self.log_kappa = nn.Parameter(torch.tensor(math.log(kappa)))
            else:
                self.fixed_kappa = kappa  # a plain number: checkpoints of fixed-kappa heads hold no kappa entry
            rho = 0.0 if scale_init is None else _inverse_softplus(_check_number(scale_init, "scale_init", 1.0) - 1.0)
            _scalar(rho, True if learn_scale is None else bool(learn_scale), self, "rho")
        else:
            gamma = _check_number(0.01 if gamma_init is None else gamma_init, "gamma_init", GAMMA_MIN)
            _scalar(math.log(gamma - GAMMA_MIN), True if learn_gamma is None else bool(learn_gamma), self, "theta")
            self.nu = _check_number(1.0 if nu is None else nu, "nu", 0.0)

    @property
    def scale(self) -> torch.Tensor:
        """``s = 1 + softplus(rho)`` of the kernel form."""
        return 1.0 + F.softplus(self.rho)

    @property
    def kappa(self):
        """``kappa`` of the kernel form: ``exp(log_kappa)`` when learned, else the fixed number."""
        return self.log_kappa.exp() if self.learn_kappa else self.fixed_kappa

    @property
    def gamma(self) -> torch.Tensor:
        """``gamma = GAMMA_MIN + exp(theta)`` of the paper form."""
        return GAMMA_MIN + self.theta.exp()

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The normalised embedding ``x = P f / ||P f||``, ``(N, dim)``, the space of :meth:`centres`."""
        return F.normalize(self.proj(features), dim=1)

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """``cos_k = mu_k . x`` for the normalised embedding ``x`` of each feature, ``(N, K)`` in [-1, 1]."""
        return F.linear(self.embed(features), F.normalize(self.mu, dim=1)).clamp(-1.0, 1.0)

    @in_float32
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_of_cos(self.cosines(features))

    def logit_of_cos(self, cos: torch.Tensor) -> torch.Tensor:
        """The logit of a sample whose embedding has cosine ``cos`` to the class centre (the class formulas)."""
        if self.form == "kernel":
            return 2.0 * self.scale / (1.0 + self.kappa * (1.0 - cos))
        return -self.nu * torch.log(self.gamma + 0.5 * (1.0 - cos))

    @torch.no_grad()
    def centres(self) -> torch.Tensor:
        """Unit class centres ``mu_k / ||mu_k||``, ``(K, dim)``, detached."""
        return F.normalize(self.mu, dim=1)

    @torch.no_grad()
    def summary(self) -> Dict[str, Any]:
        """The learned scalars and the logit width, the difference between a logit at ``cos = 1`` and one at
        ``cos = -1`` (what bounds how confident the head can be; a cosine head's is ``2 s``)::

            kernel:  2 s - 2 s / (1 + 2 kappa)
            paper:   nu * log((1 + gamma) / gamma)
        """
        if self.form == "kernel":
            learned = {"form": "kernel", "scale": float(self.scale), "kappa": float(self.kappa)}
        else:
            learned = {"form": "paper", "nu": self.nu, "gamma": float(self.gamma)}
        return {"head": "tsp", **learned, "logit_width": _width(self)}

    def extra_repr(self) -> str:
        text = f"in_features={self.in_features}, num_classes={self.num_classes}, dim={self.dim}, form={self.form!r}"
        if self.form == "kernel":
            learned = isinstance(self.rho, nn.Parameter)
            return (text + f", kappa={float(self.kappa):g}, learn_kappa={self.learn_kappa}, "
                    f"scale={self.scale.item():.4g}, learn_scale={learned}")
        learned = isinstance(self.theta, nn.Parameter)
        return text + f", gamma={self.gamma.item():.4g}, learn_gamma={learned}, nu={self.nu:g}"


def _width(head: nn.Module) -> float:
    """A head's logit width, ``logit(cos = 1) - logit(cos = -1)`` from its own ``logit_of_cos`` (in float64)."""
    ends = head.logit_of_cos(torch.tensor([1.0, -1.0], dtype=torch.float64))
    return float(ends[0] - ends[1])


def tsp_paper_nu7(in_features: int, num_classes: int, dim: int = 128, *, gamma_init: float | None = None,
                  learn_gamma: bool | None = None) -> TSPHead:
    """tSP, the paper form with ``nu = 7``: ``TSPHead(form="paper", nu=7)``, the clinical recipes' head.

    ::

        logit_k = -7 * log(gamma + (1 - cos_k) / 2)

    ``nu`` sets the logit range's width, ``nu * log((1 + gamma) / gamma)``: 4.6 for eq. 12 as published
    (``nu = 1``, ``gamma = 0.01``), too narrow for the head to become confident in a short run; ``nu = 7``
    makes it 32.3, the width of a cosine head at scale 16 (``2 s``). ``nu`` was fixed by that match before it
    was trained, not tuned on a test set. Issue 16's evidence (``docs/reproduction.md``): with logit adjustment
    on CIFAR-10-LT (IR 100, ResNet-20 x 0.5, 36 epochs, 3 seeds) it was 2.2 points above the kernel form and
    level with softmax; on the synthetic cohort it recalled the rarest class where the kernel form did not.

    A registered preset (timm's named configurations): ``nu`` is its name's, so it is not an option here, and
    a preset never changes meaning (a run's config names it, and the run must rebuild the same network); a new
    recipe gets a new name. The network and its initialisation are exactly ``TSPHead``'s with those options.
    """
    return TSPHead(in_features, num_classes, dim, form="paper", nu=7.0, gamma_init=gamma_init,
                   learn_gamma=learn_gamma)


HEADS.register("linear")(LinearHead)
HEADS.register("softmax")(LinearHead)
HEADS.register("cosine")(CosineHead)
HEADS.register("tsp")(TSPHead)
HEADS.register("tsp_paper_nu7")(tsp_paper_nu7)

__all__ = ["GAMMA_MIN", "HEADS", "CosineHead", "LinearHead", "TSPHead", "in_float32", "tsp_paper_nu7"]
