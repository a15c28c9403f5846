"""One stop-token rule for rounds, the `rollout` command and `eval` (issue #22): its precedence over
real tokenizer files laid out like Qwen2.5 base/instruct, Llama 3 and a base model without a chat
template; eval of a ChatML model whose generation config lists only `<|endoftext|>` no longer
grades an invented next turn; and through the session's vLLM server, eval's request stops at the
chat template's end-of-turn id."""
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from megatron_rasft.config import SamplingConfig
from megatron_rasft.rollout.stage import round_sampling
from megatron_rasft.rollout.stops import end_of_turn_id, stop_token_ids

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory) -> Path:
    from helpers.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok") / "base")


def _layout(base: Path, out: Path, specials: list, eos: str, template, gen_eos: list = None) -> Path:
    """A tokenizer directory: the trained BPE plus `specials` (added special tokens), `eos`, a chat
    template (or none) and, when `gen_eos` names tokens, a generation_config.json listing them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = eos
    tok.chat_template = template
    tok.save_pretrained(out)
    if gen_eos is not None:
        ids = [tok.convert_tokens_to_ids(t) for t in gen_eos]
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ids if len(ids) > 1 else ids[0]}))
    return out


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def test_rule_precedence_over_tokenizer_files(base_tokenizer, tmp_path):
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Qwen2.5 base: EOS <|endoftext|>, ChatML template, generation config lists <|endoftext|> only.
    qb = _tok(_layout(base_tokenizer, tmp_path / "qwen_base", chatml, "<|endoftext|>", CHATML, ["<|endoftext|>"]))
    eot, im_end = qb.convert_tokens_to_ids("<|endoftext|>"), qb.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_id(qb) == im_end
    assert stop_token_ids(qb) == [eot, im_end]
    # Configured ids come first; nothing is dropped or replaced.
    assert stop_token_ids(qb, configured=[7]) == [7, eot, im_end]
    # Rounds (and the `rollout` command, which calls the same stage) use the rule.
    assert round_sampling(SamplingConfig(), 2, qb).stop_token_ids == [eot, im_end]
    # Qwen2.5 instruct: EOS <|im_end|>, generation config [<|im_end|>, <|endoftext|>].
    qi = _tok(_layout(base_tokenizer, tmp_path / "qwen_instruct", chatml, "<|im_end|>", CHATML,
                      ["<|im_end|>", "<|endoftext|>"]))
    assert stop_token_ids(qi) == [im_end, eot]
    # Llama 3: the template's end of turn (<|eot_id|>) is not ChatML and not the EOS.
    llama = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    ll = _tok(_layout(base_tokenizer, tmp_path / "llama3", llama, "<|end_of_text|>", LLAMA3))
    assert stop_token_ids(ll) == [ll.convert_tokens_to_ids("<|end_of_text|>"), ll.convert_tokens_to_ids("<|eot_id|>")]
    assert round_sampling(SamplingConfig(), 0, ll).stop_token_ids == stop_token_ids(ll)
    # A base model without a chat template: EOS, then its generation config's ids (which do not
    # replace the EOS, even when they leave it out).
    bare = _tok(_layout(base_tokenizer, tmp_path / "bare", ["<|endoftext|>", "<|fim_pad|>"], "<|endoftext|>", None,
                        ["<|fim_pad|>"]))
    assert end_of_turn_id(bare) is None
    assert stop_token_ids(bare) == [bare.eos_token_id, bare.convert_tokens_to_ids("<|fim_pad|>")]
    # The toy tokenizer: its template ends a turn with the EOS itself.
    toy = _tok(base_tokenizer)
    assert stop_token_ids(toy) == [toy.eos_token_id]
    # Bad input is named.
    with pytest.raises(ValueError, match="rollout.sampling.stop_token_ids"):
        stop_token_ids(qb, configured=[10 ** 6])
    (tmp_path / "qwen_base" / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ValueError, match="qwen_base/generation_config.json"):
        stop_token_ids(_tok(tmp_path / "qwen_base"))


def test_eval_of_a_chatml_base_model_stops_at_the_end_of_turn(base_tokenizer, tmp_path):
    """The issue's case: the model answers 2, then writes an invented next turn answering 7. vLLM's
    rules are applied by the fake (a stop id ends the sample; stop strings match the text decoded
    without special tokens, so "<|im_end|>" never does)."""
    from megatron_rasft.eval.runner import evaluate
    from megatron_rasft.rollout.client import Completion

    tok_dir = _layout(base_tokenizer, tmp_path / "qwen_base", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      "<|endoftext|>", CHATML, ["<|endoftext|>"])
    tok = _tok(tok_dir)
    script = ("1+1=2;\\boxed{2}<|im_end|>\n<|im_start|>user\nQ:3+4<|im_end|>\n<|im_start|>assistant\n"
              "3+4=7;\\boxed{7}<|im_end|><|endoftext|>")
    ids = tok(script, add_special_tokens=False)["input_ids"]
    requests = []

    def vllm_like(prompts, sampling, keys=None, on_result=None):
        requests.append(sampling)
        stops = set(sampling.stop_token_ids) | {tok.eos_token_id}
        cut = next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids))
        text = tok.decode(ids[:cut], skip_special_tokens=True)
        for s in sampling.stop:
            text = text.split(s)[0]
        out = [[Completion(text, ids[:cut], [-1.0] * cut, "stop", 0)] * sampling.n for _ in prompts]
        for i, c in enumerate(out):
            on_result(i, c)
        return out

    res = evaluate(vllm_like, {"toy": [{"prompt": "Q:1+1", "answer": "2"}]}, SamplingConfig(n=1, max_tokens=64),
                   tmp_path / "eval", template="qwen25-math-cot", tokenizer=str(tok_dir), report=False)
    row = json.loads((tmp_path / "eval" / "samples" / "toy.jsonl").read_text())
    assert (row["extracted"], row["correct"], res["toy"]["avg@n"]) == ("2", True, 1.0)
    assert requests[0].stop_token_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_eval_request_stops_at_the_end_of_turn_id_through_the_server(vllm_server, tmp_path):
    """The session server's model emits some token t often. A tokenizer that declares t a special
    token and ends assistant turns with it (as ChatML does with <|im_end|>) makes eval's requests
    stop there: every sample that holds t ends with it, where without the stop id samples ran on."""
    from megatron_rasft.eval.runner import evaluate
    from megatron_rasft.rollout.client import RolloutClient

    client = RolloutClient(vllm_server, vllm_server.cfg, progress=False)
    sampling = SamplingConfig(n=8, max_tokens=24, temperature=1.0, seed=11)
    tok = _tok(vllm_server.model_dir)
    special = set(tok.all_special_ids)
    prompt = tok("Q:12+34;A:")["input_ids"]
    free = [c.token_ids for c in client.generate([prompt], sampling)[0]]
    t = Counter(x for ids in free for x in ids[:-1] if x not in special).most_common(1)[0][0]
    assert any(t in ids[:-1] for ids in free)  # without a stop id, samples run past t

    # The client's tokenizer: t made a special token that ends an assistant turn.
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(vllm_server.model_dir) / f).exists():
            shutil.copy(Path(vllm_server.model_dir) / f, tok_dir / f)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    piece = tok.convert_ids_to_tokens(t)
    spec["added_tokens"].append({"id": t, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                                 "normalized": False, "special": True})
    (tok_dir / "tokenizer.json").write_text(json.dumps(spec))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                            "{% if m['role'] == 'assistant' %}{{ " + json.dumps(piece) + " }}{% endif %}{% endfor %}")
    cfg.setdefault("added_tokens_decoder", {})[str(t)] = {"content": piece, "special": True, "lstrip": False,
                                                         "rstrip": False, "normalized": False, "single_word": False}
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert end_of_turn_id(_tok(tok_dir)) == t

    seen = []

    def recording(prompts, sampling, keys=None, on_result=None):
        def keep(i, comps):
            seen.extend(comps)
            on_result(i, comps)
        return client.generate(prompts, sampling, keys=keys, on_result=keep)

    evaluate(recording, {"toy": [{"prompt": "Q:12+34;A:", "answer": "46"}, {"prompt": "Q:5+8;A:", "answer": "13"}]},
             sampling, tmp_path / "eval", template="chat", tokenizer=str(tok_dir), report=False)
    holding = [c for c in seen if t in c.token_ids]
    assert len(seen) == 16 and holding, Counter(x for c in seen for x in c.token_ids)
    assert all(c.token_ids[-1] == t and c.finish_reason == "stop" for c in holding)
