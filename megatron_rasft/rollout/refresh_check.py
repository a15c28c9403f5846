"""After a weight refresh, prove that the server changed exactly the tensors the trainer changed.

A refresh that left some tensors as they were (a no-op reload, a reload of a subset, an export
missing a layer, a tied LM head whose packed copy was not rebuilt) can serve log-probs within
`refresh_atol` of the new policy whenever the policy moved little, so the probe alone misses it.
This check compares *which* tensors changed on both sides:

- trainer side: the sha256 of each HF tensor of the new weights (`tensor_digest`; the disk path
  reads them from the export, `export_digests`) against those of the weights the server was last
  proven to serve (remembered per server), so a tensor "changed" iff its bytes differ;
- server side: per-parameter digests of the engine's own tensors before and after the refresh
  (`POST /collective_rpc {"method": "weight_digests"}`, `vllm_digest.py`: the parameters' bytes and,
  on CPU, what each packed layer computes; vLLM's `/weight_checker` for a server without our
  extension), keyed by vLLM's internal names (fused `qkv_proj`, `gate_up_proj`);
- HF names map to vLLM's with the served model class's own `hf_to_vllm_mapper` (asked of the
  server: the trainer does not import vLLM), a tied embedding also to the LM head. HF and vLLM tensors are grouped into the smallest sets that map
  onto each other (q, k, v and qkv_proj; embed_tokens and a tied lm_head); a group is expected to
  change iff one of its HF tensors changed, and then every one of its server tensors (every TP
  rank's, every packed copy) must change; a group whose HF tensors are all unchanged, and a server
  tensor no HF tensor maps to, must not change.

Cost (`rollout.server.refresh_check`): "full" digests every tensor on both sides at every refresh
(sha256 of the whole model twice on the server, once on the trainer); "sample" digests
`refresh_check_tensors` groups chosen afresh at each refresh (seeded by the refresh's number, so
every group is checked over the rounds); "off" skips it.

Callable after either weight-sync path: `RefreshCheck.begin(server, hf_names, hf_config, ...)`
before the weights move (it reads the server's digests), then `check.verify(digests)` with the
trainer's digests of `check.hf_names` in the new weights (or `changed=` per HF name), which raises
`RefreshError` naming the stale / unexpected tensors.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

from megatron_rasft.rollout.server import RolloutServer, ServerError, http_json

MODES = ("full", "sample", "off")
PACKED = "#packed"  # vllm_digest.PACKED (not imported: that module is the worker's)
EMPTY_SHA = hashlib.sha256(b"").hexdigest()  # /weight_checker's digest of a weight packed and removed on CPU
SHOWN = 6  # tensor names quoted in an error


def tensor_digest(tensor) -> str:
    """sha256 hex of a tensor's bytes (any dtype/device; made contiguous on CPU first): what the
    trainer compares between two refreshes to know whether a tensor changed."""
    import torch

    return hashlib.sha256(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def export_tensor_names(hf_dir: str | Path) -> list:
    """The tensor names of an HF safetensors checkpoint (its index, else its single file)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    names = []
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    return sorted(names)


