"""Build the checkpoints the serving tests serve, and what transformers computes on them.

Runs in lmblocks' own venv (transformers 5.23, lmblocks installed): `python build_checkpoints.py OUT_DIR`. Writes
`OUT_DIR/<family>/` for every family of `lmblocks.FAMILIES` (tiny models saved by lmblocks with their code and a
tokenizer of the family's kind trained by lmblocks) and `OUT_DIR/expected.json`: the greedy tokens of transformers'
`generate` for a batch of prompts (decoders) and the CLS embeddings of the base model (encoders). The tests then load the folders where lmblocks is not installed.

Shapes: head size 64 (vLLM's CPU attention kernels take 32, 64, 80, ... but not 16). Weights are initialised with a
large std (0.3) so that a random model's next-token distribution is peaked: greedy tokens depend on the prompt and
positions, and near-ties (which a different but correct kernel could break the other way) are rare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import lmblocks

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / ".cache" / "corpus" / "botchan.txt"  # fetched by `make env`
PROMPTS = [
    "The cat sat on the",
    "Once upon a time there was",
    "I am a",
    "He said that the school master had a long red nose and",
]
EMBED_TEXTS = ["The cat sat on the mat.", "A short one.", "He said that the school master had a long red nose."]
MAX_NEW_TOKENS = 16
INIT_STD = 0.3


# Every family's shapes, in transformers' common names (each config reads its own through `attribute_map`); a field
# a family does not have is left out. Grouped-query attention where there is one: 2 query heads share 1 key-value head.
SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=256, initializer_range=INIT_STD)


def _config(spec, tokenizer):
    fields = spec.config_class.__dataclass_fields__
    sizes = {spec.config_class.attribute_map.get(name, name): value for name, value in SIZES.items()}
    return spec.config_class.from_preset("tiny", **{name: value for name, value in sizes.items() if name in fields},
                                         **lmblocks.config_kwargs_from_tokenizer(tokenizer))


def served_families() -> dict[str, list[str]]:
    """What the serving tests cover: every decoder generates, every encoder embeds."""
    return {"decoders": [name for name, spec in lmblocks.FAMILIES.items() if spec.is_decoder],
            "encoders": [name for name, spec in lmblocks.FAMILIES.items() if not spec.is_decoder]}


def _greedy(model, tokenizer) -> list[list[int]]:
    """transformers' generate on the prompts as one left-padded batch; eos is held back (min_new_tokens) so every
    row has MAX_NEW_TOKENS tokens, as vLLM's `min_tokens` does."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # GPT-2's and LLaMA's tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def _cls_embeddings(model, tokenizer) -> list[list[float]]:
    """LmbBertModel's last hidden state at [CLS], L2-normalised: vLLM's default pooling for an embedding model."""
    batch = tokenizer(EMBED_TEXTS, return_tensors="pt", padding=True)
    hidden = model(**batch).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(hidden, dim=-1).tolist()


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    expected: dict[str, dict] = {}
    for family, spec in lmblocks.FAMILIES.items():
        path = out_dir / family
        tokenizer = lmblocks.train_tokenizer(str(CORPUS), spec.tokenizer_kind, vocab_size=512, show_progress=False)
        config = _config(spec, tokenizer)
        # An embedding model is the base model, as sentence-transformers folders hold it.
        model = (spec.causal_lm_class if spec.is_decoder else spec.base_class)(config).eval()
        model.save_pretrained(path)
        lmblocks.save_tokenizer(tokenizer, path)
        with torch.no_grad():
            if spec.is_decoder:
                expected[family] = {"prompts": PROMPTS, "tokens": _greedy(model, tokenizer)}
            else:
                expected[family] = {"texts": EMBED_TEXTS, "cls_embeddings": _cls_embeddings(model, tokenizer)}
    (out_dir / "expected.json").write_text(json.dumps(expected))


if __name__ == "__main__":
    if sys.argv[1:] == ["--families"]:  # for the tests' parametrisation (conftest.py)
        print(json.dumps(served_families()))
    else:
        main(Path(sys.argv[1]))
