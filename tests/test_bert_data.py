"""BERT pretraining data: NSP pairs from classic-format files and `datasets`, the 15 % / 80-10-10 masking collator,
and `Trainer` with `LmbBertForPreTraining` on that pipeline (both losses fall)."""

from __future__ import annotations

import random
from collections import Counter

import datasets
import pytest
import torch
from transformers import BertTokenizerFast, Trainer, TrainingArguments

from lmblocks import LmbBertConfig, LmbBertForPreTraining
from lmblocks.data_bert import (
    BertDataError,
    DataCollatorForBertPretraining,
    create_nsp_examples,
    documents_from_dataset,
    read_bert_documents,
)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DOC_WORDS = [f"d{i}" for i in range(40)]  # identify a document
SENT_WORDS = [f"s{i}" for i in range(40)]  # identify a sentence's position in its document
PLAIN_WORDS = ["the", "a", "cat", "dog", "over", "under", "big", "small", "red", "blue", "house", "tree"]
# Words that WordPiece splits: "running" -> run ##ning, "played" -> play ##ed, "jumps" -> jump ##s, ...
PIECES = ["run", "##ning", "play", "##ed", "##er", "jump", "##s", "##ing"]
SPLIT_WORDS = ["running", "played", "player", "jumps", "jumping", "plays", "runs"]
TOPIC_WORDS = [f"t{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> BertTokenizerFast:
    folder = tmp_path_factory.mktemp("bert_vocab")
    vocab = SPECIALS + DOC_WORDS + SENT_WORDS + PLAIN_WORDS + PIECES + TOPIC_WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast.from_pretrained(str(folder))


def _tagged_documents(num_docs: int, rng: random.Random) -> list[list[str]]:
    """Sentence j of document d reads "dD sJ dD sJ ...": every token says where it came from."""
    documents = []
    for d in range(num_docs):
        num_sentences = rng.randint(2, 12)
        documents.append([" ".join([f"d{d} s{j}"] * rng.randint(1, 6)) for j in range(num_sentences)])
    return documents


def _plain_documents(num_docs: int, rng: random.Random) -> list[list[str]]:
    words = PLAIN_WORDS + SPLIT_WORDS
    return [
        [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(2, 10))]
        for _ in range(num_docs)
    ]


def _segments(example: dict) -> tuple[list[int], list[int]]:
    ids = example["input_ids"]
    first_sep = ids.index(3)
    return ids[1:first_sep], ids[first_sep + 1 : -1]


# ----------------------------------------------------------------------------------------------------------------------
# Reading corpora
# ----------------------------------------------------------------------------------------------------------------------


