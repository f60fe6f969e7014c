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
