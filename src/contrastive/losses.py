"""Contrastive losses: small, typed classes, each with its paper and a direct-formula test.

Every loss computes in float32 with autocast off, whatever precision the encoder ran in: the
exponentials and log-sum-exps of a contrastive loss lose too much in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


class Temperature(nn.Module):
    """A softmax temperature: fixed, or learned as ``log t`` and kept in ``[low, high]``.

    CLIP (Radford et al. 2021) learns the inverse temperature in log space and clips it at 100;
    here ``log t`` is a parameter clamped by :meth:`clamp_` after each optimiser step, so ``t``
    stays in ``[0.01, 1]``. A fixed temperature is returned as the exact float it was given.
    """

    def __init__(
        self, initial: float, learnable: bool = False, low: float = 0.01, high: float = 1.0
    ) -> None:
        super().__init__()
        if initial <= 0:
            raise ValueError(f"temperature must be > 0, got {initial}")
        self.initial, self.learnable = initial, learnable
        self.bounds = (math.log(low), math.log(high))
        if learnable:
            start = min(max(math.log(initial), self.bounds[0]), self.bounds[1])
            self.log_t = nn.Parameter(torch.tensor(start, dtype=torch.float32))

    def forward(self) -> torch.Tensor | float:
        return self.log_t.exp() if self.learnable else self.initial

    @torch.no_grad()
    def clamp_(self) -> None:
        if self.learnable:
            self.log_t.clamp_(*self.bounds)

    def history(self) -> dict[str, float]:
        """``{"temperature": t}`` for the per-epoch history when learned; nothing when fixed."""
        return {"temperature": float(self.log_t.detach().exp())} if self.learnable else {}


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (NT-Xent), the InfoNCE loss of SimCLR.

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020. For a batch of N images seen twice, each of the 2N views has its partner view as
    the positive and the other 2N - 2 views as negatives; the loss is the mean over all 2N views of

        -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

    where ``sim`` is cosine similarity and ``t`` the temperature.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        temperature: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``z_a``, ``z_b``: projections of the two views, ``(N, D)``; row i of each is image i.

        ``temperature`` (a scalar tensor, possibly learned) replaces the constructor's value.
        """
        t = self.temperature if temperature is None else temperature
        with torch.autocast(z_a.device.type, enabled=False):
            z_a, z_b = _float32(z_a, z_b)
            n = z_a.shape[0]
            # z: (2N, D), unit length; views of image i sit at rows i and i + N
            z = F.normalize(torch.cat([z_a, z_b]), dim=1)
            # logits: (2N, 2N) cosine similarities over the temperature
            logits = z @ z.T / t
            # a view is never its own negative
            logits = logits.masked_fill(
                torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf")
            )
            # targets: (2N,) index of each view's partner
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
            return F.cross_entropy(logits, targets)


class InfoNCELoss(nn.Module):
    """InfoNCE against a queue of negative keys: the loss of MoCo.

    He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020,
    Eq. 1 (the name is from van den Oord et al., "Representation Learning with Contrastive
    Predictive Coding", 2018). Query ``q_i`` has one positive key ``k_i`` (the other view of its
    image) and the K keys ``n_j`` of the queue as negatives; the loss is the mean over the N
    queries of

        -log( exp(q_i . k_i / t) / (exp(q_i . k_i / t) + sum_j exp(q_i . n_j / t)) )

    on L2-normalised vectors: a (1 + K)-way softmax classifier that must pick the positive key.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        queue: torch.Tensor,
        temperature: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``q``: queries ``(N, D)``; ``k``: their positive keys ``(N, D)``, row i for query i;
        ``queue``: negative keys ``(K, D)``.

        ``temperature`` (a scalar tensor, possibly learned) replaces the constructor's value.
        """
        if k.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(
                f"expected q and k of one shape (N, D) and a queue (K, D), got "
                f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(queue.shape)}"
            )
        t = self.temperature if temperature is None else temperature
        with torch.autocast(q.device.type, enabled=False):
            # q, k: (N, D) and queue: (K, D), all unit length
            q, k, queue = (F.normalize(x, dim=1) for x in _float32(q, k, queue))
            # positive: (N, 1) similarity of each query with its own key
            positive = (q * k).sum(dim=1, keepdim=True)
            # negative: (N, K) similarity of each query with every queued key
            negative = q @ queue.T
            # logits: (N, 1 + K) over the temperature; the positive is class 0 of every row
            logits = torch.cat([positive, negative], dim=1) / t
            targets = torch.zeros(len(q), dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, targets)


