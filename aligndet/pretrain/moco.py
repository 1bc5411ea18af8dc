"""MoCo v2: image-domain (stage-1) self-supervised pre-training of the backbone.

    view q --encoder_q (backbone + MLP head)--> q   [B, dim]   (gradient)
    view k --encoder_k (EMA of encoder_q)----> k   [B, dim]   (no gradient, shuffle BN)
    logits = [q . k,  q . queue] / T           [B, 1 + K]     positive at column 0
    loss   = cross-entropy(logits, 0), then the keys replace the oldest queue columns

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning"
(CVPR 2020), Eq. 1 and Algorithm 1; Chen et al., "Improved Baselines with
Momentum Contrastive Learning" (2020) for v2: the 2-layer MLP head,
temperature 0.2 and the blur augmentation.

Training loop, in this order (the model refuses a second training forward
until the key encoder has been updated, so step 4 cannot be forgotten)::

    out = model(im_q, im_k)                        # 1. loss + logged stats, enqueues the keys
    out["loss_contrastive"].backward()             # 2.
    optimizer.step()                               # 3.
    model_without_ddp.after_step(step)             # 4. key encoder <- EMA of the query encoder

(``aligndet.engine.train_one_epoch`` runs exactly this).

The queue and its pointer are buffers, so ``state_dict()`` carries them into
checkpoints; ``backbone_state_dict()`` is the stage-1 backbone that fine-tuning
and box-domain pre-training load. The two views of an image come from
``TwoCrops(build_moco_v2_transform())`` in ``aligndet/data/transforms.py``.
"""
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from aligndet.distributed import get_rank, get_world_size
from aligndet.models.weights import trunk_key

from .momentum import MomentumUpdater, make_momentum_copy


