"""The docs: every internal link and anchor resolves (README.md, docs/, serving_config/), and
the site builds with no warning (`make docs`: MkDocs, strict, with the API reference)."""
import glob
import os
import re
import subprocess
import sys

import pytest
from markdown.extensions.toc import slugify

from conftest import REPO

PAGES = sorted(["README.md", "serving_config/README.md",
                *(os.path.relpath(p, REPO)
                  for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))])
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _text_without_code(path: str) -> str:
    text = open(os.path.join(REPO, path)).read()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: str) -> set[str]:
    """The heading anchors of a page, as MkDocs (Python-Markdown's toc) and GitHub make them."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*$", re.sub(r"```.*?```", "", open(
        os.path.join(REPO, path)).read(), flags=re.S), re.M)
    return {slugify(re.sub(r"[`*_]", "", h), "-") for h in headings}


@pytest.mark.parametrize("page", PAGES)
def test_every_internal_link_and_anchor_resolves(page):
    broken = []
    for groups in LINK.findall(_text_without_code(page)):
        target = groups[0] or groups[1]
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(REPO, resolved)):
            broken.append(f"{target}: no file {resolved}")
        elif anchor and resolved.endswith(".md") and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading '#{anchor}' in {resolved}")
    assert not broken, broken


def test_the_site_builds_strictly():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mkdocs"), "build",
                          "--strict", "--site-dir", os.path.join(REPO, "site")], cwd=REPO,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WARNING" not in out.stderr, out.stderr[-3000:]
