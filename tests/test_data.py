"""Problems JSONL, prompt rendering, over-long handling, tokenizer checks and packing."""
import json

import pytest

from megatron_rasft.data.batching import Seq, make_rows, stack_microbatches
from megatron_rasft.data.problems import read_problems
from megatron_rasft.data.tokenize import Counts, build_sequence, check_tokenizer, render_prompt


def _write(tmp_path, lines):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(l + "\n" for l in lines))
    return p


def test_read_problems_fields_and_ids(tmp_path):
    p = _write(tmp_path, [json.dumps({"prompt": "Q1", "response": "x \\boxed{3}"}),
                          "",
                          json.dumps({"instruction": "Q2", "response": "y", "answer": 7, "id": "b"}),
                          json.dumps({"q": "Q3", "sol": "z \\boxed{\\frac{1}{2}}"})])
    with pytest.raises(ValueError, match="p.jsonl:4: missing or empty prompt field 'prompt'"):
        read_problems(p)
    p = _write(tmp_path, p.read_text().splitlines()[:3])
    probs = read_problems(p)
    assert [x.id for x in probs] == ["0", "b"]
    assert probs[0].answer == "3" and probs[1].answer == "7" and probs[1].prompt == "Q2"
    q = _write(tmp_path, [json.dumps({"q": "Q3", "sol": "z \\boxed{\\frac{1}{2}}"})])
    assert read_problems(q, prompt_field="q", response_field="sol")[0].answer == "\\frac{1}{2}"


@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "a", "response": "b"', "p.jsonl:2: malformed JSON"),
    ('[1, 2]', "p.jsonl:2: expected a JSON object"),
    ('{"prompt": "a", "response": ""}', "p.jsonl:2: missing or empty response field 'response'"),
    ('{"prompt": "a"}', "p.jsonl:2: missing or empty response field"),
    ('{"prompt": "a", "response": "b", "id": "0"}', "p.jsonl:2: duplicate problem id '0'"),
])
def test_bad_problem_lines_name_the_line(tmp_path, line, msg):
    p = _write(tmp_path, [json.dumps({"prompt": "ok", "response": "fine"}), line])
    with pytest.raises(ValueError) as e:
        read_problems(p)
    assert msg in str(e.value)


def test_overlong_truncate_drop_and_prompt_too_long():
    c = Counts()
    assert build_sequence([1, 2], [3, 4, 5], 9, max_len=10, overlong="drop", counts=c, key="a") == ([1, 2, 3, 4, 5, 9], 2)
    assert build_sequence([1, 2], [3] * 20, 9, max_len=10, overlong="truncate", counts=c, key="b") == ([1, 2] + [3] * 8, 2)
    assert build_sequence([1, 2], [3] * 20, 9, max_len=10, overlong="drop", counts=c, key="c") is None
    assert build_sequence([1] * 9, [3], 9, max_len=10, overlong="truncate", counts=c, key="d") is None
    assert (c.truncated, c.dropped_overlong, c.dropped_prompt_too_long) == (1, 1, 1)
    assert "1 truncated" in c.summary()


def test_templates_and_tokenizer_check(tmp_path):
    from transformers import AutoTokenizer

    from helpers.tiny import train_tokenizer

    tok = AutoTokenizer.from_pretrained(str(train_tokenizer(tmp_path / "tok")))
    assert render_prompt(tok, "Q:1+1;A:", "plain") == "Q:1+1;A:"
    assert render_prompt(tok, "hi", "released") == (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # `chat` is the tokenizer's own template with the generation prompt: the tiny tokenizer's is BOS +
    # the text; a ChatML template must end with the opened assistant turn.
    assert render_prompt(tok, "hi", "chat") == "<s>hi"
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert render_prompt(tok, "hi", "chat") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, "hi", "chat")
    check_tokenizer(tok, vocab_size=len(tok))
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        check_tokenizer(tok, vocab_size=len(tok) - 1)


def test_padding_rows_and_packing():
    a = Seq("a", [5, 6, 7, 8], 2, weight=0.5, ref_logp=[-1.0, -2.0, -3.0])
    b = Seq("b", [9, 10, 11], 1, weight=2.0)
    rows = make_rows([a, b], seq_length=8, pad_id=0, pack=False)
    assert len(rows) == 2
    r = rows[0]
    assert r["tokens"][:3].tolist() == [5, 6, 7] and r["labels"][:3].tolist() == [6, 7, 8]
    assert r["loss_mask"].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]  # labels 7, 8 are the response
    assert r["seq_weight"][1].item() == 0.5 and r["ref_logp"][:3].tolist() == [-1.0, -2.0, -3.0]
    packed = make_rows([a, b], seq_length=8, pad_id=0, pack=True)
    assert len(packed) == 1
    p = packed[0]
    assert p["seq_id"].tolist() == [0, 0, 0, 1, 1, -1, -1, -1]
    assert p["position_ids"].tolist()[:5] == [0, 1, 2, 0, 1]
    m = p["attention_mask"][0]
    assert not m[4, 3] and m[3, 2] and m[1, 2]  # b attends to itself causally, never to a or the future
    mbs = stack_microbatches(packed, micro_batch_size=2, seq_length=8, pad_id=0)
    assert mbs[0]["tokens"].shape == (2, 8) and mbs[0]["loss_mask"][1].sum() == 0
    with pytest.raises(ValueError, match="more than model.seq_length"):
        make_rows([Seq("c", list(range(12)), 1)], seq_length=8, pad_id=0, pack=False)


def test_grpo_columns_only_when_carried():
    a = Seq("a", [5, 6, 7, 8], 2, old_logp=[-1.0, -2.0, -3.0], advantage=-0.5, rollout_logp=[-1.5, -2.5, -3.5])
    b = Seq("b", [9, 10, 11], 1, old_logp=[-4.0, -5.0], advantage=1.25)
    for pack in (False, True):
        rows = make_rows([a, b], seq_length=8, pad_id=0, pack=pack)
        mbs = stack_microbatches(rows, micro_batch_size=4, seq_length=8, pad_id=0)  # filled with empty rows
        mb = mbs[0]
        assert {"old_logp", "advantage", "rollout_logp"} <= set(mb)
        assert all(mb[k].shape == (4, 8) for k in ("old_logp", "advantage", "rollout_logp"))
        assert mb["old_logp"][0, :3].tolist() == [-1.0, -2.0, -3.0]
        b_row, b_at = (1, 0) if not pack else (0, 3)
        assert mb["advantage"][0, :3].tolist() == [-0.5] * 3 and mb["advantage"][0, 5 if pack else 3:].abs().sum() == 0
        assert mb["advantage"][b_row, b_at:b_at + 2].tolist() == [1.25, 1.25]
        assert mb["old_logp"][b_row, b_at:b_at + 2].tolist() == [-4.0, -5.0]
        assert mb["rollout_logp"][b_row, b_at:b_at + 2].isnan().all()  # b's server log-probs unknown
        assert mb["rollout_logp"][0, :3].tolist() == [-1.5, -2.5, -3.5]
    plain = make_rows([Seq("c", [1, 2, 3], 1)], seq_length=8, pad_id=0, pack=False)
    assert not {"old_logp", "advantage", "rollout_logp"} & set(plain[0])
    with pytest.raises(ValueError, match="sequence a: old_logp has 2 values, needs 3"):
        make_rows([Seq("a", [5, 6, 7, 8], 2, old_logp=[-1.0, -2.0])], seq_length=8, pad_id=0, pack=False)
