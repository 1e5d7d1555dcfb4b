"""--bottleneck R: a learned encoder at the end of the hospital's stages and its decoder at the start of
the server's, so that R times fewer values cross the cut (C3-SL / BottleNet style)."""

import math

import pytest
import torch

from conftest import options_for
from splitrpc.config import parse_args
from splitrpc.errors import UserError
from splitrpc.models import (activation_shape, add_bottleneck, bottleneck_layout, bottleneck_ratios, build_model, model_for,
                             split_model, split_u)

from test_reference import EXACT, assert_split_equals_reference, run_both
from test_split import SMALL, assert_equivalent

VGG = ["--model", "vgg11", "--width", "0.25"]  # 16x32x32 activations at cut 1


@pytest.mark.parametrize("args,original,expected", [
    ([*VGG, "--bottleneck", 16], (16, 32, 32), (4, 16, 16)),   # stride 2 (4x), then 16 -> 4 channels
    ([*VGG, "--bottleneck", 4], (16, 32, 32), (16, 16, 16)),   # stride 2 alone
    ([*VGG, "--bottleneck", 2], (16, 32, 32), (8, 32, 32)),    # channels alone below 4x
    ([*VGG, "--bottleneck", 64], (16, 32, 32), (1, 16, 16)),
    (["--model", "resnet20", "--width", 0.5, "--cut", 8, "--bottleneck", 32], (32, 8, 8), (4, 4, 4)),
    (["--model", "vgg11", "--width", 0.25, "--cut", 8, "--bottleneck", 8, "--norm", "group"], (128, 2, 2), (64, 1, 1)),
])
def test_encoder_shrinks_the_cut_exactly_and_the_trunk_sees_the_original_shape(args, original, expected, one_thread):
    cfg = parse_args([str(a) for a in args])
    plain = model_for(cfg.replace(bottleneck=1))
    model = model_for(cfg)
    assert len(model) == len(plain)  # the stages keep their number: --cut and --tail mean what they meant
    assert activation_shape(plain, cfg.cut) == original
    assert activation_shape(model, cfg.cut) == expected
    assert math.prod(original) == cfg.bottleneck * math.prod(expected)
    head, trunk = split_model(model, cfg.cut)
    assert head[-1].encoder is not None and trunk[0].decoder is not None  # encoder at the hospital, decoder at the server
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    assert tuple(trunk[0].decoder(head(x)).shape[1:]) == original
    assert trunk(head(x)).shape == (3, 10)


def test_the_rest_of_the_network_starts_as_without_the_bottleneck(one_thread):
    # The encoder and decoder draw their weights after the network's own: a run with and one without
    # --bottleneck start from the same convolutions, so comparing them compares the bottleneck only.
    cfg = parse_args([*VGG, "--bottleneck", "16"])
    plain, model = model_for(cfg.replace(bottleneck=1)), model_for(cfg)
    renamed = {k.replace(".stage.", "."): v for k, v in model.state_dict().items()
               if ".encoder." not in k and ".decoder." not in k}
    assert renamed.keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(renamed[k], v), k


def test_u_shaped_split_keeps_encoder_at_the_hospital_and_decoder_in_the_middle():
    cfg = parse_args(["--model", "resnet20", "--width", "0.5", "--bottleneck", "16", "--labels", "hospital", "--tail", "2"])
    head, middle, tail = split_u(model_for(cfg), cfg.cut, cfg.tail)
    assert hasattr(head[-1], "encoder") and hasattr(middle[0], "decoder")
    assert not any(hasattr(stage, "decoder") or hasattr(stage, "encoder") for stage in tail)


def test_only_exact_ratios_are_offered():
    assert bottleneck_ratios((16, 32, 32)) == [1, 2, 4, 8, 16, 32, 64]
    assert bottleneck_layout((16, 32, 32), 3) is None
    assert bottleneck_layout((48, 8, 8), 6) == (2, 32)
    assert bottleneck_ratios((6, 3, 3)) == [1, 2, 3, 6]  # odd sides: only the channels can shrink
    with pytest.raises(UserError, match="choose one of 1, 2, 4, 8, 16, 32, 64"):
        add_bottleneck(build_model("vgg11", width=0.25), 1, 3, "batch")


def test_every_method_builds_the_same_network():
    # DDP and FedAvg never split the model but train the same network, so that their accuracy
    # compares with split learning's at the same --bottleneck.
    for method in ("local", "split-local", "ddp", "fedavg", "split"):
        assert parse_args(["--method", method, *VGG, "--bottleneck", "16"]).bottleneck == 16


@pytest.mark.parametrize("args,message", [
    ([*VGG, "--bottleneck", 3], "--bottleneck 3 cannot shrink the 16x32x32 activations of vgg11 at --cut 1 exactly: "
                                "choose one of 1, 2, 4, 8, 16, 32, 64"),
    ([*VGG, "--bottleneck", 128], "choose one of 1, 2, 4, 8, 16, 32, 64"),
    ([*VGG, "--bottleneck", 0], "--bottleneck must be at least 1, got 0"),
    ([*VGG, "--bottleneck", 16, "--method", "ddp", "--cut", 9], "--cut 9 is out of range"),
])
def test_bad_ratio_is_one_line_and_exit_2(cli_check, args, message):
    result = cli_check("--dataset", "synthetic", *args)
    assert result.returncode == 2 and message in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1, result


