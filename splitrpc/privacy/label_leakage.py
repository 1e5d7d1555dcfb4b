"""What the loss gradients a U-shaped server receives betray about the labels, and the defences.

In U-shaped split learning the hospital keeps the loss, and the server receives, for every
sample it sent up, the gradient of the loss with respect to that output. Li et al. (ICLR
2022, "Label Leakage and Protection in Two-party Split Learning") show that these
gradients betray the labels: by their norm (a rare or badly fitted class gets large ones)
and by their direction (gradients of samples of one class point the same way). The
functions below take per-sample gradients as the server receives them, (N, ...) with one
row per sample, and score, classify or cluster them; the defences are what a hospital
can do to the gradients before they leave.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from splitrpc.errors import UserError

# Spherical k-means: Lloyd iterations on unit vectors, from k-means++ seeds.
KMEANS_ITERATIONS = 50
KMEANS_RESTARTS = 4
# A zero gradient has no direction; its normalised form stays 0 instead of NaN.
DIRECTION_NORM_FLOOR = 1e-30


def flatten_gradients(gradients: Tensor) -> Tensor:
    """(N, ...) per-sample gradients as an (N, D) float64 matrix."""
    if gradients.dim() < 2 or gradients.shape[0] == 0:
        raise UserError(f"expected per-sample gradients of shape (N, ...), got {tuple(gradients.shape)}")
    return gradients.detach().reshape(gradients.shape[0], -1).to(torch.float64)


def _unit_rows(matrix: Tensor) -> Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(DIRECTION_NORM_FLOOR)


def auc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives``, exactly.

    The Mann-Whitney statistic from ranks: the probability that a random positive
    scores above a random negative, ties counting one half (tied scores share the
    mean of their ranks). 1 separates perfectly, 0.5 is chance, 0 separates
    perfectly the other way round.
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    positives = positives.reshape(-1).to(torch.bool)
    if scores.shape != positives.shape:
        raise UserError(f"auc: {scores.numel()} scores for {positives.numel()} labels")
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"auc needs positives and negatives, got {n_pos} and {n_neg}")
    if not torch.isfinite(scores).all():
        raise UserError("auc: scores must be finite")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # Ranks 1..N in increasing order; tied scores all get the mean rank of their block.
    block_end = counts.cumsum(0).to(torch.float64)
    mean_rank = block_end - (counts.to(torch.float64) - 1) / 2
    rank_sum = mean_rank[inverse][positives].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def one_vs_rest_auc(scores: Tensor, labels: Tensor, num_classes: int) -> list[float | None]:
    """For each class c, the AUC of column c of ``scores`` (N, C) at telling class c from the rest.

    ``None`` for a class absent from ``labels`` (or the only one present).
    """
    if scores.shape != (len(labels), num_classes):
        raise UserError(f"one_vs_rest_auc: scores of shape {tuple(scores.shape)} for {len(labels)} labels "
                        f"and {num_classes} classes")
    result: list[float | None] = []
    for c in range(num_classes):
        positives = labels == c
        result.append(auc(scores[:, c], positives) if 0 < int(positives.sum()) < len(labels) else None)
    return result


def norm_scores(gradients: Tensor) -> Tensor:
    """Li et al.'s norm attack: each sample's gradient norm, read as 'more likely positive' when larger.

    In a binary task where the positive class is rare (or badly fitted), positives
    keep a low predicted probability, so |p - y| and with it the gradient norm is
    larger for them. It needs no known label at all.
    """
    return flatten_gradients(gradients).norm(dim=1)


def cosine_scores(gradients: Tensor, reference: Tensor) -> Tensor:
    """Li et al.'s direction attack: cosine similarity of each gradient to one known positive's gradient."""
    g = flatten_gradients(gradients)
    ref = flatten_gradients(reference.reshape(1, -1)).reshape(-1)
    if ref.numel() != g.shape[1]:
        raise UserError(f"cosine_scores: reference of {ref.numel()} values for gradients of {g.shape[1]}")
    return _unit_rows(g) @ (ref / ref.norm().clamp_min(DIRECTION_NORM_FLOOR))


def _check_known(n: int, known: Tensor, known_labels: Tensor, num_classes: int) -> None:
    if known.numel() != known_labels.numel():
        raise UserError(f"{known.numel()} known samples but {known_labels.numel()} known labels")
    if known.numel() == 0:
        raise UserError("the direction attack needs at least one sample whose label the server knows")
    if int(known.min()) < 0 or int(known.max()) >= n:
        raise UserError(f"known sample indices must lie in 0..{n - 1}")
    if int(known_labels.min()) < 0 or int(known_labels.max()) >= num_classes:
        raise UserError(f"known labels must lie in 0..{num_classes - 1}")


def class_direction_scores(gradients: Tensor, known: Tensor, known_labels: Tensor, num_classes: int,
                           rule: str = "mean") -> Tensor:
    """(N, C) similarity of each gradient to each class, from a few samples whose labels the server knows.

    ``rule="mean"``: cosine to the mean unit direction of the known gradients of the
    class; ``rule="nearest"``: the largest cosine to any known gradient of the class.
    A class without a known sample scores -inf (never chosen). Rows are the
    multi-class form of Li et al.'s cosine score; their argmax is the inferred label.
    """
    g = _unit_rows(flatten_gradients(gradients))
    known, known_labels = known.reshape(-1).long(), known_labels.reshape(-1).long()
    _check_known(len(g), known, known_labels, num_classes)
    scores = torch.full((len(g), num_classes), -math.inf, dtype=g.dtype)
    for c in range(num_classes):
        rows = known[known_labels == c]
        if len(rows) == 0:
            continue
        if rule == "mean":
            scores[:, c] = g @ _unit_rows(g[rows].mean(0, keepdim=True)).reshape(-1)
        elif rule == "nearest":
            scores[:, c] = (g @ g[rows].T).max(dim=1).values
        else:
            raise UserError(f"unknown direction rule {rule!r}: choose mean or nearest")
    return scores


def kmeans_directions(gradients: Tensor, clusters: int, seed: int = 0, iterations: int = KMEANS_ITERATIONS,
                      restarts: int = KMEANS_RESTARTS) -> Tensor:
    """Cluster index (N,) of each gradient by spherical k-means on the unit gradients; no label used.

    k-means++ seeding from a seeded generator; of ``restarts`` runs, the one with the
    largest total cosine to its centres is kept.
    """
    g = _unit_rows(flatten_gradients(gradients))
    n = len(g)
    if not 1 <= clusters <= n:
        raise UserError(f"cannot make {clusters} clusters of {n} gradients")
    generator = torch.Generator().manual_seed(seed)
    best, best_fit = None, -math.inf
    for _ in range(restarts):
        centres = g[torch.randint(n, (1,), generator=generator)]
        while len(centres) < clusters:
            distance = (2 - 2 * (g @ centres.T).max(dim=1).values).clamp_min(0)  # squared chord distance
            if distance.sum() <= 0:
                pick = torch.randint(n, (1,), generator=generator)
            else:
                pick = torch.multinomial(distance, 1, generator=generator)
            centres = torch.cat([centres, g[pick]])
        for _ in range(iterations):
            assign = (g @ centres.T).argmax(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, assign, g)
            empty = sums.norm(dim=1) == 0
            new = torch.where(empty[:, None], centres, _unit_rows(sums))  # an empty cluster keeps its centre
            if torch.equal(new, centres):
                break
            centres = new
        assign = (g @ centres.T).argmax(dim=1)
        fit = (g * centres[assign]).sum().item()
        if fit > best_fit:
            best, best_fit = assign, fit
    return best


def labels_from_known(assign: Tensor, known: Tensor, known_labels: Tensor, num_classes: int) -> Tensor:
    """Label each cluster by the majority of the known labels in it (what the attacker can do).

    A cluster with no known sample gets the label no better than a guess: the most
    common known label overall. Returns the inferred label (N,) of every sample.
    """
    known, known_labels = known.reshape(-1).long(), known_labels.reshape(-1).long()
    _check_known(len(assign), known, known_labels, num_classes)
    clusters = int(assign.max()) + 1
    votes = torch.zeros(clusters, num_classes, dtype=torch.long)
    votes.index_put_((assign[known], known_labels), torch.ones_like(known_labels), accumulate=True)
    fallback = int(torch.bincount(known_labels, minlength=num_classes).argmax())
    mapping = torch.where(votes.sum(1) > 0, votes.argmax(1), torch.full((clusters,), fallback))
    return mapping[assign]


def hungarian(cost: Tensor) -> list[int]:
    """Assignment minimising total cost for a square (n, n) matrix: ``result[row] = column``.

    The O(n^3) shortest augmenting path form of the Hungarian method (Kuhn-Munkres,
    with potentials); exact.
    """
    n = cost.shape[0]
    if cost.dim() != 2 or cost.shape[1] != n:
        raise UserError(f"hungarian needs a square cost matrix, got {tuple(cost.shape)}")
    a = cost.tolist()
    inf = math.inf
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match = [0] * (n + 1)  # match[column] = row, 1-based; 0 = free
    way = [0] * (n + 1)
    for row in range(1, n + 1):
        match[0] = row
        column = 0
        min_to = [inf] * (n + 1)
        used = [False] * (n + 1)
        while True:
            used[column] = True
            r, delta, next_column = match[column], inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = a[r - 1][j - 1] - u[r] - v[j]
                    if reduced < min_to[j]:
                        min_to[j], way[j] = reduced, column
                    if min_to[j] < delta:
                        delta, next_column = min_to[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    min_to[j] -= delta
            column = next_column
            if match[column] == 0:
                break
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    result = [0] * n
    for j in range(1, n + 1):
        result[match[j] - 1] = j - 1
    return result


def labels_by_hungarian(assign: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Label the clusters by the one-to-one matching that agrees most with the TRUE labels.

    An oracle: it reads every label, so the accuracy it gives is an upper bound on
    what any labelling of these clusters could reach, not an attack.
    """
    size = max(num_classes, int(assign.max()) + 1)
    agreement = torch.zeros(size, size, dtype=torch.float64)
    agreement.index_put_((assign.long(), labels.long()), torch.ones(len(labels), dtype=torch.float64),
                         accumulate=True)
    mapping = torch.tensor(hungarian(-agreement))
    return mapping[assign.long()]


