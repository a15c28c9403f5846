"""A toy method of the loss family for tests: registered only through the coefficient table.

`focal` is the focal loss's modulating factor (Lin et al. 2017, eq. 5, γ = 2) as a detached
coefficient: Σ_t m_t·A_t·sg((1 − q_t)²)·(−log q_t), q_t = π_θ(label).
"""
from megatron_rasft.config import LossConfig
from megatron_rasft.loss import Coefficient


def focal(tok):
    """The toy method: one factor sg((1 − q_t)²) and its sum as `token_factor_sum`."""
    f_N = (1 - tok.logp_N.exp()) ** 2
    return Coefficient((f_N,), {"token_factor_sum": (tok.mask_N * f_N).sum()})


def as_method(name: str) -> LossConfig:
    """A LossConfig whose method is `name`. LossConfig admits only the shipped methods
    (config.LOSS_METHODS); a method registered in the table alone is named on the object directly."""
    cfg = LossConfig(method="sft", ratio="none")
    object.__setattr__(cfg, "method", name)
    return cfg
