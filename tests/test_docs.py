"""The README is a short front door, every link in the documentation resolves, and the generated
pages of docs/ (options, results) are what `make plots` writes now."""

import re

from conftest import REPO

from plots import docs
from plots.figures import load_results

LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def markdown_files():
    return [REPO / "README.md", REPO / "launch" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def relative_links(path, anchors=False):
    text = FENCE.sub("", path.read_text())
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same file
        yield target if anchors else target.split("#", 1)[0]


def heading_anchors(path):
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as dashes."""
    text = FENCE.sub("", path.read_text())
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_readme_is_at_most_200_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_every_relative_link_and_image_resolves():
    broken = [f"{path.relative_to(REPO)}: {target}" for path in markdown_files()
              for target in relative_links(path) if not (path.parent / target).exists()]
    assert not broken, broken
    readme_targets = set(relative_links(REPO / "README.md"))
    assert {"docs/README.md", "docs/options.md", "docs/results/README.md"} <= readme_targets


def test_every_anchor_into_a_page_names_one_of_its_headings():
    broken = []
    for path in markdown_files():
        for target in relative_links(path, anchors=True):
            file, _, anchor = target.partition("#")
            if anchor and file.endswith(".md") and anchor not in heading_anchors(path.parent / file):
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_links_are_found_with_and_without_images(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](x.md#y) ![b](img/c.png) [![d](e.png)](f.md) [g](https://h) [i](#j)\n"
                    "```\n[k](not-a-link.md)\n```\n")
    assert list(relative_links(page)) == ["x.md", "img/c.png", "e.png", "f.md"]


def test_options_page_is_generated_from_the_config_fields():
    committed = (REPO / "docs" / "options.md").read_text()
    assert committed == docs.options_page(), "run `make plots` and commit docs/options.md"
    from splitrpc.config import FIELDS

    for name, f in FIELDS.items():
        assert f"`--{name.replace('_', '-')}" in committed
        for choice in f.metadata["choices"] or ():
            assert f"`{choice}`" in committed


def test_options_page_has_a_section_per_config_section_and_says_which_methods_read_an_option():
    from splitrpc.config import SECTIONS

    page = docs.options_page()
    headings = [page.index(f"\n## {name}\n") for name in SECTIONS]
    assert headings == sorted(headings)
    assert page.index("`--cut`") < page.index("\n## data\n") < page.index("`--dataset`")
    assert "| `--local-steps` | `1` |  | fedavg |" in page
    assert "| `--lr-scaling / --no-lr-scaling` | off |  | ddp |" in page


def test_results_pages_are_what_make_plots_writes_now():
    results = REPO / "results"
    pages = docs.results_pages(load_results(results), results)
    committed = {p.name: p.read_text() for p in (REPO / "docs" / "results").glob("*.md")}
    assert committed.keys() == pages.keys(), "run `make plots` and commit docs/results/"
    stale = [name for name in pages if committed[name] != pages[name]]
    assert not stale, f"run `make plots` and commit docs/results/: {stale}"


def test_results_pages_hold_the_summary_tables_of_their_configs():
    results = REPO / "results"
    experiments = load_results(results)
    pages = docs.results_pages(experiments, results)
    from plots.figures import experiment_table

    for page, _title, configs, *_ in docs.PAGES:
        for name in configs:
            if name in experiments and name != "privacy_attacks":
                assert "\n".join(experiment_table(name, experiments[name])) in pages[f"{page}.md"], (page, name)