# --- runs ------------------------------------------------------------------------------------------
RUN = ["--method", "split", "--hospitals", 2, "--dataset", "synthetic", "--synthetic-train", 512,
       "--synthetic-test", 128, *VGG, "--batch-size", 32, "--threads", 1, "--schedule", "parallel",
       "--max-steps", 4, "--log-every", 1000, "--eval-batch-size", 128]


@pytest.mark.distributed
def test_split_equals_its_reference_with_a_bottleneck(cli, tmp_path):
    # float64, BatchNorm in the encoder (each hospital's own batch) and in the decoder (the
    # concatenated batch), independent L1s: split learning and its one-process reference agree.
    common = [*EXACT, "--bottleneck", 16, "--hospitals", 2, "--schedule", "parallel", "--l1", "independent",
              "--batch-size", 16, "--max-steps", 6, "--synthetic-train", 512]
    reference, split = run_both(cli, tmp_path, common)
    heads = assert_split_equals_reference(tmp_path, reference, split, 2, 6)
    assert "0.encoder.conv.weight" in heads[0]  # the encoder is the hospital's, saved with its L1
    assert "0.decoder.conv.weight" in torch.load(tmp_path / "split" / "trunk.pt")


@pytest.mark.distributed
def test_one_hospital_split_equals_local_training_with_a_bottleneck(cli, tmp_path):
    # --method local --bottleneck trains the identical network: with one hospital, bit for bit.
    common = [*SMALL, "--bottleneck", 16, "--hospitals", 1, "--schedule", "sequential", "--batch-size", 32,
              "--max-steps", 20, "--synthetic-train", 640]
    local = cli("--method", "local", *options_for("local", common), "--save-dir", tmp_path / "local",
                "--out", tmp_path / "local.jsonl")
    split = cli("--method", "split", *common, "--save-dir", tmp_path / "split", "--out", tmp_path / "split.jsonl")
    local.out, split.out = tmp_path / "local.jsonl", tmp_path / "split.jsonl"
    assert_equivalent(local, split, tmp_path, 1, rtol=0.0)


def _train_bytes(record: dict, kind: str) -> dict:
    return record["comm"]["phases"]["train"][f"{kind}_bytes"]["hospital1"]


@pytest.mark.distributed
def test_bottleneck_sends_r_times_fewer_activation_bytes(cli, tmp_path):
    plain = cli(*RUN, out=True)
    assert plain.returncode == 0, plain
    squeezed = cli(*RUN, "--bottleneck", 16, "--out", tmp_path / "squeezed.jsonl")
    squeezed.out = tmp_path / "squeezed.jsonl"
    assert squeezed.returncode == 0, squeezed
    # Written out from the shapes: VGG-11 x0.25 at cut 1 sends 16x32x32 float32 values per sample;
    # with --bottleneck 16, 4x16x16. One byte per label up either way; the gradient likewise, down.
    steps, batch = 4, 32
    plain_values, squeezed_values = 16 * 32 * 32, 4 * 16 * 16
    assert plain_values == 16 * squeezed_values
    for record, values in ((plain.records[0], plain_values), (squeezed.records[0], squeezed_values)):
        expected = {"sent": steps * batch * (4 * values + 1), "received": steps * batch * 4 * values}
        assert _train_bytes(record, "analytic") == expected
        assert _train_bytes(record, "payload") == expected
    analytic = [_train_bytes(r, "analytic") for r in (plain.records[0], squeezed.records[0])]
    assert analytic[0]["received"] == 16 * analytic[1]["received"]
    assert analytic[0]["sent"] - steps * batch == 16 * (analytic[1]["sent"] - steps * batch)
    # The kernel's count: within 5 % of what the code handed over, at 1/16 of the size.
    assert 1.0 <= squeezed.records[0]["comm"]["phases"]["train"]["tcp_delivered_over_payload"] <= 1.05


@pytest.mark.distributed
def test_bottleneck_with_fp8_codec_and_u_shape(cli, tmp_path):
    # The codec encodes the encoder's output: 4x16x16 values of one byte plus 4 float32 scales per batch.
    result = cli(*RUN, "--bottleneck", 16, "--codec", "fp8", "--weight-decay", 0, "--save-dir", tmp_path / "fp8")
    assert result.returncode == 0, result
    per_batch = 32 * 4 * 16 * 16 + 4 * 4
    assert _train_bytes(result.records[0], "analytic") == {"sent": 4 * (per_batch + 32), "received": 4 * per_batch}
    assert _train_bytes(result.records[0], "payload") == _train_bytes(result.records[0], "analytic")
    # The encoder learned through the fp8 cut (no weight decay: only gradients move it).
    initial, _ = split_model(model_for(parse_args([*VGG, "--bottleneck", "16"])), 1)
    trained = torch.load(tmp_path / "fp8" / "head-hospital1.pt")
    moved = (trained["0.encoder.conv.weight"] - initial.state_dict()["0.encoder.conv.weight"]).abs().max().item()
    assert moved > 1e-4
    # U-shaped: the same encoder output goes up; the counts still agree.
    ushape = cli(*RUN, "--bottleneck", 16, "--labels", "hospital", "--max-steps", 2, "--out", tmp_path / "u.jsonl")
    ushape.out = tmp_path / "u.jsonl"
    assert ushape.returncode == 0, ushape
    assert _train_bytes(ushape.records[0], "payload") == _train_bytes(ushape.records[0], "analytic")
