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


def test_the_wheel_carries_the_templates_and_checks_configs_outside_a_checkout(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("ect_pipeline-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"ect/report/templates/report.html.j2", "ect/spec.py", "ect/cli.py"} <= names
    # the installed package checks a config with its own spec, from anywhere
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ect.spec as s; "
            "assert s.__file__.startswith(sys.argv[1]); s.load_spec(sys.argv[2]); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(target), str(ROOT / "config" / "config.yaml")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
