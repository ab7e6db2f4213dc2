"""The similarity ``sim(z_i, target_i)`` of GCPO's causal weight (Eq. 11), as an injected callable.

The paper uses cosine similarity and reports negligible differences with Euclidean or Gaussian kernels without
giving their formulas; ours are **[decision]** options (``docs/algorithm.md``). Any callable
``(z [N, D], target [N, D]) -> [N]`` can be injected; subclass :class:`Similarity` to name one by ``class_path``.
"""

from __future__ import annotations

from torch import Tensor

from gcpo_lightning.functional.causal import cosine, euclidean, gaussian


class Similarity:
    """Base class: ``sim(z, target)`` per row.  ``[N, D], [N, D] -> [N]``."""

    def __call__(self, z: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Cosine(Similarity):
    """``cos(z, target)``, in ``[-1, 1]``: the paper's choice."""

    def __call__(self, z: Tensor, target: Tensor) -> Tensor:
        return cosine(z, target)


class Euclidean(Similarity):
    """``1 / (1 + ||z - target|| / sqrt(D))``, in ``(0, 1]``. **[decision]**"""

    def __call__(self, z: Tensor, target: Tensor) -> Tensor:
        return euclidean(z, target)


class Gaussian(Similarity):
    """``exp(-||z - target||^2 / (2 sigma^2 D))``, in ``(0, 1]``. **[decision]**

    Args:
        sigma: the bandwidth, on distances divided by ``sqrt(D)``.
    """

    def __init__(self, sigma: float = 1.0) -> None:
        if sigma <= 0:
            raise ValueError(f"Gaussian: sigma must be > 0, got {sigma}")
        self.sigma = sigma

    def __call__(self, z: Tensor, target: Tensor) -> Tensor:
        return gaussian(z, target, self.sigma)
