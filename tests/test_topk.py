"""The top-k cut in real runs: its bytes in all three layers, and a resumed run that continues exactly."""

import torch

SMALL = ["--method", "split", "--dataset", "synthetic", "--model", "vgg11", "--width", "0.25", "--threads", "1",
         "--synthetic-train", 512, "--synthetic-test", 64, "--batch-size", 16, "--hospitals", 2]


def test_topk_bytes_match_the_count_from_shapes_and_the_kernel(cli):
    """VGG-11 x0.25 at cut 1 sends 16 x 32 x 32 = 16384 values per sample; ratio 16 keeps k = 1024. Per step
    and hospital: up, k bfloat16 values + k int16 positions + 1 label byte per sample; down, k bfloat16 values."""
    result = cli(*SMALL, "--codec", "topk", "--topk-ratio", 16, "--max-steps", 6, "--schedule", "parallel")
    assert result.returncode == 0, result
    train = result.records[-1]["comm"]["phases"]["train"]
    batch, k, steps = 16, 16384 // 16, 6
    up, down = steps * batch * (k * (2 + 2) + 1), steps * batch * k * 2
    for layer in ("analytic_bytes", "payload_bytes"):
        assert train[layer]["hospital1"] == {"sent": up, "received": down}, layer
    tcp = train["tcp_bytes"]["hospital1"]
    # The kernel's count adds RPC framing (~470 bytes a message) and TCP's own: within 5 %.
    assert abs(tcp["sent"] / up - 1) < 0.05 and abs(tcp["received"] / down - 1) < 0.05, tcp


def test_topk_with_feedback_and_random_draws_resumes_exactly(cli, tmp_path):
    """The hospital's residual and the seeded draws are part of its state: stopped after 4 of 8 steps and
    resumed, every party ends with exactly the weights of an uninterrupted run."""
    common = [*SMALL, "--codec", "topk", "--topk-ratio", 8, "--topk-values", "fp8", "--topk-random", 0.2,
              "--topk-feedback", "--schedule", "sequential"]
    whole = cli(*common, "--max-steps", 8, "--save-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole
    ckpt = tmp_path / "ckpt"
    first = cli(*common, "--max-steps", 4, "--checkpoint-dir", ckpt, "--checkpoint-every", 2)
    assert first.returncode == 0, first
    second = cli(*common, "--max-steps", 8, "--checkpoint-dir", ckpt, "--resume", "--save-dir", tmp_path / "resumed")
    assert second.returncode == 0 and "resumed at step 4" in second.stdout, second
    for name in ("trunk.pt", "head-hospital1.pt", "head-hospital2.pt"):
        a, b = torch.load(tmp_path / "whole" / name), torch.load(tmp_path / "resumed" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
