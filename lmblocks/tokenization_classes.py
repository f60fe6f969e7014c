"""The tokenizer classes ``train_tokenizer`` returns: transformers' own, plus the family's classic vocabulary files.

transformers 5 tokenizers save only ``tokenizer.json`` and ``tokenizer_config.json``; the vocabulary files that other
tools read (GPT-2's ``vocab.json`` + ``merges.txt``, BERT's ``vocab.txt``) are written only when the tokenizer was
itself loaded from them. The subclasses here write them on every ``save_pretrained`` (which is what ``Trainer``
checkpoints and ``push_to_hub`` call), from the ``tokenizers`` model they encode with, so the files cannot disagree.

Each subclass keeps its parent's class name on purpose: ``save_pretrained`` records ``type(self).__name__`` as
``tokenizer_class`` in ``tokenizer_config.json``, so a saved folder names transformers' ``GPT2Tokenizer`` /
``BertTokenizer`` and loads with ``AutoTokenizer`` where lmblocks is not installed, with no remote code.
LLaMA's classic file is a SentencePiece ``tokenizer.model``, which a ``tokenizers`` BPE cannot produce, so the llama
kind returns transformers' ``LlamaTokenizerFast`` unchanged.
"""

from __future__ import annotations

import os

import transformers


class _SavesVocabularyFiles:
    """Mixin: ``save_pretrained`` also writes the backend model's vocabulary files (``Model.save``)."""

    def _save_pretrained(
        self,
        save_directory: str | os.PathLike,
        file_names: tuple[str, ...],
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
    ) -> tuple[str, ...]:
        files = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        return (*files, *save_vocabulary_files(self, save_directory, filename_prefix))


def save_vocabulary_files(
    tokenizer: transformers.PreTrainedTokenizerFast, save_directory: str | os.PathLike, filename_prefix: str | None
) -> list[str]:
    """Write the classic files of ``tokenizer``'s WordPiece or BPE model; return their paths (none for llama).

    The names are transformers' (``[prefix-]vocab.txt``; ``[prefix-]vocab.json`` and ``[prefix-]merges.txt``), so
    ``BertTokenizerFast(vocab=...)``, ``GPT2TokenizerFast(vocab=..., merges=...)`` and ``from_pretrained`` read them.
    """
    if isinstance(tokenizer, transformers.LlamaTokenizerFast):
        return []  # its classic file is SentencePiece's tokenizer.model (see the module docstring)
    return list(tokenizer.backend_tokenizer.model.save(os.fspath(save_directory), filename_prefix))


class GPT2Tokenizer(_SavesVocabularyFiles, transformers.GPT2TokenizerFast):
    """transformers' ``GPT2TokenizerFast`` that also saves ``vocab.json`` and ``merges.txt``."""


class BertTokenizer(_SavesVocabularyFiles, transformers.BertTokenizerFast):
    """transformers' ``BertTokenizerFast`` that also saves ``vocab.txt``."""


__all__ = ["BertTokenizer", "GPT2Tokenizer", "save_vocabulary_files"]
