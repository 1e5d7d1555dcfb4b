"""One configuration object for every process of a run.

Defaults live here and nowhere else. A TOML file (``--config``) overrides the
defaults and command-line flags override the file. Every party (server,
hospitals, the local and DDP trainers) receives the same validated ``Config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field

from splitrpc.errors import UserError
from splitrpc.methods import REGISTRY

MODELS = ("vgg11", "vgg16", "resnet18", "resnet20", "resnet56")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
NORMS = ("batch", "group", "none")
PARTITIONS = ("iid", "dirichlet")
SCHEDULES = ("sequential", "parallel")
L1_MODES = ("independent", "average")
L1_INITS = ("shared", "private")
L1_GRAD_SCALES = ("participants", "none")
DEDUP_MODES = ("none", "hmac", "psi")
FAILURE_MODES = ("abort", "continue")
FAULT_KINDS = ("nan", "inf", "shape", "dtype", "labels")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine", "multistep", "onecycle")
TRANSPORTS = ("tcp", "auto")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")
LABEL_MODES = ("server", "hospital")
TOPK_VALUES = ("bf16", "fp8")
SPLITFED_VERSIONS = ("1", "2")
LABEL_DEFENCES = ("none", "noise", "max_norm", "marvell", "rr", "mixup")  # splitrpc.privacy.label_defences
CODECS = ("none", "bf16", "fp16", "fp8", "topk")  # splitrpc.codec.CODECS; kept here so that config imports no torch


def _opt(section: str, default, help, choices=None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, "section": section, **kw})


@dataclass(frozen=True)
class RunOptions:
    """What to run: the method, how many hospitals, and where its record goes."""

    method: str = _opt("run", "split", "the training method (each is declared in splitrpc.methods.REGISTRY): split "
                       "learning; local: centralized training in one process; ddp: the data-parallel baseline; "
                       "fedavg: federated averaging; split-local: split learning's arithmetic in one process (N "
                       "L1 copies + one trunk), the exact reference for --method split; splitfed: SplitFed "
                       "(Thapa et al., 2022), split learning with FedAvg-averaged L1s (and trunk replicas, version 1)",
                       metavar="{" + ",".join(REGISTRY) + "}")
    hospitals: int = _opt("run", 2, "number of hospitals (ranks 1..N under split; ranks 0..N-1 under ddp)")
    out: str = _opt("run", "", "append the run record (one JSON line) to this file")
    tag: str = _opt("run", "", "free-form label stored in the run record")
    run_key: str = _opt("run", "", "identifier of a run in a benchmark matrix (set by `python -m bench`)")
    config: str = _opt("run", "", "TOML file with any of these options; flags override it")


@dataclass(frozen=True)
class ModelOptions:
    """The network, and where it is cut between the hospitals and the server."""

    model: str = _opt("model", "resnet20", "network architecture", MODELS)
    width: float = _opt("model", 1.0, "channel-width multiplier (narrow models for CPU runs)")
    norm: str = _opt("model", "batch", "normalisation layers; 'group' or 'none' make a step independent of how the batch is grouped", NORMS)
    cut: int = _opt("model", 1, "number of model stages kept at the hospital (1 = the first conv+norm+ReLU)")
    bottleneck: int = _opt("model", 1, "a learned bottleneck at the cut: an encoder ends the hospital's stages and a "
                           "decoder starts the server's, trained with the rest, so that R times fewer values cross "
                           "(1 = none; every method builds the same network, so baselines compare like with like)")


@dataclass(frozen=True)
class DataOptions:
    """Where the images come from and how they are shared out (read by the hospitals only)."""

    dataset: str = _opt("data", "cifar10", "data source", DATASETS)
    data_dir: str = _opt("data", "data", "torchvision root, an ImageFolder tree with train/ and test/, or a .tar.gz of one")
    download: bool = _opt("data", False, "let torchvision download CIFAR if it is missing")
    cache_dir: str = _opt("data", "~/.cache/splitrpc", "where decoded uint8 tensors are cached, keyed by source")
    partition: str = _opt("data", "iid", "how the training set is split over hospitals", PARTITIONS)
    alpha: float = _opt("data", 0.5, "Dirichlet concentration for --partition dirichlet (smaller = more label skew)")
    overlap: float = _opt("data", 0.0, "copy this fraction of each hospital's records to another hospital (duplicates, for experiments)")
    limit_train: int = _opt("data", 0, "use only the first n training samples (0 = all)")
    limit_test: int = _opt("data", 0, "use only the first n test samples (0 = all)")
    augment: bool = _opt("data", True, "random crop (4-pixel padding) and horizontal flip on training batches")
    num_classes: int = _opt("data", 0, "classifier outputs (0 = the dataset's: 100 for cifar100, else 10)")
    synthetic_train: int = _opt("data", 2048, "training samples of --dataset synthetic")
    synthetic_test: int = _opt("data", 512, "test samples of --dataset synthetic")


@dataclass(frozen=True)
class SplitOptions:
    """Split learning: the step schedule, the hospitals' L1s, the U-shape and what crosses the cut."""

    schedule: str = _opt("split", "sequential", "sequential: hospitals take turns; parallel: all hospitals per step", SCHEDULES)
    l1: str = _opt("split", "independent", "each hospital keeps its own L1, or hospitals average L1 weights", L1_MODES)
    l1_sync_every: int = _opt("split", 1, "steps between L1 averages under --l1 average")
    l1_grad_scale: str = _opt("split", "participants", "parallel schedule: multiply each hospital's L1 gradient by the number "
                              "of participants (the gradient of its own batch mean, as in a sequential step) or "
                              "not (none: its share of the concatenated batch's mean)", L1_GRAD_SCALES)
    l1_init: str = _opt("split", "shared", "shared: every L1 starts from --seed, like the local reference (so the server "
                        "could rebuild it); private: each hospital's own randomness (averaged once under --l1 "
                        "average)", L1_INITS)
    labels: str = _opt("split", "server", "server: the server computes the loss (labels travel with the activations); "
                       "hospital: U-shaped, each hospital keeps the last --tail stages and the loss, and labels never "
                       "leave it", LABEL_MODES)
    tail: int = _opt("split", 1, "--labels hospital: model stages each hospital keeps at the end (1 = the classifier)")
    codec: str = _opt("split", "none", "how activations travel up and their gradients down: as they are, as bfloat16 or "
                      "float16, as float8 e4m3 with a float32 scale per channel (about 4x fewer bytes), or top-k: "
                      "per sample the largest 1/--topk-ratio of the values and their positions, the gradient "
                      "at those positions only", CODECS)
    topk_ratio: int = _opt("split", 16, "--codec topk: keep 1 value in this many per sample (k = values // ratio)")
    topk_values: str = _opt("split", "bf16", "--codec topk: the kept values (and the gradient's) as bfloat16, or as float8 "
                            "e4m3 with a float32 scale per sample", TOPK_VALUES)
    topk_random: float = _opt("split", 0.0, "--codec topk: randomized top-k (Zheng et al. 2023): the share of the draw "
                              "that goes to positions outside the top k in training (0 = plain top-k)")
    topk_feedback: bool = _opt("split", False, "--codec topk: error feedback: the hospital adds what the last batch's "
                               "top-k left out to the next batch's activations")
    prefetch: bool = _opt("split", True, "sequential schedule: the next step's hospital computes and sends its activations "
                          "while the server runs this step (only where that leaves the result unchanged)")
    run_ahead: int = _opt("split", 0, "split-localloss: how many of its own steps a hospital may run ahead of the server "
                          "(the server keeps up to k+1 forward requests in flight per hospital; 0: one at a time); "
                          "the weights do not depend on it")
    splitfed_version: str = _opt("split", "1", "SplitFed (Thapa et al., 2022): 1: the server keeps one trunk replica per "
                                 "hospital, trained in parallel and averaged with the L1s (weighted by shard size); 2: "
                                 "one trunk, trained on each hospital's whole epoch in turn, L1s averaged",
                                 SPLITFED_VERSIONS)
    splitfed_sync_every: int = _opt("split", 0, "SplitFed: steps between averages of the trunk replicas (version 1) and "
                                    "of the L1s (0 = at the end of every epoch, as Thapa et al.); an epoch and the run "
                                    "always end with one")


