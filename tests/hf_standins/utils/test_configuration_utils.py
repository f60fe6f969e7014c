"""Stand-in for transformers' `tests/utils/test_configuration_utils.py` (not in the sdist).

`ConfigTester.check_config_arguments_init` passes every key of `config_common_kwargs` to a config and checks
it reads back. The real dict lists each field of the base `PreTrainedConfig` with a non-default value; this
one does the same for the v5 base config's fields.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}


def _check_matches_installed_base_config() -> None:
    """Like the real module's `test_config_common_kwargs_is_complete`: every key is a field of the installed base
    config (or `output_attentions`, a property over `_output_attentions`), so the dict goes stale loudly."""
    import dataclasses

    from transformers import PreTrainedConfig

    fields = {f.name for f in dataclasses.fields(PreTrainedConfig)} | {"output_attentions"}
    stale = set(config_common_kwargs) - fields
    assert not stale, f"config_common_kwargs names keys the installed PreTrainedConfig lacks: {sorted(stale)}"


_check_matches_installed_base_config()
