"""Stand-in for transformers' `tests/generation/test_utils.py` (not in the sdist).

`ModelTesterMixin` only uses `GenerationTesterMixin` in an `issubclass` check that tells whether a tester
runs the generation suite. lmblocks' own generation tests (tests/test_generation*.py) cover the same
behaviours: cache vs no-cache, left padding, greedy/sample/beam, static cache, inputs_embeds, continuing
from a returned cache.
"""


class GenerationTesterMixin:
    pass
