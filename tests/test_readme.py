"""The README's configuration reference is the one the dataclasses generate today."""

from pathlib import Path

from piccolo_jax.config import reference as config_reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_configuration_reference_is_current():
    text = README.read_text(encoding="utf-8")
    block = text.split(config_reference.BEGIN, 1)[1].split(config_reference.END, 1)[0]
    assert block.strip() == config_reference.render().strip(), (
        "README.md's configuration reference is stale: run python -m piccolo_jax.config.reference README.md")


def test_every_config_field_is_documented():
    for line in config_reference.render().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"a field without a comment: {line}"
