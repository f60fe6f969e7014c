"""Stand-in for transformers' `tests/exporters/test_export.py` (not in the sdist).

The real `ExportTesterMixin` adds `torch.export` tests. lmblocks covers export/compile with its own
tests (`tests/test_generation.py::test_static_cache_compiled`), so the stand-in adds nothing.
"""


class ExportTesterMixin:
    pass