def export_digests(hf_dir: str | Path, names: Optional[Sequence[str]] = None) -> dict:
    """{name: `tensor_digest`} of the tensors `names` (None: all) of an HF safetensors checkpoint,
    read one tensor at a time. Raises `RefreshError` for a name the checkpoint lacks."""
    from safetensors import safe_open

    from megatron_rasft.rollout.refresh import RefreshError

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        where = json.loads(index.read_text())["weight_map"]
    else:
        where = {}
        for f in sorted(hf_dir.glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                where.update({k: f.name for k in st.keys()})
    wanted = sorted(where) if names is None else sorted(names)
    missing = [n for n in wanted if n not in where]
    if missing:
        raise RefreshError(f"{hf_dir} has no tensor(s) {missing[:SHOWN]}: the export is partial")
    by_file: dict = {}
    for n in wanted:
        by_file.setdefault(where[n], []).append(n)
    out = {}
    for fname, ns in by_file.items():
        with safe_open(str(hf_dir / fname), "pt") as st:
            for n in ns:
                out[n] = tensor_digest(st.get_tensor(n))
    return out


# ---------------------------------------------------------------------------------------- server side
def _rpc(server: RolloutServer, method: str, timeout_s: float, **kwargs):
    status, body = http_json(f"{server.url}/collective_rpc", {"method": method, "kwargs": kwargs},
                             timeout=timeout_s, method="POST")
    if status != 200 or not isinstance(body, dict):
        raise ServerError(f"POST /collective_rpc {method} -> {status}: {str(body)[:300]}")
    return body["results"]


def server_digests(server: RolloutServer, params: Optional[Sequence[str]] = None,
                   timeout_s: float = 600.0) -> dict:
    """{worker-prefixed key: sha256 hex} of the server's parameters `params` (vLLM names; None:
    all), from every worker (`vllm_digest.WeightDigests.weight_digests`). An attached server that
    fails it (started without our extension) answers with vLLM's `/weight_checker` instead (parameters' bytes only:
    blind to CPU-packed copies; the empty stand-ins of packed weights are dropped). Raises
    `ServerError` when neither answers."""
    names = "null" if params is None else json.dumps(sorted(params))
    try:
        out = {}
        for worker in _rpc(server, "weight_digests", timeout_s, names=names):
            out.update(worker)
        return out
    except ServerError:
        if server.managed:  # ours always loads the extension: a real failure
            raise
    status, body = http_json(f"{server.url}/weight_checker", {"action": "checksum"}, timeout=timeout_s,
                             method="POST")
    if status != 200 or not isinstance(body, dict):
        raise ServerError(f"{server.url} has neither our `weight_digests` worker method nor "
                          f"POST /weight_checker ({status}: {str(body)[:200]}); set "
                          f"rollout.server.refresh_check = \"off\" for this server")
    want = None if params is None else set(params)
    return {k: v for k, v in body["checksums"].items()
            if v != EMPTY_SHA and (want is None or _param(k) in want)}


def _param(key: str) -> str:
    """The vLLM parameter name of a digest key (`dp0:pp0:pcp0:tp0:NAME[#packed]` -> NAME)."""
    return key.rsplit(":", 1)[-1].removesuffix(PACKED)


# ---------------------------------------------------------------------------------------- name map
_MAPPERS: dict = {}


def _vllm_mapper(architecture: str):
    """The `hf_to_vllm_mapper` of vLLM's model class for `architecture` (None: the class has none,
    or vLLM is not installed here, and names are taken as they are). Cached per process."""
    if architecture not in _MAPPERS:
        try:
            from vllm.model_executor.models.registry import ModelRegistry
        except ImportError:
            _MAPPERS[architecture] = None
        else:
            cls = ModelRegistry._try_load_model_cls(architecture)
            _MAPPERS[architecture] = getattr(cls, "hf_to_vllm_mapper", None) if cls is not None else None
    return _MAPPERS[architecture]


@dataclass
class Group:
    """HF tensors and the server parameters they load into, closed under that relation."""

    hf: list
    params: list


def server_name_map(server: RolloutServer, hf_names: Sequence[str], hf_config: dict,
                    timeout_s: float = 600.0) -> dict:
    """{HF name: vLLM parameter name (None: ignored by the model)} from the served model class's
    own `hf_to_vllm_mapper` (`vllm_digest.WeightDigests.weight_name_map`: the trainer need not
    import vLLM); for an attached server without our extension, from vLLM's registry here."""
    try:
        return _rpc(server, "weight_name_map", timeout_s, names=json.dumps(list(hf_names)))[0]
    except ServerError:
        if server.managed:
            raise
    return local_name_map(hf_names, hf_config)


def local_name_map(hf_names: Sequence[str], hf_config: dict) -> dict:
    """`server_name_map` computed in this process from vLLM's model registry (imports vLLM)."""
    mapper = _vllm_mapper((hf_config.get("architectures") or ["?"])[0])
    return {h: (mapper.map_name(h) if mapper is not None else h) for h in hf_names}


def tensor_groups(name_map: Mapping[str, Optional[str]], hf_config: dict, server_params: Sequence[str]) -> list:
    """Split HF tensors (the keys of `name_map`: HF name -> vLLM parameter name, `server_name_map`)
    and server parameters into `Group`s (sorted by first parameter). Raises `RefreshError` when an
    HF tensor maps to no server parameter (the name map is wrong here)."""
    from megatron_rasft.rollout.refresh import RefreshError

    arch = (hf_config.get("architectures") or ["?"])[0]
    params = set(server_params)
    heads = sorted(p for p in params if p.endswith("lm_head.weight"))
    links, unknown = {}, []
    for h, name in name_map.items():
        if name is None:  # vLLM ignores this checkpoint tensor
            continue
        if name not in params:
            unknown.append(f"{h} -> {name}")
            continue
        links[h] = {name}
        if hf_config.get("tie_word_embeddings") and name.endswith("embed_tokens.weight"):
            links[h] |= set(heads)  # the tied LM head computes with the embedding's weight
    if unknown:
        raise RefreshError(f"trainer tensors map to no parameter of the served {arch}: {unknown[:SHOWN]} "
                           f"(rollout.server.refresh_check = \"off\" skips this check)")
    parent = {p: p for p in params}

    def root(p):
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for ps in links.values():
        first, *rest = sorted(ps)
        for p in rest:
            parent[root(p)] = root(first)
    groups: dict = {}
    for p in sorted(params):
        groups.setdefault(root(p), Group([], []))
        groups[root(p)].params.append(p)
    for h, ps in links.items():
        groups[root(next(iter(ps)))].hf.append(h)
    return sorted(groups.values(), key=lambda g: g.params[0])


def pick(groups: list, mode: str, tensors: int, n: int) -> list:
    """The groups checked at a server's refresh number `n`: all ("full", or fewer groups than
    `tensors`), else `tensors` of them drawn with seed n ("sample")."""
    if mode == "full" or len(groups) <= tensors:
        return list(groups)
    chosen = sorted(random.Random(f"refresh-check/{n}").sample(range(len(groups)), tensors))
    return [groups[i] for i in chosen]


# ---------------------------------------------------------------------------------------- the check
@dataclass
class CheckResult:
    """What one refresh's check saw. `checked`: server tensors compared (keys); `skipped`: groups
    whose previous trainer digests were unknown (a server attached, a group a failed refresh moved
    in part, or one another client changed since the last check); `stale`: server tensors that did not change though the trainer changed their
    group; `unexpected`: server tensors that changed though the trainer changed nothing of theirs;
    `missing`: server tensors gone after the refresh; `uncovered`: server tensors no tensor of the
    new weights loads into."""

    mode: str
    checked: int
    skipped: int
    stale: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    uncovered: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.stale or self.unexpected or self.missing or self.uncovered)

    def problems(self) -> str:
        """The failure, in words (empty when ok)."""
        out = []
        for what, keys in (("did not change although the trainer changed them", self.stale),
                           ("changed although the trainer did not change them", self.unexpected),
                           ("are gone", self.missing),
                           ("have no tensor in the new weights (a partial export)", self.uncovered)):
            if keys:
                out.append(f"{len(keys)} of {self.checked} server tensors {what}: {keys[:SHOWN]}"
                           + (" ..." if len(keys) > SHOWN else ""))
        return "; ".join(out)

    def summary(self) -> str:
        skipped = f", {self.skipped} groups unchecked (previous weights unknown)" if self.skipped else ""
        return f"{self.checked} server tensors checked ({self.mode}){skipped}"


