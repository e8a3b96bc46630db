"""The documentation stands alone: every relative link of README.md and docs/*.md resolves (anchors included), the
README's test command is the block CI runs, and no tracked file cites notes kept outside the repository."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEST_COMMAND = 'pip install -e ".[dev]" -r benchmarks/requirements.txt && pytest'
# Citations of files that are not in the repository (the patterns are assembled so that this file does not match).
OUTSIDE = re.compile("|".join(["DESIGN" + r"\.md", "research/" + r"[a-z_0-9]+\.md", "/work/" + "shared",
                               "notes " + "§"]))

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped (`-` and `_` kept), spaces -> `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, seen = set(), {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_pages_exist():
    names = {page.name for page in PAGES}
    assert {"architecture.md", "models.md", "kernels.md", "training.md", "data.md", "benchmarks.md",
            "results.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert not [page.name for page in PAGES[1:] if page.name != "README.md" and page not in linked]


def test_readme_test_command_block_is_what_ci_runs():
    """`.ci/run` runs the ```bash block that follows the `<!-- test-command -->` line."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("<!-- test-command -->")
    assert lines[start + 1: start + 4] == ["```bash", TEST_COMMAND, "```"]


def test_no_citation_of_files_outside_the_repository():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the repository's files")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    cited = []
    for name in filter(None, files):
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # binary (plots)
            continue
        cited += [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()}" for m in OUTSIDE.finditer(text)]
    assert not cited, "cites files that are not in the repository:\n" + "\n".join(cited)
