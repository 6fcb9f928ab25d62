"""The documentation a user gets with the repository is whole (issue 17, point 11): every
relative link of README.md and docs/ names a file that is there (the docs pointed to an
API.md the repository did not have), and the contract documents in docs/design/ are the
team's current ones."""
import re

import pytest
from testpaths import ROOT

SHARED = ROOT.parent / "shared" / "docs"
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_of_the_repository(page):
    missing = [target for target in LINK.findall(page.read_text())
               if "://" not in target and not target.startswith("mailto:")
               and not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to what is not there: {missing}"


def test_no_page_points_outside_the_repository():
    for page in markdown_files():
        assert "../shared/" not in page.read_text(), page


@pytest.mark.parametrize("name", ["API.md", "DESIGN.md", "BENCHMARKS.md"])
def test_the_design_documents_are_the_teams_current_ones(name):
    copy = ROOT / "docs" / "design" / name
    assert copy.exists(), f"docs/design/{name} is missing"
    if not (SHARED / name).exists():
        pytest.skip("no ../shared/docs beside this checkout to compare with")
    assert copy.read_text() == (SHARED / name).read_text(), (
        f"docs/design/{name} differs from ../shared/docs/{name}: copy the new one")
