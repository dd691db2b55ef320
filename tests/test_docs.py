"""The docs stay true: the command reference is the commands' own help, links resolve, the README is short,
and nothing cites a path outside the repository."""
import re
import subprocess

from ect.cli import help_markdown
from ect.spec import config_reference
from tests.helpers import ROOT

OUTSIDE = ("shared" + "/reference", "../" + "shared")  # the team's notes live outside the repository
DOCS = [ROOT / "README.md", ROOT / "config" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_command_and_config_references_are_generated_from_the_code():
    assert (ROOT / "docs" / "cli.md").read_text() == help_markdown(), "run `make docs`"
    assert (ROOT / "docs" / "config.md").read_text() == config_reference(), "run `make docs`"


def test_the_readme_is_short_and_every_local_link_resolves():
    assert len((ROOT / "README.md").read_text()) <= 8000
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_no_tracked_file_cites_a_path_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        path = ROOT / name
        if path.suffix in (".py", ".md", ".yaml", ".smk", ".j2", ".sh", "") and path.is_file():
            text = path.read_text(errors="replace")
            assert not any(outside in text for outside in OUTSIDE), name


def test_no_function_of_the_library_is_longer_than_sixty_lines():
    """Read top to bottom: a function that does not fit a screen is split into named phases."""
    import ast

    for path in sorted((ROOT / "ect").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.relative_to(ROOT)}:{node.lineno} {node.name} has {length} lines"
