"""llama.cpp runs lmblocks' GGUF exports as transformers runs the checkpoints.

- Tokenizers of both decoder kinds (gpt2: byte-level BPE; llama: BPE on `▁`-marked text with byte fallback), trained
  on the four Canterbury books: llama.cpp gives the Hugging Face ids on ≥ 299 of the first 300 held-out lines of
  botchan.txt. (None of those starts with a space. On a line that does, the llama kind differs by one `▁`:
  `LlamaTokenizerFast`'s Metaspace adds no `▁` before text that starts with a space, llama.cpp always adds one.)
- Greedy decoding: a tiny GPT-2, LLaMA and Qwen2 (f32) and SmolLM2-135M-Instruct (the real checkpoint fetched by
  `make env`, run in lmblocks' LLaMA, exported f32 and q8_0) give transformers' greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / ".cache" / "corpus"
SMOLLM2 = REPO_ROOT / ".cache" / "models" / "smollm2-135m-instruct"
BOOKS = ("alice29", "asyoulik", "lcet10", "plrabn12")
PROMPTS = ["It was the best of times, it was the worst", "Alice was beginning to get very tired of"]


def _llama(path: Path, n_ctx: int = 512):
    """A llama.cpp model for `path` (extra buffer types off on CPUs that list AMX: `llama_cpp_model`)."""
    from lmblocks.export_gguf import llama_cpp_model

    return llama_cpp_model(path, n_ctx=n_ctx, n_threads=2)


def _lines(book: str) -> list[str]:
    path = CORPUS / f"{book}.txt"
    if not path.is_file():
        pytest.skip(f"{path} is fetched by `make env`")
    return [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _greedy_llama_cpp(llm, input_ids: list[int], n: int, eos: int | None) -> list[int]:
    out = []
    for token in llm.generate(input_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n or token == eos:
            break
    return out


def _greedy_transformers(model, input_ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([input_ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(input_ids):].tolist()


DECODERS = ["gpt2", "llama", "qwen2"]  # lmblocks.FAMILIES with GGUF_EXPORT


@pytest.fixture(scope="module", params=DECODERS)
def exported(request, tmp_path_factory):
    """A tokenizer of the family's kind trained on the four books, a tiny model of the family, its f32 GGUF."""
    import lmblocks
    from lmblocks.export_gguf import export_to_gguf

    for book in BOOKS:
        _lines(book)
    spec = lmblocks.FAMILIES[request.param]
    kind = spec.tokenizer_kind
    tokenizer = lmblocks.train_tokenizer([str(CORPUS / f"{book}.txt") for book in BOOKS], kind=kind, vocab_size=4096)
    config = spec.config_class.from_preset("tiny", vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = spec.causal_lm_class(config).eval()
    folder = tmp_path_factory.mktemp(spec.name)
    return kind, tokenizer, model, export_to_gguf(model, tokenizer, folder / f"tiny-{spec.name}-f32.gguf", "f32")


def test_llama_cpp_tokenizes_held_out_lines_like_hugging_face(exported):
    kind, tokenizer, _, path = exported
    llm = _llama(path)
    lines = _lines("botchan")[:300]
    same = sum(llm.tokenize(line.encode(), add_bos=False, special=False)
               == tokenizer(line, add_special_tokens=False).input_ids for line in lines)
    print(f"{kind}: llama.cpp tokenizes {same}/300 held-out lines as the Hugging Face tokenizer")
    assert same >= 299


def test_llama_cpp_greedy_tokens_tiny(exported):
    kind, tokenizer, model, path = exported
    llm = _llama(path)
    for prompt in PROMPTS:
        input_ids = tokenizer(prompt).input_ids
        expected = _greedy_transformers(model, input_ids, 16)
        assert _greedy_llama_cpp(llm, input_ids, len(expected), tokenizer.eos_token_id) == expected, (kind, prompt)


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_smollm2_round_trip(tmp_path, outtype):
    """SmolLM2-135M-Instruct -> lmblocks' LLaMA -> GGUF -> llama.cpp: transformers' greedy answer."""
    from transformers import AutoTokenizer

    import lmblocks
    from lmblocks.export_gguf import export_to_gguf

    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is fetched by `make env`")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    model = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2).eval()
    path = export_to_gguf(model, tokenizer, tmp_path / f"smollm2-{outtype}.gguf", outtype)
    llm = _llama(path, n_ctx=1024)
    for question in ("What is the capital of France?", "Name three colours."):
        input_ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]
        expected = _greedy_transformers(model, input_ids, 24)
        got = _greedy_llama_cpp(llm, input_ids, len(expected), tokenizer.eos_token_id)
        print(f"{outtype} {question!r}: {tokenizer.decode(got)!r}")
        assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
