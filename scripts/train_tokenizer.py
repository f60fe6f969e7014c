"""Train a gpt2 / llama / bert tokenizer and save it where AutoTokenizer loads it.

    python scripts/train_tokenizer.py --kind gpt2 --vocab_size 32000 --output_dir out/tok "data/*.txt"
    python scripts/train_tokenizer.py --kind bert --dataset path/to/saved_dataset --text_column body --output_dir tok

Files are UTF-8 text, one text per line; quote globs so that the script expands them. ``--dataset`` takes a folder
written by ``Dataset.save_to_disk`` or a name for ``datasets.load_dataset`` (streamed). Bad input exits with status 2
and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
import time

from lmblocks.tokenization_trainer import KINDS, train_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="text files or globs (omit with --dataset)")
    parser.add_argument("--dataset", help="a save_to_disk folder or a datasets.load_dataset name")
    parser.add_argument("--dataset_config", help="the dataset's configuration name")
    parser.add_argument("--split", default="train", help="the dataset split (default: train)")
    parser.add_argument("--text_column", default="text", help="the dataset's text column (default: text)")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--min_frequency", type=int, default=2)
    parser.add_argument("--special_tokens", nargs="*", default=[], help="extra special tokens")
    parser.add_argument("--no_lowercase", action="store_true", help="bert: keep case (and accents)")
    parser.add_argument("--limit_alphabet", type=int)
    parser.add_argument("--max_token_length", type=int)
    parser.add_argument("--wordpiece_criterion", choices=("likelihood", "frequency"), help="bert only")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (there are none either when stderr is not a terminal)")
    args = parser.parse_args(argv)
    if bool(args.files) == bool(args.dataset):
        parser.error("give either text files or --dataset")
    return args


def load_corpus(args: argparse.Namespace):
    if not args.dataset:
        return args.files
    import os

    import datasets

    if os.path.isdir(args.dataset):
        dataset = datasets.load_from_disk(args.dataset)
        return dataset[args.split] if isinstance(dataset, datasets.DatasetDict) else dataset
    return datasets.load_dataset(args.dataset, args.dataset_config, split=args.split, streaming=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        tokenizer = train_tokenizer(
            load_corpus(args),
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
        print(f"train_tokenizer.py: error: {err}", file=sys.stderr)
        return 2
    print(
        f"trained a {type(tokenizer).__name__} with {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s; "
        f"saved to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
