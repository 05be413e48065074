"""The Markdown pages hold together: the README is a front page that starts with the two commands CI
runs, each page opens with its one-line summary, and every relative link (``](path)``,
``](path#anchor)``, ``](#anchor)``) leads to a file that exists and, for an anchor, to a heading of
that file, by GitHub's rule for heading anchors."""

import re
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    p for p in {*REPO.glob("*.md"), *REPO.glob("docs/*.md"), *REPO.glob("*/README.md")} if p.parts[-2][0] != "."
)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without fenced code blocks, where a ``#`` line is a comment, not a heading."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation other than - and _ removed (the
    backticks of code included), each space a hyphen; runs of hyphens are kept as they are."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page; a repeated heading gets -1, -2... as GitHub numbers them."""
    seen: Counter[str] = Counter()
    result = set()
    for heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        result.add(f"{base}-{seen[base]}" if seen[base] else base)
        seen[base] += 1
    return result


def links(page: Path) -> list[str]:
    """The relative link targets of a page's prose (code blocks and code spans left out)."""
    text = CODE_SPAN.sub("", prose(page.read_text()))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_slug_rule_on_headings_of_these_pages():
    assert slug("The three networks (`network.py`)") == "the-three-networks-networkpy"
    assert slug("The `--fidelity` table") == "the---fidelity-table"
    assert slug("Data sets (`-ds`, `datasets.py`)") == "data-sets--ds-datasetspy"
    assert slug("The paper's update rule and warm start") == "the-papers-update-rule-and-warm-start"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_leads_to_a_file_and_heading(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(REPO)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, broken


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    readme = (REPO / "README.md").read_text()
    first_block = re.search(r"^```bash\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert first_block and readme[: first_block.start()].strip() == "# alexnet"
    train, test = first_block.group(1).splitlines()
    assert "python main.py" in train and test.endswith("python -m pytest -q")
    assert test in (REPO / ".ci" / "run").read_text().splitlines()


def test_the_readme_fits_a_front_page_and_links_every_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(REPO / "README.md")}
    pages = {*REPO.glob("docs/*.md"), REPO / "experiments" / "README.md", REPO / "tests" / "README.md"}
    assert {p.resolve() for p in pages} <= linked


@pytest.mark.parametrize("page", sorted(REPO.glob("docs/*.md")), ids=lambda p: p.name)
def test_each_page_opens_with_a_title_and_a_one_line_summary(page):
    title, blank, summary, after = page.read_text().splitlines()[:4]
    assert title.startswith("# ") and blank == "" and summary and after == ""
