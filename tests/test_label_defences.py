"""Label defences of a U-shaped hospital (--label-defence), the newer label attacks, and per-epoch captures."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from splitrpc.config import parse_args
from splitrpc.errors import UserError
from splitrpc.privacy import label_defences, label_leakage
from splitrpc.privacy.capture import Capture
from splitrpc.split.hospital import Hospital

C = 10


def linear_tail():
    return torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, C))


def conv_tail():
    """A 2-stage tail, as --tail 2 keeps at the hospital: a convolution before the classifier."""
    return torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), linear_tail())


def tail_gradients(n: int = 400, seed: int = 0, tail_factory=linear_tail):
    """Trunk outputs, labels and the exact gradients a U-shaped tail (linear unless given) returns for them."""
    torch.manual_seed(seed)
    z, labels = torch.randn(n, 32, 2, 2), torch.randint(0, C, (n,))
    tail = tail_factory()
    inputs = z.clone().requires_grad_()
    gradients = torch.autograd.grad(F.cross_entropy(tail(inputs), labels), inputs)[0]
    return z, labels, gradients


def unknown_accuracy(scores, labels, known):
    unknown = torch.ones(len(labels), dtype=torch.bool)
    unknown[known] = False
    return label_leakage.accuracy(scores[unknown].argmax(1), labels[unknown])


# --------------------------------------------------------------------------- attacks
def test_gradient_matching_names_labels_from_exact_gradients_and_not_from_unrelated_ones():
    z, labels, gradients = tail_gradients()
    known = label_leakage.pick_known(labels, 5, C)
    scores = label_leakage.gradient_matching_scores(gradients, z, linear_tail, known, labels[known], C, steps=100)
    assert unknown_accuracy(scores, labels, known) >= 0.95
    unrelated = label_leakage.gradient_matching_scores(torch.randn_like(gradients), z, linear_tail, known,
                                                       labels[known], C, steps=100)
    assert unknown_accuracy(unrelated, labels, known) <= 0.25


def test_gradient_matching_through_a_convolution_stage_fits_in_float32_and_still_names_the_labels():
    """A convolving tail is matched in float32 (float64 convolution is 8x slower on CPU); the known case
    must still come out."""
    assert label_leakage.matching_dtype(conv_tail()) == torch.float32
    assert label_leakage.matching_dtype(linear_tail()) == torch.float64
    z, labels, gradients = tail_gradients(tail_factory=conv_tail)
    known = label_leakage.pick_known(labels, 5, C)
    scores = label_leakage.gradient_matching_scores(gradients, z, conv_tail, known, labels[known], C, steps=100)
    assert scores.dtype == torch.float64
    assert unknown_accuracy(scores, labels, known) >= 0.9
    unrelated = label_leakage.gradient_matching_scores(torch.randn_like(gradients), z, conv_tail, known,
                                                       labels[known], C, steps=100)
    assert unknown_accuracy(unrelated, labels, known) <= 0.25


def test_gradient_matching_sees_through_noise_that_blinds_the_direction_attack():
    """Isotropic noise hides the direction of the whole gradient; the surrogate tail knows from the trunk
    output which positions the pooling passed, and matches there: it reads labels the direction attack
    cannot."""
    z, labels, gradients = tail_gradients()
    known = label_leakage.pick_known(labels, 5, C)
    noisy = label_defences.defend_gradients("noise", 2.0, gradients, labels, torch.Generator().manual_seed(1))
    direction = label_leakage.class_direction_scores(noisy, known, labels[known], C)
    matching = label_leakage.gradient_matching_scores(noisy, z, linear_tail, known, labels[known], C)
    assert unknown_accuracy(direction, labels, known) < 0.4
    assert unknown_accuracy(matching, labels, known) >= unknown_accuracy(direction, labels, known) + 0.3


def test_model_completion_reads_labels_from_separable_features_only():
    torch.manual_seed(0)
    labels = torch.randint(0, C, (500,))
    separable = torch.randn(500, 64) + 20 * F.one_hot(labels, 64).float()
    known = label_leakage.pick_known(labels, 5, C)
    assert unknown_accuracy(label_leakage.model_completion_scores(separable, known, labels[known], C),
                            labels, known) >= 0.95
    assert unknown_accuracy(label_leakage.model_completion_scores(torch.randn(500, 64), known, labels[known], C),
                            labels, known) <= 0.2


def test_forward_and_matching_report_scores_only_the_unknown_samples():
    z, labels, gradients = tail_gradients(200)
    report = label_leakage.forward_and_matching_report(gradients, z, labels, C, 1, linear_tail)
    assert set(report) == {"completion_acc", "completion_auc", "matching_acc", "matching_auc"}
    assert report["matching_acc"] >= 0.9 and report["matching_auc"] >= 0.95
    assert set(label_leakage.forward_and_matching_report(gradients, z, labels, C, 1)) == {"completion_acc",
                                                                                          "completion_auc"}


# --------------------------------------------------------------------------- defences
def test_class_spread_noise_blurs_the_class_means_in_proportion_to_its_scale():
    z, labels, gradients = tail_gradients(2000)
    known = label_leakage.pick_known(labels, 5, C)
    accuracies = []
    for scale in (0.0, 1.0, 16.0):
        defended = label_defences.defend_gradients("marvell", scale, gradients, labels,
                                                   torch.Generator().manual_seed(0))
        accuracies.append(unknown_accuracy(label_leakage.class_direction_scores(defended, known, labels[known], C),
                                           labels, known))
    assert accuracies[0] >= 0.99 and accuracies[0] > accuracies[1] > accuracies[2], accuracies
    # The noise lies in the span of the class-mean differences: orthogonal to it, nothing changes.
    flat = gradients.reshape(len(gradients), -1).double()
    means = torch.stack([flat[labels == c].mean(0) - flat.mean(0) for c in range(C)])
    basis = torch.linalg.qr(means.T).Q
    defended = label_defences.class_spread_noise(gradients, labels, 16.0, torch.Generator().manual_seed(0))
    residual = defended.reshape(len(gradients), -1).double() - flat
    assert (residual - residual @ basis @ basis.T).abs().max() < 1e-5


def test_randomized_response_keeps_each_label_at_the_rate_epsilon_allows():
    labels = torch.arange(C).repeat(5000)
    for epsilon in (0.5, 2.0, 8.0):
        drawn = label_defences.randomized_response(labels, epsilon, C, torch.Generator().manual_seed(0))
        kept = (drawn == labels).double().mean().item()
        assert abs(kept - math.exp(epsilon) / (math.exp(epsilon) + C - 1)) < 0.01
        assert drawn.min() >= 0 and drawn.max() < C
        if epsilon == 0.5:  # a replaced label is any other class alike (42 000 replaced: shares within 0.01)
            changed = drawn[drawn != labels] - labels[drawn != labels]
            shares = torch.bincount(changed % C, minlength=C)[1:].double()
            assert (shares / shares.sum() - 1 / (C - 1)).abs().max() < 0.01


def test_mixup_blends_two_samples_gradients_and_alpha_sets_how_much():
    z, labels, _ = tail_gradients(64)
    tail = linear_tail()

    def blend(alpha, seed=0):
        inputs = z.clone().requires_grad_()
        loss = label_defences.mixup_loss(tail, inputs, labels, alpha, torch.Generator().manual_seed(seed))
        return torch.autograd.grad(loss, inputs)[0]

    assert torch.equal(blend(0.5), blend(0.5))  # the step's seed fixes the draw
    direction = {a: unknown_accuracy(label_leakage.class_direction_scores(blend(a), torch.arange(20), labels[:20], C),
                                     labels, torch.arange(20)) for a in (0.05, 2.0)}
    assert direction[2.0] < direction[0.05], direction


@pytest.mark.parametrize("defence", ["noise", "max_norm", "marvell", "rr", "mixup"])
def test_a_defended_hospital_returns_the_gradient_its_defence_makes(defence, tmp_path, cache_dir):
    """In-process: the gradient a U-shaped hospital returns differs from the undefended one, the same
    batch draws the same (a retried step is the same step), and the loss is still one finite value."""
    def reply(defence_args):
        cfg = parse_args(["--method", "split", "--labels", "hospital", "--dataset", "synthetic", "--model",
                          "resnet20", "--width", "0.5", "--batch-size", "16", "--synthetic-train", "64",
                          "--synthetic-test", "32", "--cache-dir", cache_dir, *defence_args])
        hospital = Hospital(cfg, 1)
        hospital.forward(0, 1, 0.05, 1.0)
        return hospital.tail_loss(torch.randn(16, 32, 8, 8, generator=torch.Generator().manual_seed(3)))

    strength = [] if defence == "max_norm" else ["--label-defence-strength", "0.5" if defence == "rr" else "2"]
    plain, defended, again = reply([]), reply(["--label-defence", defence, *strength]), \
        reply(["--label-defence", defence, *strength])
    assert not torch.equal(plain[0], defended[0])
    assert torch.equal(defended[0], again[0]) and torch.isfinite(defended[1]).all()


@pytest.mark.parametrize("args,message", [
    (["--labels", "hospital", "--label-defence", "noise", "--label-defence-strength", "-1"], "non-negative"),
    (["--label-defence", "noise"], "needs --labels hospital"),
    (["--labels", "hospital", "--label-defence", "max_norm", "--label-defence-strength", "2"], "has no strength"),
    (["--labels", "hospital", "--label-defence", "rr", "--label-defence-strength", "0"], "positive strength"),
    (["--labels", "hospital", "--label-defence-strength", "2"], "needs a --label-defence"),
    (["--labels", "hospital", "--label-defence", "dp"], "unknown value"),
    (["--method", "ddp", "--label-defence", "noise"], "does not apply to --method ddp"),
    (["--capture-epochs", "1,3", "--epochs", "2", "--capture-dir", "x"], "--capture-epochs must be epochs in 1..2"),
    (["--capture-epochs", "1"], "needs --capture-dir"),
])
def test_bad_label_defence_settings_are_one_line(cli_check, args, message):
    result = cli_check("--dataset", "synthetic", "--model", "resnet20", *args)
    assert result.returncode == 2 and message in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1, result


def test_check_rejects_what_the_cli_rejects():
    with pytest.raises(UserError, match="non-negative"):
        label_defences.check("marvell", float("nan"), True)
    label_defences.check("marvell", 0.0, True)  # scale 0: no noise, allowed (the frontier's end point)


# --------------------------------------------------------------------------- captures
def test_capture_keeps_the_last_batches_of_each_chosen_epoch():
    capture = Capture(2, epochs=(1, 3))
    for epoch in range(4):
        for batch in range(5):
            capture.add(7, {"epoch": epoch, "batch": batch})
            assert (capture.last(7) is None) == (epoch + 1 not in (1, 3))
    assert [(i["epoch"], i["batch"]) for i in capture.items(7)] == [(0, 3), (0, 4), (2, 3), (2, 4)]
    everything = Capture(2)
    for epoch in range(3):
        everything.add(1, {"epoch": epoch, "batch": 0})
    assert [i["epoch"] for i in everything.items(1)] == [1, 2] and everything.items(2) == []


@pytest.mark.distributed
def test_a_defended_u_shaped_run_captures_what_each_epoch_sent_and_received(cli, tmp_path):
    """Two hospitals in parallel, Marvell's noise, captures of epochs 1 and 2 of 2, the run stopped one step into
    epoch 2 and resumed: each epoch's file is written as the epoch ends, so the resumed run keeps epoch 1's.
    The server keeps the trunk's output and the gradient it got back, the hospital the true labels, under
    the same keys."""
    common = ["--method", "split", "--labels", "hospital", "--label-defence", "marvell",
              "--label-defence-strength", "4", "--dataset", "synthetic", "--model", "resnet20", "--width", "0.5",
              "--hospitals", "2", "--schedule", "parallel", "--batch-size", "16", "--epochs", "2",
              "--synthetic-train", "128",
              "--synthetic-test", "32", "--threads", "1", "--capture-dir", tmp_path / "capture",
              "--capture-samples", "32", "--capture-epochs", "1,2", "--checkpoint-dir", tmp_path / "ckpt",
              "--checkpoint-every", "4"]
    first = cli(*common, "--max-steps", "5", out=False)  # 4 steps an epoch: stopped one step into epoch 2
    assert first.returncode == 0, first
    directory = tmp_path / "capture"
    epoch_one = [(b["epoch"], b["batch"]) for b in torch.load(directory / "hospital1-received-epoch1.pt")]
    assert epoch_one == [(0, 2), (0, 3)]
    result = cli(*common, "--resume")
    assert result.returncode == 0 and "resumed at step" in result.stdout, result
    received = [b for e in (1, 2) for b in torch.load(directory / f"hospital1-received-epoch{e}.pt")]
    inputs = [b for e in (1, 2) for b in torch.load(directory / f"hospital1-inputs-epoch{e}.pt")]
    keys = [(b["epoch"], b["batch"]) for b in received]
    assert keys == [(b["epoch"], b["batch"]) for b in inputs]
    assert keys == [(0, 2), (0, 3), (1, 2), (1, 3)]
    for batch, kept in zip(received, inputs):
        assert batch["trunk_output"].shape == batch["output_gradient"].shape == (16, 32, 8, 8)
        assert batch["labels"] is None and kept["labels"].shape == (16,)
    record = result.records[0]
    assert record["config"]["label_defence"] == "marvell" and record["capture"]["epochs"] == [1, 2]

    # The bench attacks every captured epoch, and the page and the frontier figure come out of it.
    from bench import label_defences as bench

    runs, attacks = tmp_path / "runs.jsonl", tmp_path / "attacks.jsonl"
    runs.write_text(json.dumps(record) + "\n")
    assert bench.main(["--results", str(runs), "--out", str(attacks), "--known", "1"]) == 0
    assert bench.main(["--results", str(runs), "--out", str(attacks), "--known", "1"]) == 0  # done: skipped
    rows = [json.loads(line) for line in attacks.read_text().splitlines()]
    assert len(rows) == 1 and sorted(rows[0]["attacks"]) == ["1", "2"]
    assert rows[0]["matching_dtype"] == "float64"  # a classifier-only tail: no convolution
    one = rows[0]["attacks"]["2"]["1"]
    assert {"matching_acc", "completion_acc", "direction_mean_acc", "gradient_max_acc"} <= set(one)
    assert one["gradient_max_acc"] == max(one[k] for k in bench.GRADIENT_ACC)
    undefended = dict(rows[0], label_defence="none", label_defence_strength=None, final_test_acc=0.5)
    attacks.write_text(attacks.read_text() + json.dumps(undefended) + "\n")
    page = bench.table(str(attacks))
    assert "| none | 0.5000 | +0.00 |" in page and "| marvell 4 |" in page
    from plots.figures import save

    assert [p.suffix for p in bench.figure(str(attacks), tmp_path, "frontier", save)] == [".png", ".pdf"]


def test_the_label_bench_refuses_bad_counts_in_one_line(tmp_path, capsys):
    from bench import label_defences as bench

    (tmp_path / "runs.jsonl").write_text("")
    assert bench.main(["--results", str(tmp_path / "runs.jsonl"), "--known", "0"]) == 2
    assert "--known: every count must be at least 1" in capsys.readouterr().err


def test_the_price_list_names_the_least_leaking_setting_within_each_budget():
    from bench import label_defences as bench

    def row(defence, strength, acc, gradient, completion=0.7):
        attack = {"gradient_max_acc": gradient, "completion_acc": completion}
        return {"label_defence": defence, "label_defence_strength": strength, "final_test_acc": acc,
                "attacks": {"15": {"5": attack}}}

    rows = [row("none", None, 0.80, 1.0), row("marvell", 4.0, 0.77, 0.6), row("noise", 4.0, 0.72, 0.3, 0.5),
            row("rr", 2.0, 0.66, 0.5)]
    lines = bench.price_list(rows, 0.80)
    table = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "---" not in line}
    assert "none" in table["1"] and "none" in table["2"] and "marvell 4" in table["5"]  # marvell costs 3
    assert "noise 4" in table["10"] and "noise 4" in table["15"] and "| 0.300 | 0.500 |" in table["10"]
    assert bench.price_list(rows, None) == []
