"""Every method checkpoints and resumes: a run stopped at a checkpoint and resumed ends exactly where an
uninterrupted run does (split learning's own case: tests/test_faults.py, tests/test_ushape.py)."""

import pytest
import torch

from bench.chaos import damage_file

from splitrpc import checkpoint, methods
from splitrpc.config import parse_args

pytestmark = pytest.mark.distributed

# 2 hospitals x 256 samples in batches of 32: 8 parallel steps an epoch, so 12 steps cross an epoch's end
# (its evaluation and loss history); momentum, so the optimizer's state matters.
COMMON = ["--dataset", "synthetic", "--synthetic-train", 512, "--synthetic-test", 64, "--model", "resnet20",
          "--width", 0.25, "--hospitals", 2, "--batch-size", 32, "--epochs", 3, "--momentum", 0.9, "--threads", 1,
          "--log-every", 100]
CASES = {
    # (options, steps of the first, stopped run)
    "local": (["--schedule", "parallel"], 6),
    # The L1s are averaged every 4 steps: the checkpoint of step 8 is taken before the average, redone on resuming.
    "split-local": (["--schedule", "parallel", "--l1", "average", "--l1-sync-every", 4], 8),
    # 3 ranks: DDP's ring sums a gradient in an order its bucket layout decides (with 2, a + b = b + a), so the
    # resumed process must rebuild its buckets as the uninterrupted one did (DdpTrainer.rebuild_buckets).
    "ddp": (["--hospitals", 3], 6),
    # Mid-round (rounds of 4 local steps): each hospital's replica, momentum and the round's weights come back,
    # and the first run's own last average (a run averages at its end) is not carried into the resumed one.
    "fedavg": (["--local-steps", 4], 6),
}
SAVED = {"local": ["trunk.pt", "head-local.pt"], "split-local": ["trunk.pt", "head-hospital1.pt", "head-hospital2.pt"],
         "ddp": ["trunk.pt", "head-ddp.pt"], "fedavg": ["trunk.pt", "head-fedavg.pt"]}


@pytest.mark.parametrize("method", CASES)
def test_a_run_stopped_at_a_checkpoint_continues_exactly(cli, tmp_path, method):
    """12 steps whole; the same run stopped after ``stop`` steps with checkpoints every 3 and resumed to 12 ends
    with the same weights, bit for bit, and the same loss and accuracy history."""
    extra, stop = CASES[method]
    common = ["--method", method, *COMMON, *extra]
    whole = cli(*common, "--max-steps", 12, "--save-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole
    ckpt = tmp_path / "ckpt"
    first = cli(*common, "--max-steps", stop, "--checkpoint-dir", ckpt, "--checkpoint-every", 3)
    assert first.returncode == 0, first
    parties = methods.get(method).checkpoint_parties(_cfg(common))
    assert checkpoint.complete_steps(ckpt, parties) == ([3, 6] if stop == 6 else [6, 8])  # --checkpoint-keep 2
    second = cli(*common, "--max-steps", 12, "--checkpoint-dir", ckpt, "--resume", "--save-dir", tmp_path / "resumed")
    assert second.returncode == 0 and f"resumed at step {stop}" in second.stdout, second
    for name in SAVED[method]:
        a, b = torch.load(tmp_path / "whole" / name), torch.load(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    uninterrupted, resumed = whole.records[0], second.records[-1]
    assert resumed["resumed_from_step"] == stop and "resumed_from_step" not in uninterrupted
    assert resumed["steps"] == uninterrupted["steps"] == 12
    for key in ("train_loss", "test_acc_per_hospital", "lr_end", "steps", "samples"):
        assert [e[key] for e in resumed["epochs"]] == [e[key] for e in uninterrupted["epochs"]], key
    if method == "fedavg":
        assert resumed["rounds"] == uninterrupted["rounds"]


def _cfg(args):
    from splitrpc.config import parse_args

    return parse_args(list(map(str, args)))


def test_resume_without_a_complete_step_is_one_line(cli, tmp_path):
    result = cli("--method", "local", *COMMON, "--max-steps", 2, "--checkpoint-dir", tmp_path / "empty", "--resume")
    assert result.returncode == 2 and "--resume: no step in" in result.stderr, result
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_checkpoint_file_is_skipped_with_one_line(tmp_path, how):
    """A file whose bytes changed after it was written does not match its sha256: it is not a step to
    resume from, loading it is one line, and pruning removes its digest with it."""
    cfg = parse_args([])
    for step in (3, 6):
        checkpoint.save(tmp_path, step, "server", {**checkpoint.identity(cfg), "w": torch.arange(100.0) + step})
    path = checkpoint.step_dir(tmp_path, 6) / "server.pt"
    damage_file(path, how)
    assert checkpoint.available_steps(tmp_path, "server") == [3]
    with pytest.raises(Exception, match=r"server: checkpoint .*step-000000006/server.pt cannot be used: its bytes do "
                                        r"not match the sha256"):
        checkpoint.load(tmp_path, 6, "server", cfg)
    assert torch.equal(checkpoint.load(tmp_path, 3, "server", cfg)["w"], torch.arange(100.0) + 3)
    checkpoint.save(tmp_path, 9, "server", checkpoint.identity(cfg))
    checkpoint.prune(tmp_path, "server", 1)
    assert not (checkpoint.step_dir(tmp_path, 3) / "server.pt.sha256").exists()


def test_a_checkpoint_written_before_an_option_existed_resumes_at_its_default(tmp_path):
    """An upgrade that adds an option (at a default that keeps the computation) changes the fingerprint; the
    options kept in the file still let the checkpoint resume. A changed option is named; a file from before
    options were kept (fingerprint only) still needs the same fingerprint."""
    cfg = parse_args(["--lr", "0.2"])
    older = checkpoint.identity(cfg)
    del older["options"]["label_defence"]  # as if written before --label-defence existed
    older["fingerprint"] = "0" * 16
    checkpoint.save(tmp_path, 3, "server", {**older, "w": 1})
    assert checkpoint.load(tmp_path, 3, "server", cfg)["w"] == 1
    with pytest.raises(Exception, match=r"written by a run with different options \(--label-defence, --labels, --lr\)"):
        checkpoint.load(tmp_path, 3, "server", parse_args(["--labels", "hospital", "--label-defence", "mixup"]))
    checkpoint.save(tmp_path, 6, "server", {"fingerprint": "0" * 16, "w": 2})  # no options kept
    with pytest.raises(Exception, match=r"written by a run with different options; resume"):
        checkpoint.load(tmp_path, 6, "server", cfg)


def test_a_run_resumes_past_a_damaged_newest_checkpoint(cli, tmp_path):
    """The newest checkpoint's file damaged after a crash: the run resumes from the step before, names the
    file it skipped in one line, and ends with the weights of an uninterrupted run, bit for bit."""
    common = ["--method", "local", *COMMON, "--schedule", "parallel"]
    whole = cli(*common, "--max-steps", 9, "--save-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole
    ckpt = tmp_path / "ckpt"
    assert cli(*common, "--max-steps", 6, "--checkpoint-dir", ckpt, "--checkpoint-every", 3).returncode == 0
    newest = checkpoint.step_dir(ckpt, 6) / "local.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    resumed = cli(*common, "--max-steps", 9, "--checkpoint-dir", ckpt, "--resume", "--save-dir", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed
    assert "resumed at step 3" in resumed.stdout, resumed
    assert f"checkpoint {newest} is skipped: its bytes do not match" in resumed.stderr, resumed.stderr
    for name in SAVED["local"]:
        a, b = torch.load(tmp_path / "whole" / name), torch.load(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
