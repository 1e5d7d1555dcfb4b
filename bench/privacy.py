"""Attack what the server received in the privacy runs, and record how much leaked.

    python -m bench run bench/configs/privacy.toml     # trains, keeps captures (results/privacy.jsonl)
    python -m bench.privacy                            # attacks them -> results/privacy_attacks.jsonl

For each training run, hospital1's last activations as the server received them
(with noise, if the run added it) are attacked three ways:

* black box: an honest-but-curious server that does not know L1's weights. It
  trains a surrogate head through its own frozen trunk on public auxiliary data
  (the CIFAR-10 test split, disjoint from the hospitals' training images), then
  a decoder from the surrogate's activations back to images, and decodes what it
  received (query-free model inversion, He et al. 2019);
* white box (upper bound): optimisation-based inversion through the true L1;
* and the distance correlation between the inputs and the activations.

The inputs behind the activations come from the hospital's own capture; only an
auditor holding both sides could compute these numbers. Each result also keeps
8 originals and their reconstructions (results/privacy/<run_key>.npz), from
which `make plots` draws the grids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from splitrpc import codec, data
from splitrpc.privacy import image_metrics, inversion
from splitrpc.privacy.label_leakage import label_leakage_report
from splitrpc.config import from_dict
from splitrpc.errors import UserError, report
from splitrpc.models import build_for, model_for, split_model, split_u
from splitrpc.record import append_jsonl

AUX_SAMPLES = 5000  # public auxiliary data: the first images of the CIFAR-10 test split
SURROGATE_STEPS = 1500
DECODER_STEPS = 1500
WHITE_BOX_STEPS = 300
GRID_IMAGES = 8
KNOWN_PER_CLASS = 5  # labels the attacker knows per class (as in bench.label_leakage)
ATTACKER_SEED = 12345  # the attacker's own initialisation, unrelated to the hospitals'


def load_capture(directory: Path, hospital: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, activations) of the batches both the server and the hospital kept, aligned by (epoch, batch)."""
    received = {(b["epoch"], b["batch"]): b for b in torch.load(directory / f"{hospital}-received.pt")}
    inputs = {(b["epoch"], b["batch"]): b for b in torch.load(directory / f"{hospital}-inputs.pt")}
    keys = sorted(set(received) & set(inputs))
    if not keys:
        raise UserError(f"{directory}: no batch kept by both the server and {hospital}")
    return (torch.cat([inputs[k]["inputs"] for k in keys]), torch.cat([received[k]["activations"] for k in keys]))


def label_leakage(record: dict, cfg) -> dict:
    """What the server learns of hospital1's labels from what it received.

    Vanilla: it receives them (accuracy 1.0 by construction). U-shaped: the label attacks
    of splitrpc.privacy on the loss gradients the server kept, scored against the labels
    the hospital kept (aligned by epoch and batch); the server knows KNOWN_PER_CLASS
    labels per class, and only the others are scored.
    """
    if cfg.labels != "hospital":
        return {"server_has_labels": True, "direction_mean_acc": 1.0}
    directory = Path(record["capture"]["dir"])
    received = {(b["epoch"], b["batch"]): b for b in torch.load(directory / "hospital1-received.pt")}
    kept = {(b["epoch"], b["batch"]): b for b in torch.load(directory / "hospital1-inputs.pt")}
    keys = sorted(set(received) & set(kept))
    gradients = torch.cat([received[k]["output_gradient"] for k in keys])
    labels = torch.cat([kept[k]["labels"] for k in keys])
    report = label_leakage_report(gradients, labels, cfg.num_classes, KNOWN_PER_CLASS, seed=ATTACKER_SEED)
    return {"server_has_labels": False, **{k: v for k, v in report.items() if not k.endswith("per_class")}}


