"""llama.cpp runs lmblocks' GGUF exports as transformers runs the checkpoints.

- Tokenizers of both decoder kinds (gpt2: byte-level BPE; llama: BPE on `▁`-marked text with byte fallback), trained
  on the four Canterbury books: llama.cpp gives the Hugging Face ids on ≥ 299 of the first 300 held-out lines of
  botchan.txt. (None of those starts with a space. On a line that does, the llama kind differs by one `▁`:
  `LlamaTokenizerFast`'s Metaspace adds no `▁` before text that starts with a space, llama.cpp always adds one.)
- Greedy decoding: a tiny GPT-2, LLaMA and Qwen2 (f32) and SmolLM2-135M-Instruct (the real checkpoint fetched by
  `make env`, run in lmblocks' LLaMA) exported f32 give transformers' greedy tokens; exported q8_0, transformers'
  GGUF loader gives them and llama.cpp gives fp32's token wherever fp32 is not near a tie (8-bit activations).
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


def _llama(path: Path, n_ctx: int = 512, **kwargs):
    """A llama.cpp model for `path` (extra buffer types off on CPUs that list AMX: `llama_cpp_model`)."""
    from lmblocks.export_gguf import llama_cpp_model

    return llama_cpp_model(path, n_ctx=n_ctx, n_threads=2, **kwargs)


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


QUESTIONS = ("What is the capital of France?", "Name three colours.")
# llama.cpp's q8_0 matmul rounds activations to 8 bits too (each input row in blocks of 32, as the weights): on
# SmolLM2 the logits move by up to ~2.6 (up to ~25), and the greedy token flips where fp32's top two are within
# ~0.13 (the first answer token of the France question: "The" 0.08 above "L"). Teacher-forced on fp32's answer,
# llama.cpp must pick fp32's token wherever the margin exceeds Q8_0_MARGIN, logits within Q8_0_LOGIT_ERROR.
Q8_0_MARGIN = 0.5
Q8_0_LOGIT_ERROR = 3.5


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct in lmblocks' LLaMA, its tokenizer, and transformers' greedy answers (fp32)."""
    from transformers import AutoTokenizer

    import lmblocks

    if not (SMOLLM2 / "config.json").is_file():
        pytest.skip(f"{SMOLLM2} is fetched by `make env`")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    model = lmblocks.LmbLlamaForCausalLM.from_pretrained(SMOLLM2).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             return_dict=True)["input_ids"] for question in QUESTIONS]
    answers = [_greedy_transformers(model, input_ids, 24) for input_ids in prompts]
    return tokenizer, model, list(zip(prompts, answers))


def test_smollm2_round_trip_f32(smollm2, tmp_path):
    """SmolLM2-135M-Instruct -> lmblocks' LLaMA -> GGUF f32 -> llama.cpp: transformers' greedy answer."""
    from lmblocks.export_gguf import export_to_gguf

    tokenizer, model, cases = smollm2
    llm = _llama(export_to_gguf(model, tokenizer, tmp_path / "smollm2-f32.gguf", "f32"), n_ctx=1024)
    # the chat text, and added special tokens all_special_tokens leaves out, split as the Hugging Face tokenizer does
    for input_ids, _ in cases:
        text = tokenizer.decode(input_ids) + "<file_sep>main.py<filename> 2024"
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text).input_ids
    for input_ids, expected in cases:
        got = _greedy_llama_cpp(llm, input_ids, len(expected), tokenizer.eos_token_id)
        print(f"f32: {tokenizer.decode(got)!r}")
        assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))


def test_smollm2_round_trip_q8_0(smollm2, tmp_path):
    """SmolLM2-135M-Instruct -> lmblocks' LLaMA -> GGUF q8_0. Its tensors are those llama.cpp's own
    `convert_hf_to_gguf.py --outtype q8_0` writes for the Hub folder, byte for byte (checked by hand: the converter
    is not installed with llama-cpp-python). transformers' GGUF loader, which dequantises the weights and computes
    in fp32, gives fp32's greedy answers; llama.cpp (8-bit activations, see Q8_0_MARGIN) gives fp32's token wherever
    fp32 is not close to a tie."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from lmblocks.export_gguf import export_to_gguf

    tokenizer, model, cases = smollm2
    path = export_to_gguf(model, tokenizer, tmp_path / "smollm2-q8_0.gguf", "q8_0")
    dequantised = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    llm = _llama(path, n_ctx=1024, logits_all=True)
    for input_ids, expected in cases:
        assert _greedy_transformers(dequantised, input_ids, len(expected)) == expected
        sequence = input_ids + expected
        with torch.no_grad():
            reference = model(torch.tensor([sequence])).logits[0].numpy()
        llm.reset()
        llm.eval(sequence)
        logits = np.array(llm.scores[: len(sequence)])
        answer = slice(len(input_ids) - 1, len(sequence) - 1)  # the positions that predict the answer
        top_two = np.sort(reference[answer], axis=-1)[:, -2:]
        margin = top_two[:, 1] - top_two[:, 0]
        same = logits[answer].argmax(-1) == reference[answer].argmax(-1)
        error = float(np.abs(logits - reference).max())
        free = _greedy_llama_cpp(llm, input_ids, len(expected), tokenizer.eos_token_id)
        print(f"q8_0: max |logit - fp32| = {error:.2f}; teacher-forced top token = fp32's on {same.sum()}/{same.size} "
              f"(fp32 margins where not: {[round(float(m), 3) for m in margin[~same]]}); free-running: {tokenizer.decode(free)!r}")
        assert error <= Q8_0_LOGIT_ERROR
        assert same[margin > Q8_0_MARGIN].all(), margin[~same]
