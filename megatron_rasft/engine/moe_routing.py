"""The mixture-of-experts routers in the training step: the load-balancing (aux) loss's normalisation
and the routing metrics of the step log (docs/moe.md).

Legend: E experts, k = top-k, L layers, T_m the tokens of micro-batch m (every position the router
sees: prompt, response and padding alike, since all of them are dispatched to experts), M the step's
micro-batches on all data-parallel ranks.

The aux loss of MoE layer ℓ on micro-batch m is the Switch Transformer's (Fedus et al. 2021, eq. 4
with top-k; Megatron-Core 0.16.1 `moe_utils.switch_load_balancing_loss_func`):

    aux_ℓ,m = E / (k · T_m²) · Σ_e c_e · Σ_t p_t,e        (1 when the load is balanced)

with c_e the number of the micro-batch's tokens whose top k (by router score) include expert e (no
gradient) and p_t the softmax over all E experts of token t's router logits. The step's objective is
the method's loss plus

    α · Σ_ℓ  Σ_m T_m · aux_ℓ,m / Σ_m T_m                  (α = model.moe_aux_loss_coeff)

a token-weighted mean over the step's micro-batches (the plain mean: they all have the same shape),
whatever the loss method and its normaliser. Its gradient is α · Σ_ℓ Σ_m T_m ∂aux_ℓ,m / Σ_m T_m.

Why a per-step coefficient: with `calculate_per_token_loss=True` Megatron's router multiplies its aux
loss by its token count T_m (router.py:456, `attach_and_log_load_balancing_loss`) and
`finalize_model_grads` divides every gradient by the step's loss normaliser N (Σ loss tokens over
the data-parallel ranks, or the sequence count under GRPO `seq_mean`). Given Megatron coefficient
α_M, the aux gradient is α_M · Σ_m T_m ∂aux_m / N: it would change with the prompt/response ratio
and the aggregation (N ≪ Σ T_m for SFT on long prompts; N = a few sequences under `seq_mean`). Each
step therefore sets α_M = α · N / Σ_m T_m (`MoERouting.begin_step`: N from the batches with
`loss.loss_normaliser`, one all-reduce), which makes the gradient exactly the one above. With N = 0
(no loss token in the step) finalize does not divide, and the aux is switched off for that step.
The aux never enters the method's loss sum or its report; it is logged on its own (`moe_aux`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist


def routers(model_chunks: list) -> list:
    """The Megatron `TopKRouter` modules of `model_chunks` (DDP-wrapped or not), in layer order."""
    from megatron.core.transformer.moe.router import TopKRouter

    found = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)]
    return sorted(found, key=lambda r: r.layer_number or 0)


def _reduce_groups(router, groups) -> list:
    """The groups whose ranks route different tokens: data-parallel and pipeline ranks, and tensor-
    parallel ranks under sequence parallelism (each holds 1/TP of the sequence)."""
    out = [groups.dp, groups.pp]
    if router.config.sequence_parallel and groups.tp_size > 1:
        out.append(groups.tp)
    return out


class MoERouting:
    """Forward hooks on a policy's routers that count the step's routing, and the per-step
    coefficient of the aux loss (module docstring). Use: `begin_step(batches)` before the step's
    forward/backward, `metrics()` after it (both collective over every rank of the run).

    `aux_coeff`: α (`model.moe_aux_loss_coeff`, ≥ 0); `normaliser(micro_batch) -> 0-d tensor`: the
    loss's normaliser of one micro-batch dict (`loss.loss_normaliser` on its `LossBatch`); `groups`:
    the run's `ParallelGroups`. Raises ValueError when the model has no router, or α > 0 with a
    router whose load balancing is not Megatron's "aux_loss" or whose score is not softmax/sigmoid.
    """

    def __init__(self, model_chunks: list, aux_coeff: float, normaliser: Callable, groups):
        self.routers = routers(model_chunks)
        if not self.routers:
            raise ValueError("MoERouting: the model has no MoE router (model.num_moe_experts is not set?)")
        cfg = self.routers[0].config
        for r in self.routers:
            if r.score_function not in ("softmax", "sigmoid"):
                raise ValueError(f"router score function {r.score_function!r}: softmax or sigmoid expected")
            if aux_coeff > 0 and r.routing_type != "aux_loss":
                raise ValueError(f"model.moe_aux_loss_coeff = {aux_coeff} needs Megatron's "
                                 f"moe_router_load_balancing_type 'aux_loss', the model has {r.routing_type!r}")
        self.aux_coeff, self.normaliser, self.groups = float(aux_coeff), normaliser, groups
        self.num_experts, self.topk = cfg.num_moe_experts, cfg.moe_router_topk
        self.tp_sp = groups.tp_size if cfg.sequence_parallel else 1  # ranks a micro-batch's tokens are split over
        L, E = cfg.num_layers, self.num_experts
        dev = self.routers[0].weight.device
        # Per layer: tokens routed to each expert, Σ_m T_m·aux_m, Σ_m T_m (this rank's share), dropped.
        self._load_LE = torch.zeros(L, E, dtype=torch.float64, device=dev)
        self._aux_L = torch.zeros(L, dtype=torch.float64, device=dev)
        self._tokens_L = torch.zeros(L, dtype=torch.float64, device=dev)
        self._dropped = torch.zeros(1, dtype=torch.float64, device=dev)
        self.megatron_coeff: Optional[float] = None  # α_M of the current step
        self._handles = [r.register_forward_hook(self._count) for r in self.routers]

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- the aux loss's coefficient -----------------------------------------------------------------
    def begin_step(self, batches: list) -> None:
        """Zero the counts and, with α > 0, set every router's Megatron coefficient to α · N / Σ T
        for this step (N: the step's loss normaliser over the data-parallel ranks, from `batches`,
        this rank's micro-batch dicts; Σ T: the tokens the routers of the data-parallel ranks see in
        the step). Collective over the data-parallel group when α > 0."""
        for t in (self._load_LE, self._aux_L, self._tokens_L, self._dropped):
            t.zero_()
        if self.aux_coeff <= 0:
            self.megatron_coeff = 0.0
            for r in self.routers:
                r.config.moe_aux_loss_coeff = 0.0
            return
        n_local = sum(float(self.normaliser(mb)) for mb in batches)
        t_local = sum(mb["tokens"].numel() for mb in batches) / self.tp_sp
        box = torch.tensor([n_local, t_local], dtype=torch.float64, device=self._aux_L.device)
        dist.all_reduce(box, group=self.groups.dp)
        n_global, t_global = box.tolist()
        self.megatron_coeff = self.aux_coeff * n_global / t_global if n_global > 0 else 0.0
        for r in self.routers:
            r.config.moe_aux_loss_coeff = self.megatron_coeff

    # -- the routing counts -------------------------------------------------------------------------
    def _count(self, router, args, output) -> None:
        """Forward hook: count one micro-batch's routing at this layer. Only training passes that
        build a graph count (as Megatron's aux): a forward-only pass does not, and under full
        recomputation the first, gradient-free forward does not while the recomputation does."""
        if not (router.training and torch.is_grad_enabled()):
            return
        probs_TE, routing_map_TE = output
        E, k = self.num_experts, self.topk
        with torch.no_grad():
            logits_TE = router.gating(args[0]).reshape(-1, E).double()
            if router.score_function == "softmax":
                p_TE = torch.softmax(logits_TE, dim=-1)
            else:  # sigmoid, normalised over the experts (Megatron's compute_routing_scores_for_aux_loss)
                p_TE = torch.sigmoid(logits_TE)
                p_TE = p_TE / (p_TE.sum(-1, keepdim=True) + 1e-20)
            T_r = p_TE.shape[0]
            c_E = torch.zeros(E, dtype=torch.float64, device=p_TE.device)
            c_E.scatter_add_(0, p_TE.topk(k, dim=-1).indices.reshape(-1),
                             torch.ones(T_r * k, dtype=torch.float64, device=p_TE.device))
            if self.tp_sp > 1:  # the micro-batch's counts over its sequence shards (as the router does)
                dist.all_reduce(c_E, group=self.groups.tp)
            T_m = T_r * self.tp_sp
            aux_part = E / (k * T_m * T_m) * (c_E * p_TE.sum(0)).sum()  # this rank's share of aux_ℓ,m
            i = router.layer_number - 1
            dispatched_E = routing_map_TE.sum(0).double()
            self._load_LE[i] += dispatched_E
            self._aux_L[i] += T_m * aux_part
            self._tokens_L[i] += T_r
            self._dropped += k * T_r - dispatched_E.sum()

    def metrics(self) -> dict:
        """The step's routing metrics over every rank (collective over the data-parallel and
        pipeline groups, and the tensor-parallel group under sequence parallelism):

        moe_aux: the mean over MoE layers of aux_ℓ = Σ_m T_m·aux_ℓ,m / Σ_m T_m (1 = balanced);
        moe_aux_per_layer: aux_ℓ per MoE layer; moe_aux_loss: α · Σ_ℓ aux_ℓ, the term the step
        optimised beside the method's loss; moe_load: tokens routed to each expert, summed over the
        layers and the step (each token counts k times per layer); moe_load_imbalance: the largest
        over layers of max_e load / mean_e load (1 = balanced); moe_dropped: token-expert
        assignments not dispatched (0: the dispatcher is dropless)."""
        flat = torch.cat([self._load_LE.reshape(-1), self._aux_L, self._tokens_L, self._dropped])
        for group in _reduce_groups(self.routers[0], self.groups):
            if dist.get_world_size(group) > 1:
                dist.all_reduce(flat, group=group)
        L, E = self._load_LE.shape
        load_LE = flat[:L * E].reshape(L, E)
        aux_L, tokens_L, dropped = flat[L * E:L * E + L], flat[L * E + L:L * E + 2 * L], flat[-1]
        moe = tokens_L > 0
        if not bool(moe.any()):
            return {}
        aux_l = (aux_L[moe] / tokens_L[moe]).tolist()
        load_l = load_LE[moe]
        imbalance = (load_l.max(-1).values / load_l.mean(-1).clamp(min=1e-30)).max().item()
        return {"moe_aux": sum(aux_l) / len(aux_l), "moe_aux_per_layer": aux_l,
                "moe_aux_loss": self.aux_coeff * sum(aux_l), "moe_load": [int(x) for x in load_l.sum(0).tolist()],
                "moe_load_imbalance": imbalance, "moe_dropped": int(dropped.item())}
