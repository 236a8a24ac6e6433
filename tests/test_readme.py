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


def test_readme_commands_name_no_file_of_the_repository():
    """The README's shell commands work outside a clone: the sample evaluation tasks are `bundled` and the
    configs are named (`--config pretrain`), never `assets/...` or `configs/...` paths."""
    text = README.read_text(encoding="utf-8")
    bash = [block for block in text.split("```")[1::2] if block.startswith("bash\n")]
    assert bash and any("evaluate" in block and " bundled" in block for block in bash)
    bad = [line for block in bash for line in block.splitlines() if "assets/" in line or "configs/" in line]
    assert not bad, f"README commands naming repository paths: {bad}"
