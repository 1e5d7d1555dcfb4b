import pytest

from splitrpc.config import Config, from_dict, parse_args
from splitrpc.errors import UserError


def test_defaults_then_toml_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "vgg11"\nlr = 0.2\nhospitals = 4\nmilestones = [0.3, 0.6]\naugment = false\nbatch-size = 32\n')
    cfg = parse_args(["--config", str(toml), "--lr", "0.3"])
    assert (cfg.model, cfg.lr, cfg.hospitals, cfg.milestones, cfg.augment, cfg.batch_size) == \
        ("vgg11", 0.3, 4, (0.3, 0.6), False, 32)
    assert cfg.method == Config.method and cfg.config == str(toml)
    assert parse_args(["--config", str(toml), "--augment"]).augment is True


def test_num_classes_follows_dataset():
    assert parse_args(["--dataset", "cifar100"]).num_classes == 100
    assert parse_args(["--dataset", "cifar10"]).num_classes == 10
    assert parse_args(["--dataset", "imagefolder", "--num-classes", "7"]).num_classes == 7


def test_world_size():
    assert parse_args(["--method", "split", "--hospitals", "3"]).world_size == 4
    assert parse_args(["--method", "ddp", "--hospitals", "3"]).world_size == 3
    assert parse_args(["--method", "local", "--hospitals", "3"]).world_size == 1
    assert parse_args(["--method", "fedavg", "--hospitals", "3"]).world_size == 3
    assert parse_args(["--method", "split-local", "--hospitals", "3"]).world_size == 1


def test_record_round_trip():
    cfg = parse_args(["--model", "vgg16", "--milestones", "0.2,0.9"])
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("args,message", [
    (["--model", "alexnet"], "--model: unknown value 'alexnet'"),
    (["--dataset", "mnist"], "--dataset: unknown value 'mnist'"),
    (["--schedule", "random"], "--schedule: unknown value"),
    (["--hospitals", "0"], "--hospitals must be at least 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--lr", "fast"], "--lr: expected float"),
    (["--batch-size", "1.5"], "--batch-size: expected int"),
    (["--cut", "0"], "--cut must be at least 1"),
    (["--milestones", "0.9,0.2"], "--milestones must be increasing"),
    (["--frobnicate", "3"], "unrecognized arguments: --frobnicate"),
    (["--config", "/nonexistent.toml"], "no such file"),
    (["--noise", "-1"], "--noise must be a non-negative number"),
    (["--nopeek", "-0.5"], "--nopeek must be a non-negative number"),
    (["--capture-samples", "0"], "--capture-samples must be at least 1"),
    (["--l1-init", "foo"], "--l1-init: unknown value 'foo'"),
    (["--l1-grad-scale", "half"], "--l1-grad-scale: unknown value 'half'"),
    (["--server-threads", "-1"], "--server-threads must not be negative"),
    (["--hospital-threads", "two"], "--hospital-threads: expected int"),
    (["--prefetch", "maybe"], "unrecognized arguments: maybe"),  # a switch: --prefetch or --no-prefetch
    (["--method", "ddp", "--l1-grad-scale", "none"], "--l1-grad-scale none does not apply to --method ddp (it is "
                                                     "read by --method split, split-local)"),
    (["--method", "split-local", "--l1-init", "private"], "--method split-local reproduces --l1-init shared only"),
    (["--method", "fedavg", "--local-steps", "0"], "--local-steps must be at least 1"),
    (["--method", "fedavg", "--local-steps", "2.5"], "--local-steps: expected int"),
    (["--method", "ddp", "--local-steps", "4"], "--local-steps 4 does not apply to --method ddp (it is read by "
                                                "--method fedavg)"),
    (["--method", "local", "--no-prefetch"], "--no-prefetch does not apply to --method local"),
    (["--method", "split-local", "--codec", "fp8"], "--codec fp8 does not apply to --method split-local"),
    (["--method", "fedavg", "--lr-scaling"], "--lr-scaling does not apply to --method fedavg (it is read by --method ddp)"),
    (["--tail", "2"], "--tail 2 sets the U-shaped tail: it needs --labels hospital"),
    (["--topk-ratio", "8"], "--topk-ratio sets the top-k codec: it needs --codec topk"),
    (["--codec", "topk", "--topk-ratio", "1"], "--topk-ratio must be at least 2"),
    (["--codec", "topk", "--topk-random", "1"], "--topk-random must be in [0, 1)"),
    (["--codec", "topk", "--topk-values", "fp16"], "--topk-values: unknown value 'fp16'"),
    (["--codec", "topk", "--labels", "hospital"], "--codec topk cannot be combined with --labels hospital"),
    (["--method", "ddp", "--codec", "topk"], "--codec topk does not apply to --method ddp"),
    (["--method", "fedavg", "--on-hospital-failure", "continue"], "--method fedavg supports --on-hospital-failure "
                                                                   "abort only"),
    (["--method", "fedavg", "--checkpoint-every", "2e"], "--resume and --checkpoint-every need --checkpoint-dir"),
])
def test_bad_input_is_one_clear_error(args, message):
    with pytest.raises(UserError) as info:
        parse_args(args)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        parse_args(["--config", str(bad)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("colour = 'red'\n")
    with pytest.raises(UserError, match="unknown option 'colour'"):
        parse_args(["--config", str(unknown)])