@dataclass(frozen=True)
class PrivacyOptions:
    """What a hospital hides and how it is audited: defences, leakage captures, and removing duplicated patients."""

    noise: float = _opt("privacy", 0.0, "defence: standard deviation of Gaussian noise added to activations before they leave a hospital")
    nopeek: float = _opt("privacy", 0.0, "defence: weight of the distance-correlation penalty (NoPeek) in each hospital's loss")
    label_defence: str = _opt("privacy", "none", "--labels hospital: what each hospital does so that the loss gradients it "
                              "returns betray less of its labels: noise (Gaussian, strength x the batch's largest "
                              "gradient norm), max_norm (Li et al.; no strength), marvell (noise along the class-mean "
                              "differences, power strength x their spread), rr (label DP: randomized response with "
                              "epsilon = strength, once per record), mixup (the tail trains on mixed pairs, Beta("
                              "strength, strength)); docs/privacy.md", LABEL_DEFENCES)
    label_defence_strength: float = _opt("privacy", 1.0, "--label-defence: its strength knob (noise ratio, Marvell's power "
                                         "scale, rr's epsilon, mixup's alpha)")
    capture_dir: str = _opt("privacy", "", "leakage audits: the server keeps the last --capture-samples activations it received "
                            "from each hospital, and each hospital the inputs that produced them, written here")
    capture_samples: int = _opt("privacy", 256, "samples per hospital kept by --capture-dir")
    capture_epochs: tuple = _opt("privacy", (), "--capture-dir: keep the last --capture-samples of each of these epochs "
                                 "(1-based, e.g. 1,8,15) instead of the run's last ones")
    dedup: str = _opt("privacy", "none", "remove records duplicated across hospitals before training: keyed tokens (hmac) "
                      "or a keyless Diffie-Hellman set intersection (psi)", DEDUP_MODES)
    dedup_key_file: str = _opt("privacy", "", "--dedup hmac: the secret shared by the hospitals only (never read by the server); "
                               "{hospital} in the path is replaced by the hospital's number")
    dedup_manifest: str = _opt("privacy", "", "CSV path,patient_id: images of one patient count as one record (imagefolder)")


