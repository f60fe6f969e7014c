"""GGUF export (`lmblocks.export_gguf`, `scripts/export.py --format gguf`) read back by transformers' own GGUF loader.

For every decoder family (GPT-2, LLaMA, Qwen2): `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` computes the logits of
the lmblocks model whose weights went through the same storage type (f32: the model itself, ≤ 1e-5; f16, bf16,
q8_0: the weights rounded as stored), and `AutoTokenizer.from_pretrained(folder, gguf_file=...)` gives the same ids.
llama.cpp itself runs in `make test-gguf` (tests_gguf/); here a line-by-line port of llama.cpp's SentencePiece
merge loop checks that the scores written for the llama kind reproduce the BPE on held-out lines.
"""

from __future__ import annotations

import heapq
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lmblocks import train_tokenizer  # noqa: E402
from lmblocks.export import ExportError  # noqa: E402
from lmblocks.export_gguf import OUTTYPES, export_to_gguf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from families import BERT, DECODERS, GPT2, LLAMA  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = REPO_ROOT / ".cache" / "corpus"
SAMPLES = [
    "It was the best of times, it was the worst of times.",
    "Alice was beginning to get very tired of sitting by her sister on the bank,",
    "numbers 1234 and 56, punctuation -- (parentheses) \"quotes\"; and naïve café, Straße, 東京 😀",
    "  two leading spaces, and   inner runs   of spaces",
]


def _lines(book: str) -> list[str]:
    path = CORPUS / f"{book}.txt"
    if not path.is_file():
        pytest.skip(f"{path} is fetched by `make env` (scripts/fetch_assets.py)")
    return [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """A tiny model of each decoder family with a tokenizer of its kind trained on one book, exported in every
    outtype."""
    torch.manual_seed(0)
    texts = _lines("alice29")
    out = {}
    for family in DECODERS:
        tokenizer = train_tokenizer(iter(texts), kind=family.tokenizer_kind, vocab_size=600)
        # transformers' GGUF loader reads GPT-2's context length into `n_ctx`, not `n_positions`, so its model has
        # 1024 positions whatever the file says: the tiny GPT-2 has 1024 to load there.
        extra = {"n_positions": 1024} if family is GPT2 else {}
        config = family.tiny_config(vocab_size=len(tokenizer) + 8, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=None, **extra)
        model = family.causal_lm_class(config).eval()
        folder = tmp_path_factory.mktemp(f"gguf_{family.name}")
        files = {outtype: export_to_gguf(model, tokenizer, folder / f"tiny-{outtype}.gguf", outtype).name
                 for outtype in OUTTYPES}
        out[family.name] = dict(model=model, tokenizer=tokenizer, folder=folder, files=files)
    return out


def _as_stored(model, outtype: str):
    """A copy of `model` whose weights went through the GGUF storage type (1-D tensors stay f32, as written)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    stored = type(model)(model.config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if outtype != "f32" and array.ndim > 1:
            qtype = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0 if array.shape[-1] % 32 == 0 else Q.F16}[outtype]
            if qtype == Q.F16:
                array = array.astype(np.float16).astype(np.float32)
            else:
                array = quants.dequantize(quants.quantize(array, qtype), qtype)
        state[name] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    stored.load_state_dict(state)
    return stored


@pytest.mark.parametrize("outtype", OUTTYPES)
@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_transformers_gguf_loader_reproduces_the_logits(exported, family, outtype):
    entry = exported[family.name]
    loaded = AutoModelForCausalLM.from_pretrained(entry["folder"], gguf_file=entry["files"][outtype]).eval()
    assert type(loaded).__module__.startswith("transformers.models."), type(loaded)  # transformers' own class
    input_ids = torch.tensor([entry["tokenizer"](text).input_ids[:12] for text in SAMPLES[:2]])
    with torch.no_grad():
        ours = entry["model"](input_ids).logits
        as_stored = _as_stored(entry["model"], outtype)(input_ids).logits
        theirs = loaded(input_ids).logits
    torch.testing.assert_close(theirs, as_stored, atol=1e-5, rtol=0)
    error = (theirs - ours).abs().max().item()
    print(f"{family.name} {outtype}: max |logit - fp32 logit| = {error:.2e} (logits up to {ours.abs().max():.2f})")
    if outtype == "f32":
        assert error <= 1e-5


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_transformers_gguf_tokenizer_gives_the_same_ids(exported, family):
    entry = exported[family.name]
    theirs = AutoTokenizer.from_pretrained(entry["folder"], gguf_file=entry["files"]["f32"])
    lines = SAMPLES + _lines("botchan")[:300]
    for line in lines:
        assert theirs(line).input_ids == entry["tokenizer"](line).input_ids, line
    assert theirs.decode(theirs(SAMPLES[0]).input_ids, skip_special_tokens=True) == SAMPLES[0]


def test_metadata_llama_cpp_reads(exported):
    """What llama.cpp's loader needs besides the tensors: architecture, shapes, and a scored, typed vocabulary."""
    entry = exported["llama"]
    reader = gguf.GGUFReader(entry["folder"] / entry["files"]["q8_0"])
    fields = {name: field for name, field in reader.fields.items()}
    value = lambda name: fields[name].contents()  # noqa: E731
    config = entry["model"].config
    assert value("general.architecture") == "llama"
    assert value("llama.block_count") == config.num_hidden_layers
    assert value("llama.attention.head_count_kv") == config.num_key_value_heads
    assert value("tokenizer.ggml.model") == "llama"
    tokens, scores, types = value("tokenizer.ggml.tokens"), value("tokenizer.ggml.scores"), \
        value("tokenizer.ggml.token_type")
    assert len(tokens) == len(scores) == len(types) == config.vocab_size  # the rows past the tokenizer are [PAD…]
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokens.index("<s>")] == gguf.TokenType.CONTROL
    merged = [score for score in scores if score < 0 and score > -1e6]
    assert len(set(merged)) == len(merged) > 100  # one distinct score per merge: an order for llama.cpp
    tensor_types = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert tensor_types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert tensor_types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32


