from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_lists_exactly_the_pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert set(pip) - {"-e ."} == wanted
    assert "-e ." in pip


def test_rule_conda_env_is_environment_yml_with_the_repo_as_seen_from_snakemakes_copy():
    # Snakemake creates rule envs from a copy in .snakemake/conda/, so the editable path is ../.. there.
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    rule_env = yaml.safe_load((ROOT / "workflow" / "envs" / "ect.yaml").read_text())
    pip = next(d["pip"] for d in rule_env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ../.." in pip
    pip[pip.index("-e ../..")] = "-e ."
    assert rule_env == env