@dataclass(frozen=True)
class OptimisationOptions:
    """The optimizer, the learning-rate schedule and how long to train."""

    epochs: int = _opt("optimisation", 1, "training epochs")
    batch_size: int = _opt("optimisation", 128, "batch size per hospital")
    eval_batch_size: int = _opt("optimisation", 500, "batch size of test-set evaluation")
    optimizer: str = _opt("optimisation", "sgd", "optimizer", OPTIMIZERS)
    lr: float = _opt("optimisation", 0.05, "peak learning rate")
    momentum: float = _opt("optimisation", 0.9, "SGD momentum")
    nesterov: bool = _opt("optimisation", False, "Nesterov momentum (SGD)")
    weight_decay: float = _opt("optimisation", 5e-4, "L2 weight decay")
    beta1: float = _opt("optimisation", 0.9, "Adam beta1")
    beta2: float = _opt("optimisation", 0.999, "Adam beta2")
    lr_schedule: str = _opt("optimisation", "cosine", "learning-rate schedule after warmup", LR_SCHEDULES)
    warmup_epochs: float = _opt("optimisation", 0.0, "linear warmup from 0 to --lr over this many epochs")
    milestones: tuple = _opt("optimisation", (0.5, 0.75), "multistep: fractions of training at which the LR is multiplied by --gamma")
    gamma: float = _opt("optimisation", 0.1, "multistep: LR factor at each milestone")
    local_steps: int = _opt("optimisation", 1, "fedavg: local steps per round (a round also ends with every epoch)")
    lr_scaling: bool = _opt("optimisation", False, "ddp: scale --lr linearly by the number of hospitals (Goyal et al., 2017)")
    max_steps: int = _opt("optimisation", 0, "stop after this many optimizer steps (0 = run all epochs); the LR schedule is unchanged")
    seed: int = _opt("optimisation", 0, "seed for initialisation, partition, data order and augmentation")


