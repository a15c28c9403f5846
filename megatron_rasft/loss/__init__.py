"""The RASFT loss family: pure `compute_loss` (sums, vocab-parallel) and the Megatron wrapper."""
from megatron_rasft.loss.family import NonFiniteLogits, compute_loss
from megatron_rasft.loss.kernels import vocab_parallel_entropy, vocab_parallel_kl, vocab_parallel_logprob
from megatron_rasft.loss.megatron import make_loss_func

__all__ = ["NonFiniteLogits", "compute_loss", "make_loss_func", "vocab_parallel_logprob", "vocab_parallel_kl",
           "vocab_parallel_entropy"]
