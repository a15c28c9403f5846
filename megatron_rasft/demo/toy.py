"""The demo's toy model and tokenizer, built on the spot (no hub downloads); tests use them too.

`train_tokenizer` trains a sentencepiece BPE on in-code text and saves it in Hugging Face form
(`tokenizer.json` + `tokenizer_config.json`), which both `transformers.AutoTokenizer` and vLLM load.
`make_tiny_model` writes a random-weight `LlamaForCausalLM` (safetensors, config.json,
generation_config.json, tokenizer files) that vLLM can serve.
"""
from __future__ import annotations

import io
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

# A minimal chat template: the rendered prompt ends where the assistant's answer begins.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def addition_solution(a: int, b: int) -> str:
    """Digit-by-digit addition, least significant digit first: `1+7+0=8;2+9+0=11;...;\\boxed{N}`."""
    da, db = str(a)[::-1], str(b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return ";".join(steps) + f";\\boxed{{{a + b}}}"


def arithmetic_corpus(n: int = 2000, seed: int = 0, max_digits: int = 4) -> list[str]:
    """`n` texts `Q:{a}+{b};A:{solution}` with 1..max_digits-digit operands."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
        b = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
        texts.append(f"Q:{a}+{b};A:{addition_solution(a, b)}")
    return texts


def train_tokenizer(out_dir: str | Path, texts: Optional[Iterable[str]] = None,
                    vocab_size: int = 128) -> Path:
    """Train a sentencepiece BPE on `texts` (default: the arithmetic corpus) and save it, in
    Hugging Face form, to `out_dir`. Ids 0..3 are `<unk> <s> </s> <pad>`; `<s>` is prepended."""
    import sentencepiece as spm
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else arithmetic_corpus()
    if not texts:
        raise ValueError("train_tokenizer: `texts` is empty")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        # No dummy "▁" prefix: prompt + completion tokenise like the concatenated text.
        add_dummy_prefix=False, num_threads=1, minloglevel=2,
    )
    # transformers converts the sentencepiece model into a `tokenizers` pipeline; we then make it
    # match sentencepiece exactly (no "▁" prepended to each piece of text, unknown characters
    # -> <unk> rather than silently dropped byte-fallback pieces) and save it as a plain fast
    # tokenizer, the `tokenizer.json` that transformers 5 and vLLM both read verbatim.
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model.getvalue())
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
               "add_eos_token": False, **SPECIAL}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(cfg))
        pipeline = json.loads(AutoTokenizer.from_pretrained(tmp).backend_tokenizer.to_str())
    pipeline["model"].update(byte_fallback=False, unk_token=SPECIAL["unk_token"])
    pipeline["pre_tokenizer"]["prepend_scheme"] = "never"
    pipeline["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "Fuse"}]}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(pipeline)),
                                  model_max_length=1 << 20, chat_template=CHAT_TEMPLATE, **SPECIAL)
    tok.save_pretrained(out_dir)
    # The generic class name, so that transformers 4.x (GPU clusters) loads it as well as 5.x.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir


def make_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path, family: str = "llama",
                    seed: int = 0, **config_overrides) -> Path:
    """Save a random-weight tiny causal LM (fp32 safetensors) plus tokenizer files to `out_dir`.

    Defaults: hidden 128, 2 layers, 4 heads, 2 KV heads, untied embeddings. The head dim
    (hidden / heads = 32) is the smallest vLLM's CPU attention kernel accepts (32, 64, 80, ...). `initializer_range`
    defaults to 0.2 (not 0.02) so that next-token distributions are far from uniform and two seeds
    give clearly different log-probs (tests tell weight versions apart by them).
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if family != "llama":
        raise ValueError(f"make_tiny_model: family must be 'llama', got {family!r}")
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    values = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.2,
                  tie_word_embeddings=False, dtype="float32", bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    values.update(config_overrides)
    config = LlamaConfig(**values)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Sampling defaults the caller did not ask for must not sneak in from here (vLLM applies
    # generation_config.json as defaults): keep it to the token ids.
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def reseed_weights(src_dir: str | Path, out_dir: str | Path, seed: int) -> Path:
    """Copy the tiny model in `src_dir` to `out_dir` with new random weights of the same shapes."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = AutoConfig.from_pretrained(src_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in src_dir.iterdir():
        if f.is_file() and not (out_dir / f.name).exists():
            shutil.copy(f, out_dir / f.name)
    return out_dir
