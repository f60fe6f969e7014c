"""Train a gpt2 / llama / bert tokenizer and save it where AutoTokenizer loads it.

    python scripts/train_tokenizer.py --kind gpt2 --vocab_size 32000 --output_dir out/tok "data/*.txt"
    python scripts/train_tokenizer.py --kind bert --dataset_name saved_dataset --text_column body --output_dir tok

Files are text, one text per line, UTF-8 unless --encoding names another (a file that is not UTF-8 is refused with
its line and byte); quote globs so that the script expands them. ``--dataset_name`` takes a folder written by
``Dataset.save_to_disk`` or a name for ``datasets.load_dataset`` (streamed). Bad input exits with status 2 and a
one-line message.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __name__ == "__main__":  # --help without the heavy imports below, when it was printed before
    from _help_cache import print_cached_help

    print_cached_help(__file__)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lmblocks.cli import ArgumentParser, run_script  # noqa: E402
from lmblocks.tokenization_trainer import KINDS, train_tokenizer  # noqa: E402
from lmblocks.training import UsageError  # noqa: E402


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="*", help="text files or globs (omit with --dataset_name)")
    parser.add_argument("--dataset_name", help="a save_to_disk folder or a datasets.load_dataset name")
    parser.add_argument("--dataset_config_name", help="the dataset's configuration name")
    parser.add_argument("--dataset_split", default="train", help="the dataset split")
    parser.add_argument("--text_column", default="text", help="the dataset's text column")
    parser.add_argument("--encoding", help="encoding of the text files (default: UTF-8)")
    parser.add_argument("--kind", required=True, choices=KINDS, help="the tokenizer of this model family")
    parser.add_argument("--output_dir", required=True, help="where to save the tokenizer")
    parser.add_argument("--vocab_size", type=int, default=32000, help="tokens in the vocabulary")
    parser.add_argument("--min_frequency", type=int, default=2, help="how often a merge / word must occur")
    parser.add_argument("--special_tokens", nargs="*", default=[], help="extra special tokens")
    parser.add_argument("--no_lowercase", action="store_true", help="bert: keep case (and accents)")
    parser.add_argument("--limit_alphabet", type=int, help="at most this many initial characters")
    parser.add_argument("--max_token_length", type=int, help="longest token, in characters")
    parser.add_argument("--wordpiece_criterion", choices=("likelihood", "frequency"), help="bert only")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (there are none either when stderr is not a terminal)")
    for old, new in (("--dataset", "--dataset_name"), ("--dataset_config", "--dataset_config_name"),
                     ("--split", "--dataset_split")):
        parser.add_deprecated_alias(old, new)
    args = parser.parse_args(argv)
    if bool(args.files) == bool(args.dataset_name):
        raise UsageError("give either text files or --dataset_name.")
    if args.encoding and not args.files:
        raise UsageError("--encoding applies to text files; a dataset's text is decoded already.")
    return args


def load_corpus(args):
    """Text files (checked and, with --encoding, decoded here; UTF-8 files are read by the trainer itself), or a
    dataset."""
    from lmblocks.data import check_encoding, check_text_files, iter_text_lines

    if not args.dataset_name:
        files = check_text_files(args.files, args.encoding)
        if check_encoding(args.encoding) == "utf-8":
            return files
        return iter_text_lines(files, args.encoding)
    import os

    import datasets

    from lmblocks.data import CorpusError, check_hub_reachable

    try:
        if os.path.isdir(args.dataset_name):
            dataset = datasets.load_from_disk(args.dataset_name)
            return dataset[args.dataset_split] if isinstance(dataset, datasets.DatasetDict) else dataset
        check_hub_reachable(args.dataset_name)
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.dataset_split,
                                     streaming=True)
    except (FileNotFoundError, ValueError, ConnectionError, KeyError) as error:
        if isinstance(error, CorpusError):
            raise
        raise CorpusError(f"Could not load dataset {args.dataset_name!r}: {' '.join(str(error).split())}") from error


def main(argv: list[str] | None = None) -> int:
    """Train and save; bad input prints one `error:` line and returns 2."""
    from lmblocks.data import CorpusError

    try:
        return train(parse_args(argv))
    except (UsageError, CorpusError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def train(args) -> int:
    start = time.perf_counter()
    corpus = load_corpus(args)
    try:
        tokenizer = train_tokenizer(
            corpus,
            args.kind,
            vocab_size=args.vocab_size,
            min_frequency=args.min_frequency,
            special_tokens=args.special_tokens,
            lowercase=False if args.no_lowercase else None,
            limit_alphabet=args.limit_alphabet,
            max_token_length=args.max_token_length,
            wordpiece_criterion=args.wordpiece_criterion,
            text_column=args.text_column,
            show_progress=not args.quiet and sys.stderr.isatty(),  # bars print blank lines into log files
            output_dir=args.output_dir,
        )
    except (ValueError, TypeError, OSError) as err:
        raise UsageError(str(err)) from err
    print(
        f"trained a {type(tokenizer).__name__} with {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s; "
        f"saved to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    run_script(lambda: sys.exit(main()))  # run_script: Ctrl-C is one line too