class MoCo(nn.Module):
    """Query encoder, momentum key encoder and a queue of negative keys.

    Args:
        encoder: the backbone, returning ``[B, feature_dim]`` (a torchvision
            ResNet with ``fc = nn.Identity()``).
        feature_dim: width of the encoder's output (2048 for ResNet-50).
        dim: width of the contrastive embedding.
        hidden_dim: hidden width of the MLP head (default ``feature_dim``).
        queue_size: K, the number of negative keys kept.
        momentum: m of the key encoder's EMA, constant over the run.
        temperature: T of the InfoNCE loss.
        shuffle_splits: batch-norm groups per batch in one process (see
            ``encode_queries``); unused under torch.distributed, where each
            rank's batch is one group.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, dim=128, hidden_dim=None, queue_size=65536,
                 momentum=0.999, temperature=0.2, shuffle_splits=8):
        super().__init__()
        if isinstance(getattr(encoder, "fc", None), nn.Linear):
            raise ValueError("MoCo wants the encoder without its classifier: set encoder.fc = nn.Identity()")
        if queue_size < 1 or shuffle_splits < 1:
            raise ValueError(f"queue_size ({queue_size}) and shuffle_splits ({shuffle_splits}) must be >= 1")
        hidden_dim = hidden_dim or feature_dim
        head = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))
        self.encoder_q = nn.Sequential(OrderedDict(backbone=encoder, head=head))
        self.encoder_k = make_momentum_copy(self.encoder_q)
        # The key encoder keeps its own batch-norm statistics, as MoCo does. In
        # training mode both encoders normalise with batch statistics, so the
        # running ones only matter if encoder_k is evaluated; its own then
        # describe what its (EMA) weights produce on key views, which copies of
        # the query encoder's would not.
        self.updater = MomentumUpdater(self.encoder_q, self.encoder_k, base=momentum, schedule="constant",
                                       copy_buffers=False)
        self.temperature = temperature
        self.shuffle_splits = shuffle_splits
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # [dim, K]
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # next column to overwrite
        self._awaiting_momentum_update = False
        self.weight_dict = {"loss_contrastive": 1.0}

    @property
    def backbone_q(self):
        return self.encoder_q.backbone

    def backbone_state_dict(self):
        """The query backbone's trunk in torchvision names (ResNet's conv1 ... layer4, the others' features.*;
        no classifier remnant): the stage-1 backbone."""
        state = self.backbone_q.state_dict()
        pattern = trunk_key(state)
        return {k: v for k, v in state.items() if pattern.match(k)}

    def checkpoint_weights(self):
        """What a stage-1 checkpoint holds: "backbone" (what --init reads) and the whole "model"."""
        return {"backbone": self.backbone_state_dict(), "model": self.state_dict()}

    # ---- encoders and shuffle BN ------------------------------------------
    #
    # MoCo section 3.3: with batch norm, the B queries of a step are normalised
    # with statistics of one set of images, and their B keys with statistics
    # of the same images. Only one key per logits row comes from the current
    # step (the positive; the negatives come from the queue, i.e. older
    # batches), so a query can find its positive by this shared "batch
    # signature" instead of by content, and the loss falls without learning.
    # Shuffle BN breaks the signature: a key is normalised with a group of
    # images that is a random draw, unrelated to its query's group.
    #
    # Under torch.distributed (MoCo's way): each rank's batch is one BN group
    # for the queries; the keys of all ranks are shuffled across ranks, so a
    # key's group shares on average 1/world of its query's group, then put
    # back in order. Without a process group (one CPU or GPU) we form the
    # groups ourselves: the queries in ``shuffle_splits`` contiguous chunks,
    # the keys in as many chunks of a random permutation, each chunk a
    # separate forward (so BN sees only that chunk). This is the same overlap
    # as on ``shuffle_splits`` GPUs. Splitting the queries matters too: were
    # they normalised over the whole batch, every key's group would be a
    # subset of every query's. Chunks differ in size by at most one when B is
    # not divisible; with B < shuffle_splits there are B chunks of one image.
    # Only training mode needs this: in eval mode BN uses running statistics.

    def _groups(self, batch_size):
        return min(self.shuffle_splits, batch_size) if self.training and get_world_size() == 1 else 1

    def encode_queries(self, im_q):
        """Normalised query embeddings ``[B, dim]``; im_q ``[B, 3, H, W]``."""
        q = [self.encoder_q(chunk) for chunk in im_q.tensor_split(self._groups(len(im_q)))]
        return F.normalize(torch.cat(q), dim=1)

    @torch.no_grad()
    def encode_keys(self, im_k):
        """Key embeddings, normalised and in input order, with shuffle BN in training mode.

        Returns ``(k [B, dim], all_k [N, dim])``: this process's keys, and the
        keys of every rank in rank order (``N`` = global batch; ``all_k is k``
        in one process), which is what the queue receives.
        """
        if not (self.training and get_world_size() > 1):
            groups = self._groups(len(im_k))
            if groups == 1:
                k = F.normalize(self.encoder_k(im_k), dim=1)
                return k, k
            perm = torch.randperm(len(im_k), device=im_k.device)
            shuffled = torch.cat([self.encoder_k(im_k[g]) for g in perm.tensor_split(groups)])  # row i: perm[i]
            k = torch.empty_like(shuffled)
            k[perm] = shuffled
            k = F.normalize(k, dim=1)
            return k, k
        sizes = _batch_sizes(len(im_k), im_k.device)
        images = _concat_all_gather(im_k, sizes)  # [N, 3, H, W]
        perm = torch.randperm(len(images), device=images.device)
        dist.broadcast(perm, src=0)  # one permutation on all ranks
        start = sum(sizes[:get_rank()])
        mine = perm[start:start + len(im_k)]  # the global images this rank encodes
        shuffled = _concat_all_gather(F.normalize(self.encoder_k(images[mine]), dim=1), sizes)  # row i: perm[i]
        all_k = torch.empty_like(shuffled)
        all_k[perm] = shuffled
        return all_k[start:start + len(im_k)], all_k

    # ---- loss and queue ------------------------------------------------------

    def forward(self, im_q, im_k):
        """Two views ``[B, 3, H, W]`` of the same B images (normalised like
        ImageNet). Returns ``loss_contrastive`` and, for the log only,
        ``acc_top1``/``acc_top5`` (the positive ranks first / in the top 5 of
        its 1 + K logits), ``positive_similarity`` and ``negative_similarity``
        (mean cosines of q with its key and with the queue).

        In training mode the keys are then enqueued, and the next training
        forward waits for ``after_step`` / ``momentum_update``; eval mode leaves the queue alone.
        """
        if self.training:
            if self._awaiting_momentum_update:
                raise RuntimeError("MoCo: call after_step(step) (momentum_update) after every optimiser step, "
                                   "before the next training forward")
            self._awaiting_momentum_update = True
        q = self.encode_queries(im_q)  # [B, dim]
        k, all_k = self.encode_keys(im_k)  # [B, dim], [N, dim]
        # The queue is updated in place below; the graph keeps this copy.
        queue = self.queue.clone()  # [dim, K]
        l_pos = (q * k.to(q.dtype)).sum(dim=1, keepdim=True)  # [B, 1]
        l_neg = q @ queue.to(q.dtype)  # [B, K]
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature  # [B, 1 + K]
        labels = torch.zeros(len(q), dtype=torch.long, device=q.device)  # the positive is column 0
        loss = F.cross_entropy(logits, labels)  # in float32 under autocast
        if self.training:
            self._dequeue_and_enqueue(all_k)
        with torch.no_grad():
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # [B, 5]
            return {"loss_contrastive": loss,
                    "acc_top1": (top5[:, 0] == 0).float().mean(),
                    "acc_top5": (top5 == 0).any(dim=1).float().mean(),
                    "positive_similarity": l_pos.detach().float().mean(),
                    "negative_similarity": l_neg.detach().float().mean()}

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        """Overwrite the oldest columns with ``keys`` [N, dim] (FIFO), wrapping
        around the end of the queue, so any N works; if N > K only the last K
        keys fit."""
        size = self.queue.shape[1]
        first = int(self.queue_ptr) + max(len(keys) - size, 0)
        keys = keys[-size:]
        columns = (first + torch.arange(len(keys), device=keys.device)) % size
        self.queue[:, columns] = keys.T.to(self.queue.dtype)
        self.queue_ptr.fill_((first + len(keys)) % size)

    @torch.no_grad()
    def momentum_update(self, step=None):
        """theta_k <- m theta_k + (1 - m) theta_q; call after every optimiser step.
        ``step`` is accepted for symmetry with AlignDet (m is constant). Returns m."""
        self._awaiting_momentum_update = False
        return self.updater.update(step)

    def after_step(self, step):
        """What the training loop runs after every optimiser step: the key encoder's EMA."""
        self.momentum_update(step)


# ---- torch.distributed helpers (the key path only: no gradient flows back) --

def _batch_sizes(size, device):
    """Every rank's batch size, in rank order."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([size], device=device))
    return [int(s) for s in sizes]


@torch.no_grad()
def _concat_all_gather(x, sizes):
    """Every rank's ``x`` [sizes[rank], ...] concatenated in rank order. Ranks'
    batches may differ in size (the last batch of an epoch), so all are padded
    to the largest for ``all_gather`` and cut back after."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[:len(x)] = x
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)])
