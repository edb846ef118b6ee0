"""The docs stay true to the code: the config reference, the configs and README examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from reco.config import config_from_dict, config_reference, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text().strip() == config_reference().strip(), \
        "regenerate it: python -m reco.config > docs/config.md"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    assert load_config(path).workdir


def test_readme_config_example_validates():
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        config_from_dict(yaml.safe_load(block))


def test_readme_commands_name_real_stages():
    from reco.cli import STAGES

    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`reco (\w+)", readme)) - {"run", "demo", "serve"}
    assert named <= set(STAGES), named - set(STAGES)
    assert set(STAGES) <= named
