"""`make bench-check`'s comparison (bench/check.py) on known numbers: a ratio beyond its
tolerance fails after one rerun, a slower CPU with the same ratios passes, absolute medians
count only on the CPU that saved them, and bad baselines are one line with exit 2."""

import json
import subprocess
import sys

import pytest

from bench import check
from conftest import REPO

# Medians (s) of every regression benchmark and of the reference timed alternately with it,
# as one run of bench/test_regression.py names them.
TIMES = {
    "test_rpc_round_trip[64KB]": (0.8e-3, 0.15e-3), "test_rpc_round_trip[1MB]": (1.5e-3, 0.5e-3),
    "test_rpc_round_trip[8MB]": (8e-3, 4e-3),
    "test_split_step[vgg11]": (0.2, 0.12), "test_split_step[resnet20]": (0.3, 0.27),
    "test_ddp_step[vgg11]": (0.13, 0.12), "test_ddp_step[resnet20]": (0.22, 0.3),
    "test_split_steps_sequential[prefetch]": (0.3, 0.26), "test_split_steps_sequential[no_prefetch]": (0.28, 0.26),
    "test_split_step_fp8": (0.32, 0.27),
}
MEDIANS = {k: v for name, (t, ref) in TIMES.items() for k, v in ((name, t), (name + check.REFERENCE, ref))}
CPU = "AuthenticAMD-25-17-1-2cores"
OTHER_CPU = "AuthenticAMD-26-2-1-2cores"


def scaled(factor: float, **slower: float) -> dict:
    """Every median times ``factor`` (a slower CPU), and the named benchmarks slower still."""
    return {k: v * factor * slower.get(k.replace("[", "_").replace("]", ""), 1.0) for k, v in MEDIANS.items()}


class Runner:
    """Stands in for run_benchmarks: returns the given medians, first run then rerun."""

    def __init__(self, *runs: dict):
        self.runs, self.calls = list(runs), []

    def __call__(self, tests, label):
        self.calls.append(tests)
        medians = self.runs[min(len(self.calls), len(self.runs)) - 1]
        chosen = {k: v for k, v in medians.items() if tests is None or k.split(check.REFERENCE)[0] in tests}
        return {"medians": chosen, "extra_info": {}}


@pytest.fixture
def baseline(tmp_path):
    path = tmp_path / "baseline.json"
    data = check.build_baseline([{"medians": MEDIANS, "extra_info": {}}] * 3, OTHER_CPU, None)
    path.write_text(json.dumps(data))
    return path


def run_check(path, runner, cpu=CPU):
    lines = []
    rc = check.check(path, runner=runner, cpu=cpu, out=lines.append)
    return rc, "\n".join(lines)


def test_tolerance_is_twice_the_widest_deviation_with_a_floor():
    assert check.tolerance([1.0] * 5) == check.MIN_TOLERANCE
    assert check.tolerance([1.0, 1.1, 0.9, 1.0, 1.0]) == pytest.approx(0.20)
    assert check.tolerance([0.8, 1.0, 1.0, 1.0, 1.07]) == pytest.approx(0.40)


def test_relative_speed_is_samples_per_second_over_the_references():
    split = check.QUANTITIES[0]
    assert split.name == "split/local parallel [vgg11]"
    assert split.value(MEDIANS) == pytest.approx(0.12 / 0.2)  # 256 samples each: 0.6 as fast as local
    prefetch = next(q for q in check.QUANTITIES if q.over)
    assert prefetch.value(MEDIANS) == pytest.approx((0.26 / 0.3) / (0.26 / 0.28))


def test_a_slower_cpu_with_the_same_ratios_passes(baseline):
    runner = Runner(scaled(1.5))
    rc, out = run_check(baseline, runner)
    assert rc == 0, out
    assert runner.calls == [None]  # nothing out of tolerance, nothing measured again
    assert "information only: no baseline for this CPU" in out
    assert "REGRESSED" not in out and "passed" in out