class CLIPLoss(nn.Module):
    """Symmetric InfoNCE over image-text pairs: the loss of CLIP.

    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
    ICML 2021, Fig. 3 pseudo-code. Image ``u_i`` and text ``v_i`` form pair i; with
    ``s_ij = u_i . v_j / t`` on L2-normalised vectors, the loss is the mean of the image-to-text
    and the text-to-image cross entropies,

        1/(2N) sum_i [ -log( exp(s_ii) / sum_j exp(s_ij) ) - log( exp(s_ii) / sum_j exp(s_ji) ) ]

    so each image must pick its own text among the N texts of the batch, and each text its own
    image among the N images. Under torchrun the caller passes the gathered global batch; the
    loss knows nothing of processes.
    """

    def forward(
        self, image: torch.Tensor, text: torch.Tensor, temperature: torch.Tensor | float
    ) -> torch.Tensor:
        """``image``, ``text``: projections ``(N, D)``, row i of each is pair i; ``temperature``:
        a float or a scalar tensor (possibly learned, see :class:`Temperature`)."""
        if image.ndim != 2 or image.shape != text.shape or image.shape[0] < 1:
            raise ValueError(
                f"expected image and text of one shape (N, D) with N >= 1, got "
                f"{tuple(image.shape)} and {tuple(text.shape)}"
            )
        with torch.autocast(image.device.type, enabled=False):
            # image, text: (N, D), unit length
            image, text = (F.normalize(x, dim=1) for x in _float32(image, text))
            # logits: (N, N) image i against text j over the temperature; positives on the diagonal
            logits = image @ text.T / temperature
            targets = torch.arange(len(image), device=image.device)
            return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


# --- metric learning and supervised contrast over the 2N views of a batch -------------------------
#
# These losses see a batch as 2N views: rows i and i + N are the two views of image i. ``labels``
# (N,) make all views of one class positives of each other; without labels each image is its own
# class, so a view's only positive is the other view of its image. ``weights`` (N,), one per image
# (its class weight under ``train.class_balance: weights``), weigh every term by its anchor's image:
# the loss is the weighted mean sum(w_i * l_i) / sum(w_i) over the terms it averages.

MINING = ("batch_hard", "semi_hard", "all")
"""The ways :class:`TripletLoss` picks its triplets in the batch."""


