"""What every family's run of transformers' common tests shares (tests/test_<family>_common.py).

`ModelTesterMixin`, `ConfigTester` and `TrainingTesterMixin` come from the sdist of the installed transformers
(`.cache/hf_tests/hf_common_tests`, see tests/conftest.py). Each family's test module adds its model tester, its
classes and, for any common test that does not apply, the reason.
"""

from __future__ import annotations

from parameterized import parameterized
from transformers.models.auto import modeling_auto

from hf_common_tests.test_configuration_common import ConfigTester


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
