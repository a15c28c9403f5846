"""The RASFT loss family: pure `compute_loss` (sums, vocab-parallel) on a typed `LossBatch`, its
per-method coefficient table, and the Megatron wrapper."""
from megatron_rasft.loss.batch import LossBatch
from megatron_rasft.loss.coefficients import COEFFICIENTS, Coefficient, Tokens
from megatron_rasft.loss.family import compute_loss, loss_normaliser
from megatron_rasft.loss.kernels import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprob
from megatron_rasft.loss.megatron import make_loss_func
from megatron_rasft.loss.validate import NonFiniteLogits

__all__ = ["COEFFICIENTS", "Coefficient", "LossBatch", "NonFiniteLogits", "Tokens", "compute_loss", "loss_normaliser", "make_loss_func",
           "vocab_parallel_logprob", "vocab_parallel_kl", "vocab_parallel_entropy"]