def accuracy(predicted: Tensor, labels: Tensor) -> float:
    return (predicted.reshape(-1).long() == labels.reshape(-1).long()).double().mean().item()


# Defences, applied by the hospital to the gradients it returns.
def gaussian_noise_defence(gradients: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """Add isotropic Gaussian noise whose total norm is about ``ratio`` times the batch's largest gradient norm.

    Per coordinate std = ratio * max_i |g_i| / sqrt(D), as in Li et al.'s noise
    baseline, so ``ratio`` means the same thing at any cut and training stage.
    """
    if ratio < 0:
        raise UserError(f"noise ratio must be non-negative, got {ratio}")
    g = gradients.detach().reshape(gradients.shape[0], -1)
    std = ratio * g.norm(dim=1).max() / math.sqrt(g.shape[1])
    noise = torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
    return (g + std * noise).reshape(gradients.shape)


def max_norm_defence(gradients: Tensor, generator: torch.Generator) -> Tensor:
    """Li et al.'s "max norm" heuristic: g_i * (1 + sigma_i z_i), z_i ~ N(0, 1) one scalar per sample.

    sigma_i = sqrt(max_j |g_j|^2 / |g_i|^2 - 1), so every perturbed gradient has the
    same expected squared norm, the batch's largest; a gradient keeps its line (the
    sign may flip), which is why it targets the norm attack and not the direction one.
    """
    # float64: a float32 gradient that is exactly 0 (a sample the tail fits perfectly) would
    # make the ratio overflow to inf, and 0 * inf is NaN; in float64 it stays 0.
    g = gradients.detach().reshape(gradients.shape[0], -1).to(torch.float64)
    norms = g.norm(dim=1, keepdim=True)
    sigma = (norms.max() ** 2 / norms.clamp_min(DIRECTION_NORM_FLOOR) ** 2 - 1).clamp_min(0).sqrt()
    z = torch.randn((g.shape[0], 1), generator=generator, dtype=g.dtype).to(g.device)
    return (g * (1 + sigma * z)).to(gradients.dtype).reshape(gradients.shape)


def pick_known(labels: Tensor, per_class: int, num_classes: int, seed: int = 0) -> Tensor:
    """Indices of ``per_class`` samples of each class (fewer if a class has fewer): the labels the server knows."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(num_classes):
        rows = (labels.reshape(-1) == c).nonzero().reshape(-1)
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values


def _mean_defined(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def label_leakage_report(gradients: Tensor, labels: Tensor, num_classes: int, known_per_class: int = 5,
                         seed: int = 0) -> dict:
    """Every label attack on one set of received gradients, scored on the samples whose label the server does not know.

    ``known_per_class`` labelled samples per class (drawn with ``seed``) are the
    server's side knowledge for the direction attacks and for naming clusters.
    Reports label-inference accuracy (``chance`` is the most common class's share)
    and one-vs-rest leak AUC averaged over classes, and per class (with two classes
    the mean is 0.5 by symmetry: read the positive class's entry).
    ``cluster_hungarian_acc`` (clusters named one-to-one by Hungarian matching to the
    true labels: the usual clustering accuracy) and ``cluster_oracle_acc`` (each
    cluster named by the majority of its true labels: the best any naming of these
    clusters can do) read every label: bounds, not attacks.
    """
    labels = labels.reshape(-1).long()
    g = flatten_gradients(gradients)
    if len(g) != len(labels):
        raise UserError(f"{len(g)} gradients for {len(labels)} labels")
    known = pick_known(labels, known_per_class, num_classes, seed)
    unknown = torch.ones(len(labels), dtype=torch.bool)
    unknown[known] = False
    target = labels[unknown]
    norms = norm_scores(g)[unknown]
    norm_auc = one_vs_rest_auc(norms[:, None].expand(-1, num_classes), target, num_classes)
    mean_scores = class_direction_scores(g, known, labels[known], num_classes, "mean")
    nearest_scores = class_direction_scores(g, known, labels[known], num_classes, "nearest")
    # Li et al.'s cosine attack: one known positive's gradient per class as the reference.
    first_known = [known[labels[known] == c][:1] for c in range(num_classes)]
    cosine_auc = [auc(cosine_scores(g[unknown], g[rows[0]]), target == c)
                  if len(rows) and 0 < int((target == c).sum()) < len(target) else None
                  for c, rows in enumerate(first_known)]
    mean_auc = one_vs_rest_auc(mean_scores[unknown].clamp_min(-2), target, num_classes)
    clusters = kmeans_directions(g, num_classes, seed=seed)
    return {
        "samples": int(unknown.sum()), "known_labels": len(known), "gradient_dim": g.shape[1],
        "chance": torch.bincount(target, minlength=num_classes).max().item() / len(target),
        "norm_auc": _mean_defined(norm_auc), "norm_auc_per_class": norm_auc,
        "cosine_auc": _mean_defined(cosine_auc), "cosine_auc_min": min((v for v in cosine_auc if v is not None), default=None),
        "cosine_auc_per_class": cosine_auc,
        "direction_mean_auc": _mean_defined(mean_auc),
        "direction_mean_acc": accuracy(mean_scores[unknown].argmax(1), target),
        "direction_nearest_acc": accuracy(nearest_scores[unknown].argmax(1), target),
        "cluster_known_acc": accuracy(labels_from_known(clusters, known, labels[known], num_classes)[unknown], target),
        "cluster_hungarian_acc": accuracy(labels_by_hungarian(clusters, labels, num_classes)[unknown], target),
        "cluster_oracle_acc": accuracy(labels_from_known(clusters, torch.arange(len(labels)), labels,
                                                         num_classes)[unknown], target),
    }


# The newer attacks. Both need more than the gradients: model completion reads the trunk's forward
# output (what the server sent down), gradient matching that and the tail's architecture.
COMPLETION_STEPS = 200
COMPLETION_WEIGHT_DECAY = 1e-3
MATCHING_STEPS = 200
MATCHING_LR = 0.05
MATCHING_PRIOR_WEIGHT = 1.0
MATCHING_START_TEMPERATURE = 5.0


def model_completion_scores(features: Tensor, known: Tensor, known_labels: Tensor, num_classes: int) -> Tensor:
    """(N, C) class scores from model completion (Fu et al., USENIX Security 2022), passive form.

    The server completes its part of the model with a classifier of its own, trained on the
    trunk's outputs of the few samples whose labels it knows, and applies it to the rest. Fu et
    al. fine-tune with semi-supervised MixMatch; this is the supervised core: a softmax
    regression on the standardised outputs (L2-regularised, full-batch L-BFGS, deterministic).
    It reads forward features only, so no defence of the returned gradients touches it.
    """
    x = flatten_gradients(features)
    known, known_labels = known.reshape(-1).long(), known_labels.reshape(-1).long()
    _check_known(len(x), known, known_labels, num_classes)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)  # the server sees every output: unlabelled statistics
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=COMPLETION_STEPS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(x[known] @ weight + bias, known_labels)
                + COMPLETION_WEIGHT_DECAY * weight.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (x @ weight + bias).detach()


def gradient_matching_scores(gradients: Tensor, features: Tensor, tail_factory, known: Tensor, known_labels: Tensor,
                             num_classes: int, seed: int = 0, steps: int = MATCHING_STEPS) -> Tensor:
    """(N, C) label distributions from gradient matching (ExPLoit, Kariyappa and Qureshi, SaTML 2023).

    The server knows the tail's architecture but not its weights. It builds a surrogate tail
    (``tail_factory()``, its own initialisation) and a label distribution per sample, and
    trains both so that the gradients the surrogate would return, d CE(tail(z_i), y_i) / d z_i
    for the trunk output z_i it sent down, point where the received ones do (1 - cosine,
    so the unknown batch scaling does not matter); the known labels are fixed, and a prior
    keeps the average label distribution near uniform (ExPLoit's label-prior term). The
    label distributions are the scores; their argmax the inferred labels.
    """
    g = flatten_gradients(gradients)
    z = features.detach()
    known, known_labels = known.reshape(-1).long(), known_labels.reshape(-1).long()
    _check_known(len(g), known, known_labels, num_classes)
    if len(z) != len(g):
        raise UserError(f"gradient matching: {len(z)} trunk outputs for {len(g)} gradients")
    torch.manual_seed(seed)  # the surrogate tail's initialisation: the attacker's own
    tail = tail_factory()
    dtype = matching_dtype(tail)
    tail, z = tail.to(dtype), z.to(dtype)
    # Start from the direction attack's guess (the attacker combines what it has), at a low temperature
    # so that matching can still move it.
    start = class_direction_scores(g, known, known_labels, num_classes, "mean").clamp_min(-1)
    logits = (MATCHING_START_TEMPERATURE * start).to(dtype).requires_grad_()
    fixed = torch.zeros(len(g), num_classes, dtype=dtype)
    fixed[known, known_labels] = 1.0
    target = _unit_rows(g).to(dtype)
    is_known = torch.zeros(len(g), 1, dtype=torch.bool)
    is_known[known] = True
    optimizer = torch.optim.Adam([logits, *tail.parameters()], lr=MATCHING_LR)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            soft = torch.where(is_known, fixed, logits.softmax(1))
            inputs = z.clone().requires_grad_()
            loss = -(soft * tail(inputs).log_softmax(1)).sum()
            surrogate = torch.autograd.grad(loss, inputs, create_graph=True)[0].reshape(len(g), -1)
            mismatch = (1 - (_unit_rows(surrogate) * target).sum(1)).mean()
            prior = (soft.mean(0) * (soft.mean(0) * num_classes).clamp_min(1e-12).log()).sum()  # KL(mean || uniform)
            (mismatch + MATCHING_PRIOR_WEIGHT * prior).backward()
            optimizer.step()
    return torch.where(is_known, fixed, logits.softmax(1)).detach().to(torch.float64)


def matching_dtype(tail: nn.Module) -> torch.dtype:
    """The precision gradient matching fits a surrogate ``tail`` in: float64, except where the tail
    convolves, since float64 convolution has no fast CPU kernel (a 2-stage VGG tail over 1024 samples
    takes 1.07 s per matching step in float64 against 0.13 s in float32, on this 2-core machine)."""
    return torch.float32 if any(isinstance(m, nn.Conv2d) for m in tail.modules()) else torch.float64


def forward_and_matching_report(gradients: Tensor, features: Tensor, labels: Tensor, num_classes: int,
                                known_per_class: int, tail_factory=None, seed: int = 0) -> dict:
    """Model completion (features only) and, given the tail's architecture, gradient matching; scored on
    the samples whose label the server does not know, as ``label_leakage_report``."""
    labels = labels.reshape(-1).long()
    known = pick_known(labels, known_per_class, num_classes, seed)
    unknown = torch.ones(len(labels), dtype=torch.bool)
    unknown[known] = False
    target = labels[unknown]
    completion = model_completion_scores(features, known, labels[known], num_classes)[unknown]
    result = {"completion_acc": accuracy(completion.argmax(1), target),
              "completion_auc": _mean_defined(one_vs_rest_auc(completion, target, num_classes))}
    if tail_factory is not None:
        matching = gradient_matching_scores(gradients, features, tail_factory, known, labels[known], num_classes,
                                            seed)[unknown]
        result.update(matching_acc=accuracy(matching.argmax(1), target),
                      matching_auc=_mean_defined(one_vs_rest_auc(matching, target, num_classes)))
    return result
