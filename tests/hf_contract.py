"""What every family's run of transformers' common tests shares (tests/test_<family>_common.py).

`ModelTesterMixin`, `ConfigTester` and `TrainingTesterMixin` come from the sdist of the installed transformers
(`.cache/hf_tests/hf_common_tests`, see tests/conftest.py). `common_model_test(family)` builds a family's test class
from its spec (classes, roles, tiny config) with the one generic `LmbModelTester`, as transformers'
`CausalLMModelTester` does; each family's test module declares it and adds only what is specific to the family.
No common test is skipped by us; tests that transformers itself gates (GPU, multi-GPU, flash-attention, deepspeed,
slow) skip with transformers' own reason.
"""

from __future__ import annotations

import inspect
import unittest
from typing import Any

from parameterized import parameterized
from transformers.models.auto import modeling_auto

from families import Family
from hf_common_tests.generation.test_utils import GenerationTesterMixin
from hf_common_tests.test_configuration_common import ConfigTester
from hf_common_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
from hf_common_tests.test_training_mixin import TrainingTesterMixin

# transformers' role table (`modeling_auto.*_MAPPING_NAMES`) behind each Auto class a family registers with.
ROLE_TABLES = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForCausalLM": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "AutoModelForPreTraining": "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForNextSentencePrediction": "MODEL_FOR_NEXT_SENTENCE_PREDICTION_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
    "AutoModelForMultipleChoice": "MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES",
}


class LmbModelTester:
    """Builds the tiny configs and inputs the mixins ask for, for any family (the attribute names are the ones they
    read). Sizes are given in transformers' common names and reach the config through its `attribute_map` (GPT-2's
    `n_embd`, ...); every dropout is off, since several common tests compare two forward passes in train mode."""

    family: Family
    config_overrides: dict[str, Any] = {}  # in the family's own field names

    def __init__(
        self,
        parent: unittest.TestCase,
        batch_size: int = 13,
        seq_length: int = 7,
        is_training: bool = True,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        intermediate_size: int = 37,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 16,
        num_labels: int = 3,
        num_choices: int = 4,
    ) -> None:
        self.parent = parent
        self.batch_size, self.seq_length, self.is_training = batch_size, seq_length, is_training
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden_size, num_hidden_layers, \
            num_attention_heads
        self.num_labels, self.num_choices, self.type_vocab_size = num_labels, num_choices, type_vocab_size
        sizes = dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                     num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                     intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                     type_vocab_size=type_vocab_size)
        config_class = self.family.config_class
        fields = config_class.__dataclass_fields__
        own = {config_class.attribute_map.get(name, name): value for name, value in sizes.items()}
        self._config_kwargs = {name: value for name, value in own.items() if name in fields}
        self._config_kwargs |= self.family.no_dropout
        self._config_kwargs |= self.config_overrides
        config = self.get_config()
        self.vocab_size, self.pad_token_id = config.vocab_size, config.pad_token_id
        self.bos_token_id, self.eos_token_id = config.bos_token_id, config.eos_token_id
        self.use_token_type_ids = "token_type_ids" in inspect.signature(self.family.base_class.forward).parameters
        # The classes TrainingTesterMixin trains.
        self.base_model_class = self.family.base_class
        self.causal_lm_class = self.family.causal_lm_class
        self.sequence_classification_class = self.family.seq_cls_class

    def get_config(self):
        return self.family.tiny_config(num_labels=self.num_labels, **self._config_kwargs)

    def prepare_config_and_inputs_for_common(self):
        # Tokens avoid the pad id, so sequence classification pools the true last token.
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 1) + 1
        inputs = {"input_ids": input_ids, "attention_mask": random_attention_mask([self.batch_size, self.seq_length])}
        if self.use_token_type_ids:
            inputs["token_type_ids"] = ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
        return self.get_config(), inputs