def _views(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    labels: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2N views as unit vectors ``(2N, D)``, which views share a label ``(2N, 2N)``, and
    each view's weight ``(2N,)``. Call with autocast off."""
    n = z_a.shape[0]
    z = F.normalize(torch.cat(_float32(z_a, z_b)), dim=1)
    ids = torch.arange(n, device=z.device) if labels is None else labels.to(z.device)
    ids = ids.repeat(2)
    same = ids[:, None] == ids[None, :]
    w = torch.ones(n, device=z.device) if weights is None else weights.to(z.device).float()
    return z, same, w.repeat(2)


def _distances(z: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``(2N, 2N)`` between the rows of ``z``.

    Computed from the differences, not from ``|x|^2 + |y|^2 - 2xy``, which loses the small
    distances of close pairs to cancellation; the gradient at distance 0 is 0, not NaN.
    """
    return torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(w * v) / sum(w); 0 when no term has weight (a batch with no valid term)."""
    return (weights * values).sum() / weights.sum().clamp_min(1e-12)


class TripletLoss(nn.Module):
    """The triplet loss with triplets mined in the batch, on L2-normalised projections.

    Schroff, Kalenichenko, Philbin, "FaceNet: A Unified Embedding for Face Recognition and
    Clustering", CVPR 2015. Every view is an anchor ``a``; its positives ``p`` share its label,
    its negatives ``n`` do not, and a triplet costs

        max(0, d(a, p) - d(a, n) + margin)

    with ``d`` the Euclidean distance. FaceNet squares it; Hermans et al. found the squared
    distance more prone to collapse and use the plain one, as here. ``mining`` picks the triplets:

    - ``batch_hard`` (Hermans, Beyer, Leibe, "In Defense of the Triplet Loss for Person
      Re-Identification", 2017): per anchor, its farthest positive and its nearest negative;
      the mean over anchors.
    - ``semi_hard`` (FaceNet): per anchor-positive pair, the nearest negative farther than the
      positive (``d(a, n) > d(a, p)``; it costs something only within the margin); when no
      negative is farther, the farthest one, as TensorFlow Addons' ``triplet_semihard_loss``
      does. The mean over anchor-positive pairs.
    - ``all``: every triplet; the mean over those with a positive loss (Hermans et al.'s
      "batch all, non-zero"). The mean over all triplets would shrink as more of them are
      satisfied, washing out the few that still teach something.
    """

    def __init__(self, margin: float = 0.2, mining: str = "batch_hard") -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if mining not in MINING:
            raise ValueError(f"mining must be one of {', '.join(MINING)}, got {mining!r}")
        self.margin, self.mining = margin, mining

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``z_a``, ``z_b``: projections of the two views, ``(N, D)``; ``labels``, ``weights``:
        ``(N,)`` or None (see the note above :class:`TripletLoss`)."""
        with torch.autocast(z_a.device.type, enabled=False):
            z, same, w = _views(z_a, z_b, labels, weights)
            # d: (2N, 2N); positive: (2N, 2N) same label, not itself; negative: other label
            d = _distances(z)
            eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
            positive, negative = same & ~eye, ~same
            if self.mining == "batch_hard":
                return self._batch_hard(d, positive, negative, w)
            if self.mining == "semi_hard":
                return self._semi_hard(d, positive, negative, w)
            return self._all(d, positive, negative, w)

    def _batch_hard(
        self, d: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        # hardest_p, hardest_n: (2N,) per anchor; an anchor without negatives has none: inf
        hardest_p = d.masked_fill(~positive, float("-inf")).amax(dim=1)
        hardest_n = d.masked_fill(~negative, float("inf")).amin(dim=1)
        loss = F.relu(hardest_p - hardest_n + self.margin)
        return _weighted_mean(loss, w * negative.any(dim=1))

    def _semi_hard(
        self, d: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        # by_distance: (2N, 2N) each anchor's negative distances ascending, then inf
        by_distance, _ = d.masked_fill(~negative, float("inf")).sort(dim=1)
        n_negatives = negative.sum(dim=1, keepdim=True)
        # farther: (2N, 2N) for anchor a and positive p, where a's first negative beyond d(a, p)
        # sits; past the last negative means none is farther: take the last, the farthest
        farther = torch.searchsorted(by_distance, d.detach().contiguous(), right=True)
        chosen = torch.minimum(farther, n_negatives - 1).clamp_min(0)
        d_an = by_distance.gather(1, chosen)
        # loss: (2N, 2N) for every anchor-positive pair; weight 0 elsewhere
        loss = F.relu(d - d_an + self.margin)
        pair_w = w[:, None] * (positive & (n_negatives > 0))
        return _weighted_mean(loss, pair_w)

    def _all(
        self, d: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        # a, p: (P,) the anchor-positive pairs; loss: (P, 2N) the triplets (a, p, n) for every n
        a, p = positive.nonzero(as_tuple=True)
        loss = F.relu(d[a, p, None] - d[a] + self.margin)
        active = negative[a] & (loss > 0)
        return _weighted_mean(loss, w[a, None] * active)


class MarginPairLoss(nn.Module):
    """The pairwise contrastive loss with a margin, on L2-normalised projections.

    Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping",
    CVPR 2006. With ``d`` the Euclidean distance of a pair, a positive pair costs ``d`` and a
    negative pair ``alpha * max(0, margin - d)^2``: positives are pulled together, negatives
    pushed apart until they are ``margin`` away. The paper costs a positive pair ``d^2 / 2``;
    this class follows the project's spec (``train.margin_pair``) and uses ``d``, whose pull
    does not fade as a pair closes in; ``alpha`` takes the place of the paper's factors 1/2.

    Every view is an anchor. Its positive pairs are all views with its label; its negative
    pairs are ``negatives_per_positive`` per positive pair (fewer when the batch has fewer),
    taken without randomness: the first views after the anchor in the batch order (cyclically,
    view 2N - 1 is followed by view 0) with another label. Without labels that is one view of
    each of images i + 1, ..., i + k (mod N) for a view of image i, k < N. The batch order is
    random, so the choice is too, yet a resumed run repeats it exactly. An anchor's loss is the
    mean over its pairs; the loss is the mean over anchors.
    """

    def __init__(
        self, margin: float = 0.5, alpha: float = 1.0, negatives_per_positive: int = 1
    ) -> None:
        super().__init__()
        if margin <= 0 or alpha <= 0 or negatives_per_positive < 1:
            raise ValueError(
                f"need margin > 0, alpha > 0 and negatives_per_positive >= 1, got {margin}, "
                f"{alpha}, {negatives_per_positive}"
            )
        self.margin, self.alpha, self.negatives_per_positive = margin, alpha, negatives_per_positive

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        labels: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``z_a``, ``z_b``: projections of the two views, ``(N, D)``; ``labels``, ``weights``:
        ``(N,)`` or None (see the note above :class:`TripletLoss`)."""
        with torch.autocast(z_a.device.type, enabled=False):
            z, same, w = _views(z_a, z_b, labels, weights)
            m = len(z)
            # d: (2N, 2N); positive: (2N, 2N) same label, not itself
            d = _distances(z)
            positive = same & ~torch.eye(m, dtype=torch.bool, device=z.device)
            # after: (2N, 2N - 1) the views that follow each anchor, in cyclic batch order
            view = torch.arange(m, device=z.device)
            after = (view[:, None] + view[None, 1:]) % m
            is_negative = ~same.gather(1, after)
            # chosen: (2N, 2N - 1) the first k * |positives| negatives after each anchor
            wanted = self.negatives_per_positive * positive.sum(dim=1, keepdim=True)
            chosen = is_negative & (is_negative.cumsum(dim=1) <= wanted)
            # pull, push: (2N,) summed over each anchor's positive and chosen negative pairs
            pull = (d * positive).sum(dim=1)
            push = (F.relu(self.margin - d.gather(1, after)).square() * chosen).sum(dim=1)
            pairs = positive.sum(dim=1) + chosen.sum(dim=1)
            return _weighted_mean((pull + self.alpha * push) / pairs, w)


class SupConLoss(nn.Module):
    """Supervised contrastive loss, the L_out variant (eq. 2), on L2-normalised projections.

    Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020. Each of the 2N views ``i``
    has as positives ``P(i)`` all other views of its class, and its loss is

        -1/|P(i)| sum_{p in P(i)} log( exp(z_i . z_p / t) / sum_{a != i} exp(z_i . z_a / t) )

    averaged over the 2N views. With every label distinct, ``P(i)`` is the other view of the
    image and the loss is NT-Xent.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor | None = None,
        temperature: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``z_a``, ``z_b``: projections of the two views, ``(N, D)``; ``labels`` ``(N,)``;
        ``weights`` ``(N,)`` or None (see the note above :class:`TripletLoss`).

        ``temperature`` (a scalar tensor, possibly learned) replaces the constructor's value.
        """
        t = self.temperature if temperature is None else temperature
        with torch.autocast(z_a.device.type, enabled=False):
            z, same, w = _views(z_a, z_b, labels, weights)
            eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
            # logits: (2N, 2N) cosine similarities over the temperature, never a view with itself
            logits = (z @ z.T / t).masked_fill(eye, float("-inf"))
            # log_prob: (2N, 2N) log softmax of each row over the 2N - 1 other views
            log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
            # per_view: (2N,) the mean over each view's positives
            positive = same & ~eye
            per_view = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / positive.sum(dim=1)
            return _weighted_mean(per_view, w)
