"""The README's method tables are the registry's (regenerate with `mergesmith methods --markdown`)."""

from pathlib import Path

from mergesmith.cli import methods_markdown


def test_readme_method_tables_are_current():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert methods_markdown() in readme, "README tables are stale: paste `mergesmith methods --markdown`"
    first = readme.splitlines()[:6]
    assert any("make demo" in line for line in first) and any("make test" in line for line in first)
