"""Box-domain pre-training: the AlignDet wrapper (docs/method.md §3).

    view 1 --frozen backbone--> online detector f_q   --hook--> embeddings z1, ids, regression losses
    view 2 --frozen backbone--> momentum detector f_k --hook--> embeddings z2, ids   (no gradient)
    L = L_con(z1, z2) + native box / RPN losses

The stage-1 backbone runs once per view, in eval mode and without gradient;
the online detector's neck and heads and its embedding MLP train; the momentum
detector is an EMA of them (``momentum.py``), updated by ``after_step`` after
every optimiser step. How each detector assigns its predictions to the
proposals, and which layer its embedding MLP replaces, is its hook in
``hooks.py`` (the table of docs/method.md §4).
"""
import logging

import torch
from torch import nn

from .hooks import hook_for
from .losses import box_contrastive
from .momentum import MomentumUpdater, make_momentum_copy

logger = logging.getLogger(__name__)

BODY = "backbone.body."  # the frozen stage-1 backbone inside every detector


class AlignDet(nn.Module):
    """Online and momentum detectors over one frozen backbone.

    Args:
        detector: a detector built with ``build_detector`` (e.g. one class:
            pre-training is class-agnostic; DETR: one class per pseudo-class
            cluster); it becomes the online detector.
        embed_dim: embedding width D (independent of the number of instance ids).
        temperature: tau of the contrastive loss.
        base_momentum, total_steps: the EMA schedule (m0 -> 1 over total_steps).
        num_samples: predictions kept per image (or batch) by the hook; None = the
            detector's official number (``hooks.HOOKS``).
        head_options: keyword arguments of the hook's embedding head (e.g.
            ``kernel_size``, ``init_std``, ``centerness`` of ``DenseEmbeddingHead``).
    """

    def __init__(self, detector, embed_dim=256, temperature=0.5, base_momentum=0.996, total_steps=1,
                 num_samples=None, head_options=None):
        super().__init__()
        self.hook = hook_for(detector)
        self.online = detector
        self.online_embed = self.hook.embedding_head(detector, embed_dim, **(head_options or {}))
        self.body.requires_grad_(False)
        # The frozen backbone only ever runs forward without gradient: channels-last (NHWC) convolutions and
        # pooling are faster there on a CPU (benchmarks/RESULTS.md, "make demo"); the values are the same up to
        # float rounding, and the checkpoint's tensors load into a model of either memory format.
        self.body.to(memory_format=torch.channels_last)
        for name, param in detector.named_parameters():
            if name.startswith(self.hook.classifier_layers):
                param.requires_grad_(False)  # replaced by the embedding MLP
        # The momentum detector shares the frozen backbone instead of copying it.
        body, detector.backbone.body = detector.backbone.body, nn.Identity()
        self.momentum = make_momentum_copy(detector)
        detector.backbone.body = body
        self.momentum_embed = make_momentum_copy(self.online_embed)
        self.updaters = [MomentumUpdater(detector, self.momentum, base_momentum, total_steps, skip=(BODY,),
                                         copy_params=self.hook.copied_params),  # DETR: query_embed (§3.2)
                         MomentumUpdater(self.online_embed, self.momentum_embed, base_momentum, total_steps)]
        self.temperature = temperature
        self.num_samples = num_samples or self.hook.num_samples
        self.weight_dict = {"loss_contrastive": 1.0, **detector.weight_dict,  # docs/method.md §3.7
                            **getattr(self.online_embed, "weight_dict", {})}

    @property
    def body(self):
        return self.online.backbone.body

    def train(self, mode=True):
        super().train(mode)
        self.body.eval()  # frozen: fixed batch-norm statistics (stage 1's, or recalibrate_batch_norm's)
        return self

    def _body_features(self, batch):
        """The frozen backbone on a padded batch, in its channels-last layout (see ``__init__``)."""
        return self.body(batch.contiguous(memory_format=torch.channels_last))

    def _branch(self, detector, embed, views, with_losses):
        images = [v["image"] for v in views]
        # "classes": the proposals' pseudo-classes, which DETR's views carry (docs/method.md §3.9).
        proposals = [{k: v[k] for k in ("boxes", "ids", "classes") if k in v} for v in views]
        batch, image_sizes, proposals = detector.transform(images, proposals, resize=False)
        with torch.no_grad():
            body_features = self._body_features(batch)
        return self.hook.forward(detector, body_features, image_sizes, batch.shape[-2:], proposals, embed,
                                 self.num_samples, with_losses=with_losses)

    def forward(self, views1, views2, metas=None):
        """views: per image {"image" [3, H, W] in [0, 1], "boxes" [N, 4] xyxy, "ids" [N]} (DETR's
        also "classes" [N], the proposals' cluster ids)
        (``two_view_collate``, whose ``metas`` name the images in warnings). Returns a
        dict: ``loss_*`` terms (``weight_dict``), plus ``contrastive_accuracy``,
        ``instances``, ``matched_instances`` and ``queries`` for the log."""
        q = self._branch(self.online, self.online_embed, views1, with_losses=True)
        with torch.no_grad():
            k = self._branch(self.momentum, self.momentum_embed, views2, with_losses=False)
        loss_con, stats = box_contrastive(q["embeddings"], q["ids"], k["embeddings"], k["ids"], self.temperature)
        if stats["instances"] == 0:
            images = [m.get("image_id") for m in metas] if metas else "?"
            logger.warning("no prediction matched a proposal in this batch (images %s): contrastive loss set to 0",
                           images)
        device = loss_con.device
        return {"loss_contrastive": loss_con, **q["losses"],
                "contrastive_accuracy": torch.tensor(stats["accuracy"], device=device),
                **{name: torch.tensor(stats[name], device=device)
                   for name in ("instances", "matched_instances", "queries")}}

    @torch.no_grad()
    def recalibrate_batch_norm(self, batches, num_batches, device):
        """Recompute the frozen backbone's batch-norm statistics on ``num_batches`` batches of
        views (both views of each), as averages over them, before stage 2 (docs/method.md §3.1):
        stage 1's statistics come from object crops, fine-tuning normalises scenes. Weights are
        unchanged. Returns the number of batches used (0: the backbone has no batch norm)."""
        norms = [m for m in self.body.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or num_batches <= 0:
            return 0
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        used = 0
        for batch in batches:
            for views in batch[:2]:
                images = [v["image"].to(device) for v in views]
                self._body_features(self.online.transform(images, resize=False)[0])
            used += 1
            if used == num_batches:
                break
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.eval()
        return used

    @torch.no_grad()
    def momentum_update(self, step):
        """theta_k <- m theta_k + (1 - m) theta_q after optimiser step ``step``; returns m."""
        return [u.update(step) for u in self.updaters][0]

    def after_step(self, step):
        """What the training loop runs after optimiser step ``step``: the EMA update (§3.2)."""
        return {"ema_momentum": self.momentum_update(step)}

    def detector_state_dict(self):
        """The online detector's weights (backbone included): what fine-tuning loads."""
        return self.online.state_dict()

    def checkpoint_weights(self):
        """"model": the online detector (``finetune.py --init`` reads it); "pretrain": the rest."""
        rest = {k: v for k, v in self.state_dict().items() if not k.startswith("online.")}
        return {"model": self.detector_state_dict(), "pretrain": rest}

    def load_checkpoint_weights(self, checkpoint):
        self.load_state_dict({**{f"online.{k}": v for k, v in checkpoint["model"].items()},
                              **checkpoint["pretrain"]})