def test_a_slower_split_step_fails_on_its_own_quantity_after_one_rerun(baseline):
    slow = scaled(1.0, test_split_step_resnet20=1.3)
    runner = Runner(slow, slow)
    rc, out = run_check(baseline, runner)
    assert rc == 1, out
    assert runner.calls == [None, ["test_split_step[resnet20]"]]
    regressed = [line for line in out.splitlines() if "REGRESSED" in line]
    assert len(regressed) == 1 and regressed[0].startswith("split/local parallel [resnet20]")
    assert "-23.1%" in regressed[0]  # 1/1.3 - 1
    assert out.splitlines()[-1].startswith("bench-check: FAILED, 1 regressed: split/local parallel [resnet20]")


def test_a_slower_prefetch_pair_fails_both_of_its_quantities(baseline):
    slow = scaled(1.0, **{"test_split_steps_sequential_prefetch": 1.5})
    rc, out = run_check(baseline, Runner(slow, slow))
    assert rc == 1, out
    assert {line.split("  ")[0].strip() for line in out.splitlines() if "REGRESSED" in line} == {
        "split/local sequential, prefetch [resnet20]", "prefetch/no prefetch sequential [resnet20]"}


def test_a_local_reference_that_slows_with_the_machine_passes(baseline):
    # A busy machine slows a benchmark and its alternating reference alike.
    rc, out = run_check(baseline, Runner({k: v * (1.4 if "split_step[vgg11]" in k else 1.0) for k, v in MEDIANS.items()}))
    assert rc == 0, out


def test_a_quantity_that_recovers_on_the_rerun_passes(baseline):
    runner = Runner(scaled(1.0, test_rpc_round_trip_8MB=1.5), MEDIANS)
    rc, out = run_check(baseline, runner)
    assert rc == 0, out
    assert len(runner.calls) == 2


def test_absolute_medians_count_only_on_the_cpu_that_saved_them(baseline):
    rc, out = run_check(baseline, Runner(scaled(1.5)), cpu=OTHER_CPU)
    assert rc == 1, out
    assert "SLOWER" in out and "absolute medians on this CPU" in out
    rc, out = run_check(baseline, Runner(scaled(1.1)), cpu=OTHER_CPU)
    assert rc == 0, out


def test_save_keeps_every_repeat_and_other_cpus_absolute_medians(baseline, tmp_path):
    runs = [scaled(f) for f in (1.0, 1.2, 0.9)]
    rc = check.save(baseline, 3, runner=lambda tests, label: {"medians": runs[int(label[-1]) - 1], "extra_info": {}},
                    cpu=CPU, out=lambda line: None)
    assert rc == 0
    data = json.loads(baseline.read_text())
    assert set(data["absolute"]) == {CPU, OTHER_CPU}
    assert data["absolute"][CPU]["test_split_step[vgg11]/reference"] == pytest.approx(0.12)  # the median run
    assert all(len(q["repeats"]) == 3 for q in data["ratios"].values())


def test_a_missing_baseline_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bench.check", "--baseline", str(tmp_path / "none.json")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "make bench-save" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_a_foreign_baseline_is_one_line_and_exit_2(tmp_path, capsys):
    foreign = tmp_path / "0002_baseline.json"
    foreign.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))  # pytest-benchmark's own format
    assert check.main(["--baseline", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a bench-check baseline" in err


def test_benchmarks_that_fail_to_run_are_one_line_naming_the_log(tmp_path, monkeypatch):
    broken = tmp_path / "test_broken.py"
    broken.write_text("def test_broken(benchmark):\n    benchmark(lambda: 1 / 0)\n")
    monkeypatch.setattr(check, "BENCH_FILE", str(broken))
    monkeypatch.setattr(check, "LOG_DIR", tmp_path / "logs")
    with pytest.raises(check.CheckError, match=r"the benchmarks did not run \(pytest exit 1.*see .*logs/x.log"):
        check.run_benchmarks(None, "x")


def test_the_committed_baseline_covers_every_quantity():
    data = check.load_baseline(check.BASELINE)
    for q in check.QUANTITIES:
        r = data["ratios"][q.name]
        assert len(r["repeats"]) >= 5 and r["tolerance"] == check.tolerance(r["repeats"])


def test_too_few_repeats_to_save_is_one_line_and_exit_2(tmp_path, capsys):
    assert check.main(["--save", "--repeats", "2", "--baseline", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--repeats must be at least 3, got 2" in err
    assert not (tmp_path / "b.json").exists()