@dataclass
class _Served:
    """Per server: how many refreshes it has had, and the trainer digests of what it serves
    (None: unknown)."""

    n: int = 0
    digests: Optional[dict] = None
    server: Optional[dict] = None  # its own digests after that refresh (None: not read yet)


def _served(server: RolloutServer) -> _Served:
    state = getattr(server, "refresh_served", None)
    if state is None:
        state = server.refresh_served = _Served()
        if server.model_dir is not None and Path(server.model_dir).is_dir():
            state.digests = {}  # the folder it was started on, read when first needed
    return state


class RefreshCheck:
    """One refresh's tensor check; see the module docstring. Create with `begin`."""

    def __init__(self, server: RolloutServer, mode: str, groups: list, hf_names: list, before: dict,
                 timeout_s: float, following: list = ()):
        self.server, self.mode, self.groups, self.following = server, mode, groups, list(following)
        self.hf_names = hf_names  # whose trainer digests `verify` needs (this refresh's and the next's)
        self.before, self.timeout_s = before, timeout_s

    @classmethod
    def begin(cls, server: RolloutServer, hf_names: Sequence[str], hf_config: dict, mode: str = "full",
              tensors: int = 64, timeout_s: float = 600.0) -> Optional["RefreshCheck"]:
        """Before the weights move: choose the groups (`pick`) and read the server's digests of
        their parameters. hf_names: every tensor name of the new weights; hf_config: their
        config.json dict. None when mode is "off". Raises `ServerError` when the server does not
        answer, `RefreshError` when the names do not map."""
        if mode == "off":
            return None
        if mode not in MODES:
            raise ValueError(f"rollout.server.refresh_check must be one of {MODES}, got {mode!r}")
        state = _served(server)
        params = sorted({_param(k) for k in server_digest_keys(server, timeout_s)})
        groups = tensor_groups(server_name_map(server, hf_names, hf_config, timeout_s), hf_config, params)
        now = pick(groups, mode, tensors, state.n)
        nxt = pick(groups, mode, tensors, state.n + 1)
        names = sorted({h for g in now + nxt for h in g.hf})
        if state.digests == {} and server.model_dir is not None:
            # First refresh of a server: it serves the folder it was started on (read before the
            # weights move: a new export may replace that very folder).
            start = Path(server.model_dir)
            present = set(export_tensor_names(start)) if start.is_dir() else set()
            state.digests = export_digests(start, [h for h in names if h in present])
        before = server_digests(server, [p for g in now for p in g.params], timeout_s)
        return cls(server, mode, now, names, before, timeout_s, nxt)

    def verify(self, digests: Optional[Mapping[str, str]] = None, *,
               changed: Optional[Mapping[str, bool]] = None) -> CheckResult:
        """After the weights moved: compare the server's digests with those of `begin`.

        digests: {HF name: `tensor_digest`} of the new weights for (at least) `self.hf_names`;
        or changed: {HF name: whether it changed since the server's previous refresh} for this
        refresh's groups (then nothing is remembered for the next refresh's).
        Returns the `CheckResult`; raises `RefreshError` naming the stale / unexpected tensors. Either
        way it remembers what the server now serves: a group that did not move at all still holds
        the previous weights, a group that moved in part is unknown (skipped by later checks)."""
        from megatron_rasft.rollout.refresh import RefreshError

        state = _served(self.server)
        if changed is None:
            if digests is None:
                raise ValueError("RefreshCheck.verify needs digests= or changed=")
            changed = self._changed(state, digests)
        after = server_digests(self.server, sorted({p for g in self.groups + self.following for p in g.params}),
                               self.timeout_s)
        res = CheckResult(self.mode, 0, 0)
        served = dict(digests) if digests is not None else None  # trainer digests of what it now serves
        old = state.digests or {}
        for g in self.groups:
            if not g.hf:  # server tensors the new weights have no tensor for
                res.uncovered += [k for k in self.before if _param(k) in g.params]
                res.checked += sum(_param(k) in g.params for k in self.before)
                continue
            keys = [k for k in self.before if _param(k) in g.params]
            # Skipped: previous trainer digests unknown, or the server's tensors are not those it
            # had after our last check (another client refreshed it since).
            if any(h not in changed for h in g.hf) or (
                    state.server is not None and any(state.server.get(k) != self.before[k] for k in keys)):
                res.skipped += 1
                continue
            expect = any(changed[h] for h in g.hf)
            moved = []
            for key in sorted(k for k in self.before if _param(k) in g.params):
                res.checked += 1
                moved.append(key in after and after[key] != self.before[key])
                if key not in after:
                    res.missing.append(key)
                elif moved[-1] != expect:
                    (res.stale if expect else res.unexpected).append(key)
            if served is not None and expect and not any(moved):  # it still serves the old tensors
                served.update({h: old[h] for h in g.hf})
            elif served is not None and expect != all(moved):  # a mix: unknown from now on
                for h in g.hf:
                    served.pop(h, None)
        state.n += 1
        state.digests, state.server = served, after
        if not res.ok:
            raise RefreshError(f"refresh of {self.server.url} is stale or partial: {res.problems()}")
        return res

    def _changed(self, state: _Served, digests: Mapping[str, str]) -> dict:
        """{HF name: changed} for this refresh's groups, against what the server was last proven to
        serve (the folder it was started on, at its first refresh); names without a known
        previous digest are left out."""
        wanted = [h for g in self.groups for h in g.hf]
        missing = [h for h in wanted if h not in digests]
        if missing:
            raise ValueError(f"RefreshCheck.verify: no trainer digest for {missing[:SHOWN]}")
        old = state.digests or {}
        return {h: old[h] != digests[h] for h in wanted if h in old}


