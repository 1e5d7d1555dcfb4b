"""The method registry and the one run lifecycle (splitrpc/methods.py, splitrpc/lifecycle.py)."""

import json

import pytest

from splitrpc import lifecycle, methods
from splitrpc.config import FIELDS, SECTIONS, parse_args
from splitrpc.errors import UserError


def test_every_registered_method_declares_its_processes_and_roles():
    cfg = {name: parse_args(["--method", name, "--hospitals", "3"]) for name in methods.REGISTRY}
    sizes = {name: methods.get(name).world_size(c) for name, c in cfg.items()}
    assert sizes == {"split": 4, "local": 1, "ddp": 3, "fedavg": 3, "split-local": 1, "split-localloss": 4,
                     "splitfed": 4}
    assert methods.get("split").roles(cfg["split"]) == "1 server + 3 hospitals"
    assert all(cfg[name].world_size == sizes[name] for name in cfg)
    assert {m.name for m in methods.all_methods() if m.exchange == "all-reduce"} == {"ddp", "fedavg"}
    for m in methods.all_methods():
        assert m.name and m.summary and m.options <= set(FIELDS), m.name


def test_an_unknown_method_is_one_line():
    with pytest.raises(UserError, match=r"--method: unknown value 'sgd' \(choose from split, local, ddp, fedavg"):
        parse_args(["--method", "sgd"])


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "toy", "toy_method")  # tests/ is on sys.path


def test_a_new_method_is_one_module_and_one_registry_entry(toy, tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    cfg = parse_args(["--method", "toy", "--hospitals", "2", "--epochs", "2", "--schedule", "parallel",
                      "--out", str(out)])
    assert cfg.world_size == 1
    assert lifecycle.run(cfg) == 0
    (run,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert run["status"] == "ok" and run["config"]["method"] == "toy"
    assert run["toy"] == {"steps": 6} and [e["test_acc_mean"] for e in run["epochs"]] == [0.5, 0.5]
    assert run["hospitals"] == [{"name": "toy1"}, {"name": "toy2"}]
    assert run["setup_time_s"] <= run["wall_time_s"]


def test_a_new_method_refuses_the_options_it_does_not_read(toy):
    with pytest.raises(UserError, match=r"^--codec fp8 does not apply to --method toy \(it is read by --method split, split-localloss, splitfed\)$"):
        parse_args(["--method", "toy", "--codec", "fp8"])


def test_a_failing_party_leaves_once_and_writes_no_record(monkeypatch, tmp_path):
    import toy_method

    left = []
    monkeypatch.setattr(toy_method.ToyParty, "train", lambda self: 1 / 0)
    monkeypatch.setattr(toy_method.ToyParty, "leave", lambda self, failed: left.append(failed))
    monkeypatch.setitem(methods.REGISTRY, "toy", "toy_method")
    out = tmp_path / "runs.jsonl"
    with pytest.raises(ZeroDivisionError):
        lifecycle.run(parse_args(["--method", "toy", "--out", str(out)]))
    assert left == [True] and not out.exists()


def test_every_option_belongs_to_one_documented_section():
    import dataclasses

    sections = {f.name: name for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert sections.keys() == FIELDS.keys()
    assert all(FIELDS[n].metadata["section"] == s for n, s in sections.items())
    assert all(cls.__doc__ and "(" not in cls.__doc__[:1] for cls in SECTIONS.values())


def test_help_groups_the_options_by_section(capsys):
    from splitrpc.config import build_parser

    text = build_parser().format_help()
    positions = [text.index(f"{name} options:") for name in SECTIONS]
    assert positions == sorted(positions)
    listed = text[text.index("run options:"):]  # after the usage line, which names every flag
    assert listed.index("--codec") > listed.index("split options:") > listed.index("--cut") > listed.index(
        "model options:")


def test_the_server_imports_no_hospital_code():
    # Module-level imports of the server's side; at run time it reaches a hospital's endpoints only
    # through splitrpc.split.endpoint.call_hospital, which runs on the hospital (no RRef type fetched).
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys, splitrpc.split.server, splitrpc.split, splitrpc.split.splitfed.server; "
            "print(sorted(m for m in sys.modules if m == 'splitrpc.split.hospital'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]