def common_model_test(family: Family, **config_overrides: Any) -> type:
    """The base of a family's common-test class: transformers' `ModelTesterMixin` and `TrainingTesterMixin` (and, for
    a family that generates, `GenerationTesterMixin`) over every model class of the family, each entered in the role
    table of the Auto class it answers to. `config_overrides` (own field names) reach every tiny config."""
    tester = type(f"{family.config_class.__name__[:-6]}ModelTester", (LmbModelTester,),
                  {"family": family, "config_overrides": config_overrides})
    # GenerationTesterMixin is the stand-in (tests/hf_standins/generation/test_utils.py): the generation suite itself
    # is tests/test_generation.py; inheriting it tells `test_generation_tester_mixin_inheritance` that it is tested.
    generation = (GenerationTesterMixin,) if family.is_decoder else ()
    return type(f"{family.config_class.__name__[:-6]}CommonTest",
                (LmbModelTestMixin, ModelTesterMixin, *generation, TrainingTesterMixin, unittest.TestCase), {
                    "model_type": family.model_type,
                    "model_tester_class": tester,
                    "all_model_classes": family.model_classes,
                    "role_tables": {ROLE_TABLES[auto]: cls for auto, cls in family.auto_classes.items()},
                })


class LmbModelTestMixin:
    """Mixed in before `ModelTesterMixin` by each family's test class.

    The common tests tell a class's role (base model, causal LM, classifier, QA, ...) by looking its name up in
    transformers' `*_MAPPING_NAMES` tables: whether to add labels, whether a loss is expected, which class holds the
    base weights. lmblocks' classes are registered with the Auto classes (looked up before these tables), so entering
    their names there for the duration of the test class changes no lookup; it only lets the common tests treat them
    as transformers' own.
    """

    model_type: str = ""
    model_tester_class: type
    role_tables: dict[str, type] = {}  # e.g. {"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": LmbGPT2LMHeadModel}
    skips: dict[str, str] = {}  # common test name -> why it does not apply
    # transformers gates this test on the copyright year at the top of the config file (ours have none); run it.
    test_can_init_all_missing_weights_before_2023 = True
    # The embeddings are a large part of the tiny models; these splits leave whole blocks on each side of the cut.
    model_split_percents = [0.5, 0.8, 0.9]

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        for table, model_class in cls.role_tables.items():
            names = getattr(modeling_auto, table)
            assert cls.model_type not in names, f"{cls.model_type} is already in {table}"
            names[cls.model_type] = model_class.__name__

    @classmethod
    def tearDownClass(cls) -> None:
        for table in cls.role_tables:
            getattr(modeling_auto, table).pop(cls.model_type, None)
        super().tearDownClass()

    def setUp(self) -> None:
        self.model_tester = self.model_tester_class(self)
        if self._testMethodName in self.skips:
            self.skipTest(self.skips[self._testMethodName])

    def test_every_exported_class_is_under_the_contract(self) -> None:
        """A model class lmblocks exports for this family but leaves out of `all_model_classes` would go untested."""
        import lmblocks
        from transformers import PreTrainedModel

        family_classes = {
            name
            for name in lmblocks.__all__
            if isinstance(cls := getattr(lmblocks, name), type)
            and issubclass(cls, PreTrainedModel)
            and cls.config_class.model_type == self.model_type
            and not name.endswith("PreTrainedModel")
        }
        assert family_classes == {cls.__name__ for cls in self.all_model_classes}


# What `ConfigTester.run_common_tests` runs (with can_init_without_params=True), one test each.
CONFIG_CHECKS = [
    "create_and_test_config_common_properties",
    "create_and_test_config_to_json_string",
    "create_and_test_config_to_json_file",
    "create_and_test_config_from_and_save_pretrained",
    "create_and_test_config_from_and_save_pretrained_subfolder",
    "create_and_test_config_from_and_save_pretrained_composite",
    "create_and_test_config_with_num_labels",
    "check_config_arguments_init",
    "create_and_test_config_from_pretrained_custom_kwargs",
    "check_config_can_be_init_without_params",
]


class LmbConfigTestMixin:
    """`ConfigTester`'s checks, one test per check so that the counts say which one fails; mixed into a TestCase
    that sets `config_class` and `config_kwargs`."""

    config_class: type
    config_kwargs: dict = {}

    def setUp(self) -> None:
        self.config_tester = ConfigTester(self, config_class=self.config_class, **self.config_kwargs)

    @parameterized.expand(CONFIG_CHECKS)
    def test_config(self, check: str) -> None:
        getattr(self.config_tester, check)()

    def test_checks_match_run_common_tests(self) -> None:
        """Guards `CONFIG_CHECKS` against checks a later transformers adds to `run_common_tests`."""
        import inspect
        import re

        source = inspect.getsource(ConfigTester.run_common_tests)
        called = re.findall(r"self\.(\w+)\(", source)
        self.assertEqual(sorted(set(called)), sorted(CONFIG_CHECKS))