def test_added_tokens_typed_as_llama_cpp_matches_them(tmp_path):
    """Added tokens are matched in raw text before the BPE: special ones are CONTROL (also those that
    `all_special_tokens` leaves out, like SmolLM2's <file_sep>), the others USER_DEFINED, as llama.cpp's converter
    types them."""
    tokenizer = train_tokenizer(iter(_lines("alice29")[:300]), kind="gpt2", vocab_size=300)
    tokenizer.add_tokens(["<file_sep>"], special_tokens=True)
    tokenizer.add_tokens(["hello world"])
    model = GPT2.causal_lm_class(GPT2.tiny_config(vocab_size=len(tokenizer))).eval()
    reader = gguf.GGUFReader(export_to_gguf(model, tokenizer, tmp_path / "added.gguf", "f32"))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[tokens.index("<file_sep>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("hello world")] == gguf.TokenType.USER_DEFINED
    assert types[tokens.index(tokenizer.eos_token)] == gguf.TokenType.CONTROL
    assert types[tokens.index("a")] == gguf.TokenType.NORMAL


# --- llama.cpp's SentencePiece tokenizer, ported ---------------------------------------------------------------------

def llama_cpp_spm_tokenize(text: str, vocab: dict[str, int], scores: list[float]) -> list[int]:
    """llama.cpp's `llm_tokenizer_spm_session::tokenize` (src/llama-vocab.cpp) with `add_space_prefix`: escape spaces
    as `▁` after prefixing one, split into UTF-8 characters, repeatedly merge the adjacent pair whose joined text is
    the vocabulary token of highest score (leftmost on ties), then look each symbol up, re-splitting through the
    recorded merges or falling back to `<0xXX>` byte tokens."""
    data = ("▁" + text.replace(" ", "▁")).encode()
    symbols = []  # [start, length, prev, next]
    offset = 0
    while offset < len(data):
        lead = data[offset]
        length = 1 if lead < 0x80 else 2 if lead >> 5 == 0x6 else 3 if lead >> 4 == 0xE else 4 if lead >> 3 == 0x1E \
            else 1
        length = min(length, len(data) - offset)
        offset += length
        symbols.append([offset - length, length, len(symbols) - 1, -1 if offset == len(data) else len(symbols) + 1])
    queue, recorded = [], {}

    def try_add_bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        piece = data[symbols[left][0]: symbols[left][0] + symbols[left][1] + symbols[right][1]]
        token = vocab.get(piece.decode(errors="replace"))
        if token is None:
            return
        heapq.heappush(queue, (-scores[token], left, right, len(piece)))
        recorded[piece] = (left, right)

    for index in range(1, len(symbols)):
        try_add_bigram(index - 1, index)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if symbols[left][1] == 0 or symbols[right][1] == 0 or symbols[left][1] + symbols[right][1] != size:
            continue
        symbols[left][1] += symbols[right][1]
        symbols[right][1] = 0
        symbols[left][3] = symbols[right][3]
        if symbols[right][3] >= 0:
            symbols[symbols[right][3]][2] = left
        try_add_bigram(symbols[left][2], left)
        try_add_bigram(left, symbols[left][3])
    output: list[int] = []

    def resegment(index: int) -> None:
        piece = data[symbols[index][0]: symbols[index][0] + symbols[index][1]]
        token = vocab.get(piece.decode(errors="replace"))
        if token is not None:
            output.append(token)
        elif piece in recorded:
            resegment(recorded[piece][0])
            resegment(recorded[piece][1])
        else:
            output.extend(vocab[f"<0x{byte:02X}>"] for byte in piece)

    index = 0 if symbols else -1
    while index != -1:
        resegment(index)
        index = symbols[index][3]
    return output


def test_llama_scores_give_llama_cpp_the_bpe_merge_order(exported):
    """The scores written for the llama kind make llama.cpp's merge loop (ported above) split held-out lines exactly
    as the BPE does; llama.cpp's own converter's placeholder (-1000 for every token) does not."""
    entry = exported["llama"]
    reader = gguf.GGUFReader(entry["folder"] / entry["files"]["f32"])
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    vocab = {token: index for index, token in enumerate(tokens)}
    lines = _lines("botchan")[:300]  # held out: the tokenizer learnt from alice29
    expected = [entry["tokenizer"](line, add_special_tokens=False).input_ids for line in lines]
    same = sum(llama_cpp_spm_tokenize(line, vocab, scores) == ids for line, ids in zip(lines, expected))
    placeholder = [-1000.0 if score < 0 else score for score in scores]
    same_placeholder = sum(llama_cpp_spm_tokenize(line, vocab, placeholder) == ids
                           for line, ids in zip(lines, expected))
    print(f"llama.cpp's merge loop: {same}/300 lines as the BPE with rank scores, {same_placeholder}/300 with -1000")
    assert same >= 299 and same_placeholder < 250


def test_gguf_refuses_what_llama_cpp_cannot_run(tmp_path):
    tokenizer = None
    with pytest.raises(ExportError, match="GGUF"):
        export_to_gguf(BERT.masked_lm_class(BERT.tiny_config()), tokenizer, tmp_path / "bert.gguf")
    with pytest.raises(ExportError, match="rope_type"):
        config = LLAMA.tiny_config(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
        export_to_gguf(LLAMA.causal_lm_class(config), tokenizer, tmp_path / "llama.gguf")
    with pytest.raises(ExportError, match="outtype"):
        export_to_gguf(LLAMA.causal_lm_class(LLAMA.tiny_config()), tokenizer, tmp_path / "llama.gguf", "q4_0")


def test_export_script_gguf(tmp_path, capsys):
    """The first of the two commands in docs/usage.md: a saved lmblocks LLaMA with its tokenizer to one .gguf file."""
    import importlib.util

    from lmblocks import save_tokenizer

    tokenizer = train_tokenizer(iter(_lines("alice29")[:500]), kind="llama", vocab_size=400)
    model = LLAMA.causal_lm_class(LLAMA.tiny_config(vocab_size=len(tokenizer))).eval()
    model.save_pretrained(tmp_path / "llama")
    save_tokenizer(tokenizer, tmp_path / "llama")
    spec = importlib.util.spec_from_file_location("export_script", REPO_ROOT / "scripts" / "export.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    script.main(["--model_name_or_path", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "exported"),
                 "--format", "gguf", "--outtype", "q8_0"])
    assert "exported/llama-q8_0.gguf" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", gguf_file="llama-q8_0.gguf")
    assert type(loaded).__name__ == "LlamaForCausalLM"
