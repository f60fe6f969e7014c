"""Stand-ins for the three modules that transformers' `tests/test_modeling_common.py` and
`tests/test_configuration_common.py` import but that the transformers sdist does not ship.

`scripts/fetch_assets.py` copies this folder next to the real common test files, forming the package
`hf_common_tests`. Each stand-in is the smallest thing that lets the real mixins import; none of them
changes what the real tests check.
"""