@dataclass(frozen=True)
class RuntimeOptions:
    """Processes, threads, transport and timeouts; evaluation and logging; failures and final weights."""

    transport: str = _opt("runtime", "tcp", "tcp: TensorPipe over TCP sockets even on one host; auto: TensorPipe's own choice", TRANSPORTS)
    rpc_timeout: float = _opt("runtime", 60.0, "seconds before an unanswered RPC (or a silent peer) is an error")
    setup_timeout: float = _opt("runtime", 900.0, "seconds every party may take to prepare its data and join")
    rpc_threads: int = _opt("runtime", 16, "TensorPipe worker threads per process")
    start: str = _opt("runtime", "spawn", "run directly on one host: spawn (torchrun's agent starts every party "
                      "afresh) or fork (every party forked from one process that imported torch once: they share "
                      "its ~280 MB copy-on-write; for many hospitals on one machine, docs/scale.md)", ("spawn", "fork"))
    heap: str = _opt("runtime", "dynamic", "glibc's malloc in every party: dynamic (its default; fastest) or fixed "
                     "(freed tensors go back to the kernel at once: a real-data VGG-11 x0.25 hospital held 0.5 "
                     "instead of 1.4 GB, and trained at about 0.6 of the speed here; docs/scale.md)", ("dynamic", "fixed"))
    threads: int = _opt("runtime", 0, "torch intra-op threads of every process (0 = by role: see --server-threads)")
    server_threads: int = _opt("runtime", 0, "split: intra-op threads of the server (0 = every core of its host)")
    hospital_threads: int = _opt("runtime", 0, "split: intra-op threads of each hospital (0 = 1 when the server shares its "
                                 "host, else the host's cores / its hospitals)")
    dtype: str = _opt("runtime", "float32", "floating-point type of weights and activations (float64 for equivalence checks)", DTYPES)
    device: str = _opt("runtime", "cpu", "compute device; tensors cross RPC on the CPU", DEVICES)
    eval_every: int = _opt("runtime", 1, "evaluate every n epochs (and always after the last)")
    log_every: int = _opt("runtime", 20, "print progress every n steps")
    record_step_losses: bool = _opt("runtime", False, "store every step's training loss in the run record")
    on_hospital_failure: str = _opt("runtime", "abort", "a hospital dies, hangs or sends an invalid message: stop (abort) "
                                    "or go on with the others (continue)", FAILURE_MODES)
    fault: str = _opt("runtime", "", "testing: make a hospital misbehave, e.g. 'hospital2:nan@5' (from its 5th batch); "
                      "kinds: nan, inf, shape, dtype, labels")
    save_dir: str = _opt("runtime", "", "each party writes its final weights here (server: trunk, hospital i: its L1)")


@dataclass(frozen=True)
class CheckpointOptions:
    """Per-party checkpoints, resuming, and restarts after a failure."""

    checkpoint_dir: str = _opt("checkpoint", "", "each process saves its own state under step-<n>/ here (weights, optimizer, the "
                               "loop; what each method saves: docs/faults.md)")
    checkpoint_every: str = _opt("checkpoint", "", "checkpoint every N steps ('500') or N epochs ('2e'); empty: only at the end")
    checkpoint_keep: int = _opt("checkpoint", 2, "checkpoints each party keeps (older ones are deleted)")
    resume: bool = _opt("checkpoint", False, "continue from the newest step for which every party has a checkpoint")
    max_restarts: int = _opt("checkpoint", 0, "run directly: torchrun restarts the group this many times after a failure "
                              "(each restart resumes from the newest checkpoint)")