def test_read_bert_documents_classic_format(tmp_path):
    (tmp_path / "a.txt").write_text("First sentence.\nSecond one.\n\n\nOther doc.\n  \nThird doc line.\n")
    (tmp_path / "b.txt").write_text("\nFourth doc.\nStill fourth.")
    documents = read_bert_documents([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert documents == [
        ["First sentence.", "Second one."],
        ["Other doc."],
        ["Third doc line."],
        ["Fourth doc.", "Still fourth."],
    ]
    with pytest.raises(BertDataError, match="not found"):
        read_bert_documents([tmp_path / "missing.txt"])


def test_documents_from_dataset_both_layouts(tmp_path):
    # One sentence per row, empty rows between documents: what load_dataset("text") makes of the classic files.
    (tmp_path / "corpus.txt").write_text("a b.\nc d.\n\ne f.\n\n\ng h.\ni j.\n")
    rows = datasets.load_dataset("text", data_files=str(tmp_path / "corpus.txt"), split="train")
    assert documents_from_dataset(rows) == [["a b.", "c d."], ["e f."], ["g h.", "i j."]]
    # One document per row.
    docs = datasets.Dataset.from_dict({"body": ["x y.\ny z.", "", "only one."]})
    assert documents_from_dataset(docs, text_column="body", document_per_row=True) == [["x y.", "y z."], ["only one."]]
    with pytest.raises(BertDataError, match="no column 'text'"):
        documents_from_dataset(docs)


# ----------------------------------------------------------------------------------------------------------------------
# NSP pairs
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_seq_length", [16, 48])
def test_pairs_format_length_and_document_boundaries(tokenizer, max_seq_length):
    documents = _tagged_documents(40, random.Random(0))
    examples = create_nsp_examples(documents, tokenizer, max_seq_length=max_seq_length, dupe_factor=3, seed=1)
    assert len(examples) > 200
    vocab = tokenizer.get_vocab()
    doc_of = {vocab[w]: i for i, w in enumerate(DOC_WORDS)}
    sent_of = {vocab[w]: i for i, w in enumerate(SENT_WORDS)}
    for example in examples:
        ids, types = example["input_ids"], example["token_type_ids"]
        assert len(ids) <= max_seq_length
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and ids.count(3) == 2
        a, b = _segments(example)
        assert a and b
        assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        assert example["special_tokens_mask"] == [1] + [0] * len(a) + [1] + [0] * len(b) + [1]
        docs_a = {doc_of[t] for t in a if t in doc_of}
        docs_b = {doc_of[t] for t in b if t in doc_of}
        # Each segment is contiguous text of one document ...
        assert len(docs_a) <= 1 and len(docs_b) <= 1
        sents_a = [sent_of[t] for t in a if t in sent_of]
        sents_b = [sent_of[t] for t in b if t in sent_of]
        assert sents_a == sorted(sents_a) and sents_b == sorted(sents_b)
        if docs_a and docs_b:
            if example["next_sentence_label"] == 0:
                # ... IsNext: B continues A in the same document.
                assert docs_a == docs_b
                if sents_a and sents_b:
                    assert max(sents_a) <= min(sents_b)
            else:
                # ... NotNext: B comes from another document.
                assert docs_a != docs_b


def test_nsp_labels_are_balanced_and_short_sequences_occur(tokenizer):
    documents = _plain_documents(200, random.Random(2))
    examples = create_nsp_examples(documents, tokenizer, max_seq_length=64, dupe_factor=10, seed=3)
    assert len(examples) >= 3000
    share_random = sum(e["next_sentence_label"] for e in examples) / len(examples)
    print(f"NSP: {len(examples)} examples, NotNext share {share_random:.4f}")
    assert abs(share_random - 0.5) < 0.03

    no_short = create_nsp_examples(documents, tokenizer, max_seq_length=64, short_seq_prob=0.0, seed=3)
    all_short = create_nsp_examples(documents, tokenizer, max_seq_length=64, short_seq_prob=1.0, seed=3)
    mean = lambda exs: sum(len(e["input_ids"]) for e in exs) / len(exs)  # noqa: E731
    assert mean(all_short) < 0.8 * mean(no_short)
    assert len(all_short) > len(no_short)


def test_sentence_longer_than_max_seq_length_is_trimmed(tokenizer):
    documents = [[" ".join(["cat"] * 100)], [" ".join(["dog"] * 100), "tree house"]]
    examples = create_nsp_examples(documents, tokenizer, max_seq_length=20, dupe_factor=20)
    assert all(len(e["input_ids"]) <= 20 for e in examples)
    assert {e["next_sentence_label"] for e in examples} == {0, 1}


def test_nsp_corpus_errors(tokenizer, tmp_path):
    with pytest.raises(BertDataError, match="no text"):
        create_nsp_examples([], tokenizer)
    with pytest.raises(BertDataError, match="no text"):
        create_nsp_examples([["   "], []], tokenizer)
    (tmp_path / "one.txt").write_text("the cat.\nthe dog.\n\n\n")
    with pytest.raises(BertDataError, match="at least two documents"):
        create_nsp_examples(read_bert_documents(tmp_path / "one.txt"), tokenizer)
    with pytest.raises(BertDataError, match="max_seq_length=4"):
        create_nsp_examples([["a cat"], ["a dog"]], tokenizer, max_seq_length=4)


# ----------------------------------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------------------------------


def _collate_all(collator, examples, batch_size=256):
    return [collator(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]


def test_masking_statistics(tokenizer):
    examples = create_nsp_examples(_plain_documents(200, random.Random(4)), tokenizer, max_seq_length=64,
                                   dupe_factor=10, seed=5)
    assert len(examples) >= 3000
    collator = DataCollatorForBertPretraining(tokenizer, seed=0)
    special_ids = torch.tensor(tokenizer.all_special_ids)
    counts = Counter()
    for batch, start in zip(_collate_all(collator, examples), range(0, len(examples), 256)):
        original = collator._pad(examples[start : start + 256])
        orig_ids, maskable = original["input_ids"], ~original["_special"]
        targets = batch["labels"] != -100
        # Labels hold the original ids, and only maskable positions (never special tokens or padding) are targets.
        assert torch.equal(batch["labels"][targets], orig_ids[targets])
        assert not (targets & ~maskable).any()
        assert torch.equal(batch["input_ids"][~targets], orig_ids[~targets])
        assert torch.equal(batch["attention_mask"], (torch.arange(orig_ids.shape[1]) < torch.tensor(
            [len(e["input_ids"]) for e in examples[start : start + 256]]).unsqueeze(1)).long())
        new = batch["input_ids"][targets]
        counts["maskable"] += int(maskable.sum())
        counts["targets"] += int(targets.sum())
        counts["mask"] += int((new == tokenizer.mask_token_id).sum())
        counts["kept"] += int((new == orig_ids[targets]).sum())
        randomised = (new != tokenizer.mask_token_id) & (new != orig_ids[targets])
        counts["random"] += int(randomised.sum())
        assert not torch.isin(new[randomised], special_ids).any()  # random replacements are ordinary tokens

    target_rate = counts["targets"] / counts["maskable"]
    shares = {k: counts[k] / counts["targets"] for k in ("mask", "random", "kept")}
    print(f"masking: {counts['targets']} targets of {counts['maskable']} maskable tokens = {target_rate:.4f}; "
          + ", ".join(f"{k} {v:.4f}" for k, v in shares.items()))
    assert abs(target_rate - 0.15) < 0.01
    assert abs(shares["mask"] - 0.8) < 0.015
    # A random draw may pick the original token (1 in ~30 here): it then counts as kept.
    assert abs(shares["random"] - 0.1) < 0.015
    assert abs(shares["kept"] - 0.1) < 0.015


def test_masking_is_reproducible_with_a_seed(tokenizer):
    examples = create_nsp_examples(_plain_documents(20, random.Random(6)), tokenizer, max_seq_length=32)
    first = DataCollatorForBertPretraining(tokenizer, seed=7)(examples[:16])
    second = DataCollatorForBertPretraining(tokenizer, seed=7)(examples[:16])
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "next_sentence_label", "labels"}


@pytest.mark.parametrize("use_word_ids", [False, True])
def test_whole_word_masking(tokenizer, use_word_ids):
    examples = create_nsp_examples(_plain_documents(150, random.Random(8)), tokenizer, max_seq_length=48,
                                   dupe_factor=4, seed=9, return_word_ids=use_word_ids)
    if not use_word_ids:
        assert "word_ids" not in examples[0]
    collator = DataCollatorForBertPretraining(tokenizer, whole_word_mask=True, seed=10)
    continuation = torch.tensor([t.startswith("##") for t in tokenizer.convert_ids_to_tokens(range(len(tokenizer)))])
    targets_total = maskable_total = split_words_targeted = 0
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        batch = collator(chunk)
        padded = collator._pad(chunk)
        original, special = padded["input_ids"], padded["_special"]
        targets = batch["labels"] != -100
        # A continuation piece is a target exactly when the piece before it is (unless trimming or a cut at a segment
        # boundary left the piece first in its segment, after [CLS] or [SEP]).
        inside_word = continuation[original][:, 1:] & ~special[:, :-1]
        assert torch.equal(targets[:, 1:][inside_word], targets[:, :-1][inside_word])
        split_words_targeted += int((targets[:, 1:] & inside_word).sum())
        targets_total += int(targets.sum())
        maskable_total += sum(len(e["input_ids"]) - 3 for e in chunk)
    assert split_words_targeted > 50  # multi-piece words do get masked, as wholes
    # Skipping words that would overshoot leaves the rate a little under 15 %.
    assert 0.13 < targets_total / maskable_total < 0.155


def test_collator_errors(tokenizer):
    with pytest.raises(BertDataError, match="mlm_probability"):
        DataCollatorForBertPretraining(tokenizer, mlm_probability=0.0)
    with pytest.raises(BertDataError, match="sum to at most 1"):
        DataCollatorForBertPretraining(tokenizer, mask_replace_prob=0.8, random_replace_prob=0.3)


# ----------------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------------


def _topic_documents(num_docs: int, rng: random.Random) -> list[list[str]]:
    """Each document talks about one of 10 topics (6 words each): the MLM can guess a masked word from its topic, and
    NSP can tell a random segment B by its (almost always) different topic."""
    topics = [TOPIC_WORDS[6 * k : 6 * k + 6] for k in range(10)]
    documents = []
    for _ in range(num_docs):
        words = rng.choice(topics)
        documents.append([" ".join(rng.choice(words) for _ in range(rng.randint(4, 8)))
                          for _ in range(rng.randint(4, 10))])
    return documents


@torch.no_grad()
def _losses(model, batch) -> tuple[float, float]:
    model.eval()
    out = model(**batch)
    model.train()
    return out.mlm_loss.item(), out.nsp_loss.item()


def test_trainer_pretraining_both_losses_fall(tokenizer, tmp_path):
    # The datasets path end to end: rows of sentences with empty rows between documents -> NSP examples -> Dataset.
    rows = []
    for document in _topic_documents(300, random.Random(11)):
        rows.extend(document + [""])
    documents = documents_from_dataset(datasets.Dataset.from_dict({"text": rows}))
    train = datasets.Dataset.from_list(
        create_nsp_examples(documents, tokenizer, max_seq_length=32, dupe_factor=2, seed=12)
    )
    collator = DataCollatorForBertPretraining(tokenizer, seed=13)
    held_out = create_nsp_examples(_topic_documents(60, random.Random(14)), tokenizer, max_seq_length=32, seed=15)
    eval_batch = DataCollatorForBertPretraining(tokenizer, seed=16)(held_out[:256])

    config = LmbBertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = LmbBertForPreTraining(config)
    mlm_before, nsp_before = _losses(model, eval_batch)

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=200, per_device_train_batch_size=32, learning_rate=3e-3,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=25, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    trainer.train()
    mlm_after, nsp_after = _losses(model, eval_batch)
    print(f"held-out MLM loss {mlm_before:.3f} -> {mlm_after:.3f}, NSP loss {nsp_before:.3f} -> {nsp_after:.3f}")
    assert mlm_after < mlm_before - 1.0
    assert nsp_after < nsp_before - 0.15
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1] < logged[0]