def auxiliary_images(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacker's public data: the first AUX_SAMPLES images of the test split, normalised, and their labels."""
    aux = data.load_split(cfg.replace(limit_test=0), "test")
    count = min(AUX_SAMPLES, len(aux.labels))
    normalize = data.Normalizer(cfg)
    return (normalize(torch.from_numpy(aux.images.take(np.arange(count))).permute(0, 3, 1, 2)),
            torch.from_numpy(aux.labels[:count]))


def blind_guess(record: dict) -> dict:
    """PSNR/SSIM of guessing the mean auxiliary image for every input: the score of learning nothing."""
    cfg = from_dict(record["config"])
    inputs, _ = load_capture(Path(record["capture"]["dir"]), "hospital1")
    aux_images, _ = auxiliary_images(cfg)
    guess = aux_images.mean(0, keepdim=True).expand_as(inputs)
    originals = image_metrics.denormalize(inputs, cfg.dataset).clamp(0, 1)
    guessed = image_metrics.denormalize(guess, cfg.dataset).clamp(0, 1)
    return {"psnr": image_metrics.psnr(guessed, originals, data_range=1.0),
            "ssim": image_metrics.ssim(guessed, originals, data_range=1.0)}


class TopK(torch.nn.Module):
    """A head whose output crosses as top-k does (--codec topk): per sample the largest 1/ratio of the
    values by magnitude, zeros elsewhere. The attacker knows the codec: its surrogate and the white-box
    inversion see activations as sparse as the ones it received."""

    def __init__(self, head: torch.nn.Module, k: int):
        super().__init__()
        self.head, self.k = head, k

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.head(images)
        flat = out.reshape(len(out), -1)
        positions = flat.abs().topk(self.k, dim=1).indices
        return torch.zeros_like(flat).scatter(1, positions, flat.gather(1, positions)).view_as(out)


def attack_run(record: dict, grids_dir: Path) -> dict:
    cfg = from_dict({k: v for k, v in record["config"].items()})
    capture = Path(record["capture"]["dir"])
    model_dir = Path(cfg.save_dir)
    inputs, activations = load_capture(capture, "hospital1")
    started = time.perf_counter()
    torch.manual_seed(ATTACKER_SEED)

    # The server's own trunk, as trained; the true L1 only for the white-box bound.
    also_train = []
    if cfg.labels == "hospital":
        # U-shaped: the server holds only the middle. It appends a tail of its own (from its own
        # initialisation) and trains it with the surrogate, the middle frozen.
        _, middle, _ = split_u(model_for(cfg), cfg.cut, cfg.tail)
        middle.load_state_dict(torch.load(model_dir / "trunk.pt"))
        torch.manual_seed(ATTACKER_SEED)
        _, _, attacker_tail = split_u(build_for(cfg), cfg.cut, cfg.tail)
        trunk = torch.nn.Sequential(middle, attacker_tail)
        also_train = list(attacker_tail.parameters())
    else:
        _, trunk = split_model(model_for(cfg), cfg.cut)
        trunk.load_state_dict(torch.load(model_dir / "trunk.pt"))
    true_head, _ = split_model(model_for(cfg), cfg.cut)
    true_head.load_state_dict(torch.load(model_dir / "head-hospital1.pt"))
    torch.manual_seed(ATTACKER_SEED)
    template, _ = split_model(build_for(cfg), cfg.cut)
    if cfg.codec == "topk":
        k = codec.for_config(cfg).k(activations.shape)
        true_head, template = TopK(true_head, k), TopK(template, k)

    aux_images, aux_labels = auxiliary_images(cfg)
    count = len(aux_labels)

    black_box = inversion.attack(trunk, template, aux_images, aux_labels, activations,
                               surrogate_steps=SURROGATE_STEPS, decoder_steps=DECODER_STEPS, seed=ATTACKER_SEED,
                               also_train=also_train)
    white_box = inversion.invert_white_box(true_head, activations, steps=WHITE_BOX_STEPS, seed=ATTACKER_SEED)
    black = inversion.leakage_report(inputs, black_box, activations, cfg.dataset)
    white = inversion.leakage_report(inputs, white_box, activations, cfg.dataset)

    grids_dir.mkdir(parents=True, exist_ok=True)
    to_pixels = lambda x: (image_metrics.denormalize(x[:GRID_IMAGES].float(), cfg.dataset).clamp(0, 1) * 255).round().to(
        torch.uint8).numpy()
    np.savez_compressed(grids_dir / f"{cfg.run_key}.npz", original=to_pixels(inputs), black_box=to_pixels(black_box),
                        white_box=to_pixels(white_box))
    train = record["comm"]["per_epoch"]["tcp"]
    return {
        "record_version": 1, "status": "ok", "run_key": cfg.run_key,
        "defence": {"cut": cfg.cut, "noise": cfg.noise, "nopeek": cfg.nopeek, "codec": cfg.codec,
                    "labels": cfg.labels, "tail": cfg.tail if cfg.labels == "hospital" else 0,
                    "method": cfg.method, "bottleneck": cfg.bottleneck,
                    "topk_ratio": cfg.topk_ratio if cfg.codec == "topk" else None},
        "model": cfg.model, "width": cfg.width, "dataset": cfg.dataset,
        "test_acc": record["final_test_acc"], "test_acc_min": record["final_test_acc_min"],
        "train_bytes_per_epoch": train["total"], "train_bytes_per_hospital_per_epoch": train["per_hospital"],
        "activation_shape": list(activations.shape[1:]),
        "samples_attacked": len(activations),
        "dcor": black["dcor"], "dcor_bias_corrected": black["dcor_bias_corrected"],
        "black_box": {"psnr": black["psnr"], "ssim": black["ssim"]},
        "white_box": {"psnr": white["psnr"], "ssim": white["ssim"]},
        "labels": label_leakage(record, cfg),
        "attack": {"aux_samples": count, "surrogate_steps": SURROGATE_STEPS, "decoder_steps": DECODER_STEPS,
                   "white_box_steps": WHITE_BOX_STEPS, "seconds": time.perf_counter() - started},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="results/privacy.jsonl")
    parser.add_argument("--out", default="results/privacy_attacks.jsonl")
    parser.add_argument("--grids", default="results/privacy")
    parser.add_argument("--blind-guess", action="store_true",
                        help="only print the PSNR/SSIM of guessing the mean auxiliary image, per run (the floor)")
    args = parser.parse_args(argv)
    try:
        path = Path(args.results)
        if not path.exists():
            raise UserError(f"{path}: no privacy runs yet (python -m bench run bench/configs/privacy.toml)")
        done = set()
        if Path(args.out).exists():
            done = {json.loads(line)["run_key"] for line in Path(args.out).read_text().splitlines() if line.strip()}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if args.blind_guess:
            for record in (r for r in records if r.get("status") == "ok"):
                floor = blind_guess(record)
                print(f"[privacy] {record['config']['run_key']}: mean-image guess PSNR {floor['psnr']:.2f} dB "
                      f"SSIM {floor['ssim']:.3f}", flush=True)
            return 0
        todo = [r for r in records if r.get("status") == "ok" and r["config"]["run_key"] not in done]
        print(f"[privacy] {len(todo)} runs to attack ({len(done)} done)", flush=True)
        torch.set_num_threads(max(1, torch.get_num_threads()))
        for i, record in enumerate(todo, start=1):
            d = record["config"]
            print(f"[privacy] {i}/{len(todo)}: cut={d['cut']} noise={d['noise']} nopeek={d['nopeek']} codec={d['codec']}", flush=True)
            result = attack_run(record, Path(args.grids))
            append_jsonl(args.out, result)
            print(f"[privacy]   dcor {result['dcor']:.3f} (R* {result['dcor_bias_corrected']:.3f}), black box "
                  f"PSNR {result['black_box']['psnr']:.2f} dB SSIM {result['black_box']['ssim']:.3f}, white box "
                  f"PSNR {result['white_box']['psnr']:.2f} dB, {result['attack']['seconds']:.0f}s", flush=True)
        return 0
    except UserError as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
