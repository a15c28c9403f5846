"""What a round needs from the policy, at its window boundary (collective, every rank):

- the export the rollout server is refreshed to (RUN/hf/policy);
- the refresh probe: a prompt's token ids (new every round) and their log-probs under that export,
  by the trainer's own forward pass; the refreshed server must reproduce them (with the tensor
  check of `rollout/refresh_check.py`, proof that the new weights are live);
- the selection of the window's problems to roll out (`rollout.selection`: `all`, or the
  `released` rule's expert-NLL band with its hard pool, `methods/selection.py`), with the band
  calibrated once per run on the initial model (RUN/rounds/nll_band.json).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

from megatron_rasft.data.batching import Seq
from megatron_rasft.model.provider import unwrap
from megatron_rasft.parallel.groups import barrier, rank0
from megatron_rasft.records import RoundStart, write_atomic
from megatron_rasft.rundir import RunDir, expert_key


PROBE_PREFIX = 8  # round-specific tokens in front of the refresh probe (1 in |pool|^8 to repeat)


class PolicyProbe:
    """The policy side of the rounds of one run.

    models: the run's `engine.model` models (`policy`, `reference`, `hf_config`); groups: its
    `ParallelGroups`; data: the `train.data` dataset (`prompt_ids`, `experts`, `pad_id`); run: the
    `RunDir`; model_cfg: the `ModelConfig` (export, seq_length, vocab_size); tokenizer_dir: copied
    into the export; micro_batch_size: of the scoring passes; selection: the `SelectionConfig`;
    seed: train.seed; train_iters: the run's steps (the `released` band moves with the step);
    server: the `ServerConfig` (`weight_sync`, `bucket_mib`; None: disk).
    """

    def __init__(self, models, groups, data, run: RunDir, model_cfg, *, tokenizer_dir, micro_batch_size: int,
                 selection, seed: int, train_iters: int, server=None):
        self.models, self.groups, self.data, self.run, self.model_cfg = models, groups, data, run, model_cfg
        self.tokenizer_dir, self.micro_batch_size = tokenizer_dir, micro_batch_size
        self.selection, self.seed, self.train_iters = selection, seed, train_iters
        self.transfer = server is not None and server.weight_sync == "transfer"
        self.bucket_mib = server.bucket_mib if server is not None else 0.0

    def start(self, r: int, problem_ids: list, step: int, hard_pool: dict) -> tuple[RoundStart, float]:
        """Round `r` at its window boundary: export, probe, selection (from `step` and `hard_pool`)
        -> (its `RoundStart`, the export's seconds). Collective. With `weight_sync = "transfer"`
        the export is written only when there is none yet: it is what a (re)started server loads
        before the transfer (`Rounds._push`) brings the round's weights."""
        t0 = time.time()
        hf_dir = self.run.policy_export
        if not (self.transfer and (hf_dir / "config.json").is_file()):
            hf_dir = self.export()
        export_s = time.time() - t0
        probe_ids, probe_logp = self.refresh_probe(r)
        sel = self.select(r, problem_ids, step, hard_pool)
        return RoundStart(r, list(problem_ids), str(hf_dir), probe_ids, probe_logp, **sel), export_s

    def export(self) -> Path:
        """The policy, exported to RUN/hf/policy for the rollout server -> that folder. Collective."""
        from megatron_rasft.convert.export import export_to_hf

        out = self.run.policy_export
        export_to_hf(unwrap(self.models.policy), out, self.model_cfg, self.groups,
                     hf_config=self.models.hf_config, tokenizer_dir=self.tokenizer_dir)
        return out

    def refresh_probe(self, r: int) -> tuple[list, list]:
        """(probe token ids, their log-probs under the current policy) for round `r`: a prompt the
        server has not served before, so that no cached KV of older weights can answer it —
        PROBE_PREFIX tokens drawn with seed (train.seed, r) from the first prompts' own tokens,
        then the first problem's prompt; cut to seq_length. Collective."""
        from megatron_rasft.engine.refpass import score

        pids = sorted(self.data.prompt_ids)
        pool = sorted({t for pid in pids[:16] for t in self.data.prompt_ids[pid]})
        rng = random.Random(f"{self.seed}/probe/{r}")
        prefix = [rng.choice(pool) for _ in range(PROBE_PREFIX)]
        ids = (prefix + list(self.data.prompt_ids[pids[0]]))[: self.model_cfg.seq_length]
        got = score(unwrap(self.models.policy), [Seq("probe", ids, 0)], self.groups, micro_batch_size=1,
                    seq_length=self.model_cfg.seq_length, pad_id=self.data.pad_id,
                    vocab_size=self.model_cfg.vocab_size)
        return ids, got["probe"]

    def select(self, r: int, problem_ids: list, step: int, hard_pool: dict) -> dict:
        """Round `r`'s selection -> {"rollout", "probes_retrain", "probes_rollout", "hard_pool"
        (the pool after it)}; `hard_pool` itself is left as it was. Collective (`released`)."""
        if self.selection.rule == "all":
            return {"rollout": list(problem_ids), "probes_retrain": [], "probes_rollout": [],
                    "hard_pool": dict(hard_pool)}
        from megatron_rasft.methods.selection import select

        band = self._band()
        pool = dict(hard_pool)
        sel = select(problem_ids, lambda ids: self._score_nll(unwrap(self.models.policy), ids), band,
                     step, self.train_iters, pool, seed=f"{self.seed}/select/{r}",
                     rollout_fraction=self.selection.rollout_fraction,
                     probe_fraction=self.selection.probe_fraction)
        return {**sel, "hard_pool": pool}

    def _score_nll(self, chunks, ids: list) -> dict:
        """Mean response NLL of the expert demonstrations of `ids` under `chunks` (collective)."""
        from megatron_rasft.engine.refpass import score
        from megatron_rasft.methods.selection import mean_nll

        seqs = [self.data.experts[expert_key(i)] for i in ids]
        got = score(chunks, seqs, self.groups, micro_batch_size=self.micro_batch_size,
                    seq_length=self.model_cfg.seq_length, pad_id=self.data.pad_id,
                    vocab_size=self.model_cfg.vocab_size)
        return {i: mean_nll(got[s.key], s.prompt_len) for i, s in zip(ids, seqs)}

    def _band(self):
        """NLL thresholds from the initial model (the frozen reference), computed once per run."""
        from megatron_rasft.methods.selection import Band

        path = self.run.nll_band
        if path.is_file():
            return Band(**json.loads(path.read_text()))
        ids = sorted(self.data.prompt_ids)
        ids = random.Random(self.seed).sample(ids, min(len(ids), 1000))  # as calibrated (ref)
        with self.models.reference_on_device() as reference:  # model.reference_placement
            initial = reference or unwrap(self.models.policy)  # no reference: before any step
            band = Band.calibrate(list(self._score_nll(initial, ids).values()))
        if rank0():  # atomic: a run killed mid-write must not find a torn band on resume
            write_atomic(path, json.dumps(asdict(band)))
        barrier()
        return band