def forget_served(server: RolloutServer) -> None:
    """What `server` serves is unknown (e.g. it is being restarted and fully re-sent): its next
    check skips every group and learns the trainer digests for the ones after."""
    old = getattr(server, "refresh_served", None)
    server.refresh_served = _Served(n=old.n if old is not None else 0, digests=None)


def remember_served(server: RolloutServer, hf_dir: str | Path, mode: str = "full", tensors: int = 64,
                    timeout_s: float = 600.0) -> None:
    """The server was (re)started on `hf_dir`: remember the trainer digests the next check needs
    (read now: the next export may replace that folder before the next refresh), and the server's
    own digests of those tensors, so that a refresh by another client before our next check (a
    server shared with other processes) is seen as such and skipped, not taken for a stale one."""
    if mode == "off":
        return
    old = getattr(server, "refresh_served", None)
    state = server.refresh_served = _Served(n=old.n if old is not None else 0)
    params = sorted({_param(k) for k in server_digest_keys(server, timeout_s)})
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    groups = tensor_groups(server_name_map(server, export_tensor_names(hf_dir), config, timeout_s), config, params)
    picked = pick(groups, mode, tensors, state.n)
    state.digests = export_digests(hf_dir, sorted({h for g in picked for h in g.hf}))
    state.server = server_digests(server, sorted({p for g in picked for p in g.params}), timeout_s)


def server_digest_keys(server: RolloutServer, timeout_s: float = 600.0) -> list:
    """Every digest key the server has, without computing digests (`weight_digest_keys`); a
    server without our extension computes them all (`/weight_checker`)."""
    try:
        return sorted(k for worker in _rpc(server, "weight_digest_keys", timeout_s) for k in worker)
    except ServerError:
        if server.managed:
            raise
    return sorted(server_digests(server, None, timeout_s))
