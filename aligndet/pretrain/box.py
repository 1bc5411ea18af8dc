"""Box-domain pre-training: the AlignDet wrapper (DESIGN.md section 3).

    view 1 --frozen backbone--> online detector f_q   --hook--> embeddings z1, ids, regression losses
    view 2 --frozen backbone--> momentum detector f_k --hook--> embeddings z2, ids   (no gradient)
    L = L_con(z1, z2) + native box / RPN losses

The stage-1 backbone runs once per view, in eval mode and without gradient;
the online detector's neck and heads and its embedding MLP train; the momentum
detector is an EMA of them (``momentum.py``).

A detector plugs in by providing (see ``FasterRCNN`` and ``OneStageDetector``,
the base of RetinaNet and FCOS):

- ``transform(images, targets, resize=False)``: normalise and batch the views;
- ``backbone.body``: the stage-1 backbone that stays frozen;
- ``embedding_head(dim)``: the projection MLP that replaces its classifier;
- ``box_domain_forward(body_features, image_sizes, padded_size, proposals,
  embedding_head, num_samples)``: assign its own predictions to the proposals
  with its native rule and return ``{"embeddings", "ids", "losses"}``;
- ``CLASSIFIER_LAYERS``: name prefixes of the classifier the MLP replaces
  (frozen here, re-initialised at fine-tuning).
"""
import logging

import torch
from torch import nn

from .losses import box_contrastive_loss, box_contrastive_stats
from .momentum import MomentumUpdater, make_momentum_copy

logger = logging.getLogger(__name__)

BODY = "backbone.body."  # the frozen stage-1 backbone inside every detector


class AlignDet(nn.Module):
    """Online and momentum detectors over one frozen backbone.

    Args:
        detector: a detector built with ``build_detector`` (e.g. one class:
            pre-training is class-agnostic); it becomes the online detector.
        embed_dim: embedding width D (independent of the number of instance ids).
        temperature: tau of the contrastive loss.
        base_momentum, total_steps: the EMA schedule (m0 -> 1 over total_steps).
        num_samples: predictions kept per image (or batch) by the hook; None = the
            detector's official default.
    """

    def __init__(self, detector, embed_dim=256, temperature=0.5, base_momentum=0.996, total_steps=1,
                 num_samples=None):
        super().__init__()
        self.online = detector
        self.online_embed = detector.embedding_head(embed_dim)
        self.body.requires_grad_(False)
        for name, param in detector.named_parameters():
            if name.startswith(tuple(detector.CLASSIFIER_LAYERS)):
                param.requires_grad_(False)  # replaced by the embedding MLP
        # The momentum detector shares the frozen backbone instead of copying it.
        body, detector.backbone.body = detector.backbone.body, nn.Identity()
        self.momentum = make_momentum_copy(detector)
        detector.backbone.body = body
        self.momentum_embed = make_momentum_copy(self.online_embed)
        self.updaters = [MomentumUpdater(detector, self.momentum, base_momentum, total_steps, skip=(BODY,)),
                         MomentumUpdater(self.online_embed, self.momentum_embed, base_momentum, total_steps)]
        self.temperature = temperature
        self.num_samples = num_samples

    @property
    def body(self):
        return self.online.backbone.body

    def train(self, mode=True):
        super().train(mode)
        self.body.eval()  # frozen: batch-norm statistics from stage 1, always
        return self

    def _branch(self, detector, embed, views):
        images = [v["image"] for v in views]
        proposals = [{"boxes": v["boxes"], "ids": v["ids"]} for v in views]
        batch, image_sizes, proposals = detector.transform(images, proposals, resize=False)
        with torch.no_grad():
            body_features = self.body(batch)
        return detector.box_domain_forward(body_features, image_sizes, batch.shape[-2:], proposals, embed,
                                           num_samples=self.num_samples)

    def forward(self, views1, views2):
        """views: per image {"image" [3, H, W] in [0, 1], "boxes" [N, 4] xyxy, "ids" [N]}
        (``two_view_collate``). Returns a dict: ``loss_*`` terms (weight 1 each),
        plus ``contrastive_accuracy``, ``instances``, ``matched_instances`` and
        ``queries`` for the log."""
        q = self._branch(self.online, self.online_embed, views1)
        with torch.no_grad():
            k = self._branch(self.momentum, self.momentum_embed, views2)
        loss_con = box_contrastive_loss(q["embeddings"], q["ids"], k["embeddings"], k["ids"], self.temperature)
        stats = box_contrastive_stats(q["embeddings"], q["ids"], k["embeddings"], k["ids"], self.temperature)
        if stats["instances"] == 0:
            logger.warning("no prediction matched a proposal in this batch: contrastive loss set to 0")
        device = loss_con.device
        return {"loss_contrastive": loss_con, **q["losses"],
                "contrastive_accuracy": torch.tensor(stats["accuracy"], device=device),
                **{name: torch.tensor(stats[name], device=device)
                   for name in ("instances", "matched_instances", "queries")}}

    @torch.no_grad()
    def momentum_update(self, step):
        """theta_k <- m theta_k + (1 - m) theta_q after optimiser step ``step``; returns m."""
        return [u.update(step) for u in self.updaters][0]

    def detector_state_dict(self):
        """The online detector's weights (backbone included): what fine-tuning loads."""
        return self.online.state_dict()


def box_domain_step(model, batch, device):
    """The training step ``engine.train_one_epoch`` runs for box-domain batches
    ``(views1, views2, metas)``; returns (loss dict, image ids)."""
    views1, views2, metas = batch
    move = lambda views: [{k: v.to(device, non_blocking=True) for k, v in view.items()} for view in views]  # noqa: E731
    return model(move(views1), move(views2)), [m["image_id"] for m in metas]
