"""The generated pages of docs/ (options, results) are what `make plots` writes now."""

from conftest import REPO

from plots import docs
from plots.figures import load_results


def test_options_page_is_generated_from_the_config_fields():
    committed = (REPO / "docs" / "options.md").read_text()
    assert committed == docs.options_page(), "run `make plots` and commit docs/options.md"
    from splitrpc.config import FIELDS

    for name, f in FIELDS.items():
        assert f"`--{name.replace('_', '-')}" in committed
        for choice in f.metadata["choices"] or ():
            assert f"`{choice}`" in committed


def test_options_page_groups_fields_by_section(monkeypatch):
    import dataclasses

    from splitrpc import config

    fields = dict(config.FIELDS)
    name = next(iter(fields))
    meta = dict(fields[name].metadata, section="What to run")
    patched = dataclasses.field(default=fields[name].default, metadata=meta)
    patched.name = name
    monkeypatch.setattr(config, "FIELDS", {name: patched, **{k: v for k, v in fields.items() if k != name}})
    page = docs.options_page()
    assert "## What to run" in page and page.index("## What to run") < page.index(f"`--{name}")


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