@dataclass(frozen=True)
class Config(CheckpointOptions, RuntimeOptions, OptimisationOptions, PrivacyOptions, SplitOptions, DataOptions,
             ModelOptions, RunOptions):
    """Every option of a run, flat (``cfg.width``), as records and checkpoints store them; the
    sections above group them for ``--help`` and docs/options.md."""

    # ------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Processes a run needs, as its method declares (split: the server plus N hospitals)."""
        from splitrpc import methods

        return methods.get(self.method).world_size(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def replace(self, **changes) -> "Config":
        return validate(dataclasses.replace(self, **changes))


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Each section's options, in --help's and docs/options.md's order; its docstring says what it is for.
SECTIONS = {cls.__name__.removesuffix("Options").lower(): cls
            for cls in (RunOptions, ModelOptions, DataOptions, SplitOptions, PrivacyOptions, OptimisationOptions,
                        RuntimeOptions, CheckpointOptions)}


def _coerce(name: str, value):
    """Convert a TOML or flag value to the field's type, or raise UserError."""
    f = FIELDS[name]
    kind = type(f.default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is tuple:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(float(v) for v in items if str(v).strip() != "")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')}: expected {kind.__name__}, got {value!r}") from None


def load_toml(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"--config: no such file: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {path}: not valid TOML ({exc})") from None
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS or name == "config":
            raise UserError(f"--config {path}: unknown option {key!r}")
        values[name] = _coerce(name, value)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitrpc-train",
        description="Split learning across hospitals over torch.distributed.rpc (launch with torchrun, "
        "or run directly and let splitrpc start torchrun for you).",
    )
    groups = {name: parser.add_argument_group(f"{name} options", cls.__doc__) for name, cls in SECTIONS.items()}
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        group = groups[meta["section"]]
        if type(f.default) is bool:
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{meta['help']} (default: {f.default})")
        else:
            default = ",".join(str(m) for m in f.default) if type(f.default) is tuple else f.default
            metavar = meta.get("metavar") or ("{" + ",".join(meta["choices"]) + "}" if meta["choices"] else f.name.upper())
            group.add_argument(flag, dest=f.name, default=None, metavar=metavar,
                                help=f"{meta['help']} (default: {default if default != '' else 'none'})")
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Defaults < TOML file < flags, then validation. Errors are UserError."""
    parser = build_parser()

    def fail(message):
        raise UserError(message)

    parser.error = fail  # one clear line instead of argparse's usage dump
    args = parser.parse_args(argv)
    values: dict = {}
    if args.config:
        values.update(load_toml(args.config))
        values["config"] = args.config
    for name, value in vars(args).items():
        if value is not None and name != "config":
            values[name] = _coerce(name, value)
    return validate(Config(**values), given=set(values))


def from_dict(values: dict) -> Config:
    """Rebuild a Config from a run record's ``config`` (or a harness matrix entry)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise UserError(f"unknown option(s): {', '.join(sorted(unknown))}")
    return validate(Config(**{k: _coerce(k, v) for k, v in values.items()}), given=set(values))


def validate(cfg: Config, given: set[str] | None = None) -> Config:
    """Check every option; ``given``: the options the user set (flags, TOML, a matrix entry), if known."""
    for name, f in FIELDS.items():
        choices = f.metadata["choices"]
        value = getattr(cfg, name)
        if choices and value not in choices:
            raise UserError(f"--{name.replace('_', '-')}: unknown value {value!r} (choose from {', '.join(choices)})")
    positive = ("hospitals", "bottleneck", "batch_size", "eval_batch_size", "epochs", "l1_sync_every", "rpc_threads",
                "eval_every", "local_steps", "log_every", "synthetic_train", "synthetic_test")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    non_negative = ("run_ahead", "splitfed_sync_every", "max_steps", "limit_train", "limit_test", "threads", "server_threads", "hospital_threads", "warmup_epochs", "weight_decay", "momentum")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    for name in ("width", "lr", "alpha", "rpc_timeout", "setup_timeout", "gamma"):
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if cfg.num_classes < 0:
        raise UserError(f"--num-classes must not be negative, got {cfg.num_classes}")
    if cfg.num_classes == 0:
        cfg = dataclasses.replace(cfg, num_classes=100 if cfg.dataset == "cifar100" else 10)
    if cfg.cut < 1:
        raise UserError(f"--cut must be at least 1, got {cfg.cut}")
    from splitrpc.models import check_bottleneck, check_cut, stage_count  # models imports torch; config stays light until here

    check_cut(stage_count(cfg.model), cfg.cut, cfg.model)
    check_bottleneck(cfg.model, cfg.width, cfg.norm, cfg.cut, cfg.bottleneck)
    if any(not 0 < m < 1 for m in cfg.milestones) or list(cfg.milestones) != sorted(cfg.milestones):
        raise UserError(f"--milestones must be increasing fractions in (0, 1), got {list(cfg.milestones)}")
    if cfg.rpc_threads < 4:
        raise UserError("--rpc-threads must be at least 4 (requests, backward passes and steps share them)")
    if not 0 <= cfg.overlap < 1:
        raise UserError(f"--overlap must be in [0, 1), got {cfg.overlap}")
    for name in ("noise", "nopeek"):
        value = getattr(cfg, name)
        if not (value >= 0 and math.isfinite(value)):
            raise UserError(f"--{name} must be a non-negative number, got {value}")
    if cfg.codec != "none" and cfg.dtype != "float32":
        raise UserError(f"--codec {cfg.codec} compresses float32 activations; it cannot be combined with "
                        f"--dtype {cfg.dtype}")
    topk_given = [name for name in ("topk_ratio", "topk_values", "topk_random", "topk_feedback")
                  if getattr(cfg, name) != FIELDS[name].default]
    if topk_given and cfg.codec != "topk":
        raise UserError(f"--{topk_given[0].replace('_', '-')} sets the top-k codec: it needs --codec topk")
    if cfg.topk_ratio < 2:
        raise UserError(f"--topk-ratio must be at least 2, got {cfg.topk_ratio}")
    if not 0 <= cfg.topk_random < 1:
        raise UserError(f"--topk-random must be in [0, 1), got {cfg.topk_random}")
    if cfg.codec == "topk" and cfg.labels == "hospital":
        raise UserError("--codec topk cannot be combined with --labels hospital: the U-shaped trunk output and its "
                        "gradient travel dense (use --codec bf16 or fp8 there)")
    if any(e != int(e) or not 1 <= e <= cfg.epochs for e in cfg.capture_epochs):
        raise UserError(f"--capture-epochs must be epochs in 1..{cfg.epochs}, got "
                        f"{','.join(f'{e:g}' for e in cfg.capture_epochs)}")
    if cfg.capture_epochs and not cfg.capture_dir:
        raise UserError("--capture-epochs says when to capture: it needs --capture-dir")
    if cfg.capture_samples < 1:
        raise UserError(f"--capture-samples must be at least 1, got {cfg.capture_samples}")
    if cfg.dedup_manifest and cfg.dataset != "imagefolder":
        raise UserError("--dedup-manifest refers to ImageFolder paths; it needs --dataset imagefolder")
    if (cfg.resume or cfg.checkpoint_every) and not cfg.checkpoint_dir:
        raise UserError("--resume and --checkpoint-every need --checkpoint-dir")
    from splitrpc.checkpoint import parse_every

    parse_every(cfg.checkpoint_every, steps_per_epoch=1)  # the format only
    if cfg.checkpoint_keep < 2:
        # Hospitals prune right after writing a step, before the server writes its file:
        # with one kept, a crash in between could leave no step that every party has.
        raise UserError(f"--checkpoint-keep must be at least 2, got {cfg.checkpoint_keep}")
    if cfg.max_restarts < 0:
        raise UserError(f"--max-restarts must not be negative, got {cfg.max_restarts}")
    if cfg.max_restarts and cfg.start == "fork":
        raise UserError("--max-restarts needs torchrun's agent (--start spawn); with --start fork rerun with --resume")
    if cfg.fault:
        m = re.fullmatch(r"hospital(\d+):(\w+)@(\d+)", cfg.fault)
        if not m or m.group(2) not in FAULT_KINDS or not 1 <= int(m.group(1)) <= cfg.hospitals:
            raise UserError(f"--fault: expected hospital<i>:<kind>@<batch> with kind in {', '.join(FAULT_KINDS)} "
                            f"and i in 1..{cfg.hospitals}, got {cfg.fault!r}")
    from splitrpc import methods

    # Options only other methods read are one clear error; then the method's own checks.
    return methods.check_options(cfg, FIELDS, given)
