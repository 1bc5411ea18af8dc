"""Supervised image-domain pre-training (stage 1, docs/method.md §2): a
classifier that returns its loss dict, so the shared training loop runs it
like every other model.

    images [B, 3, S, S] --ResNet--> logits [B, classes] --cross-entropy(labels)--> loss_ce
"""
import torch.nn.functional as F
from torch import nn

from aligndet.models.weights import trunk_key


class ImageClassifier(nn.Module):
    """A torchvision classifier (``net``: a ResNet, Swin, ConvNeXt, MobileNet) trained with cross-entropy."""

    weight_dict = {"loss_ce": 1.0}

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images, labels):
        """images [B, 3, S, S] normalised like ImageNet, labels [B] int64 -> {"loss_ce", "acc_top1"}."""
        logits = self.net(images)  # [B, classes]
        return {"loss_ce": F.cross_entropy(logits, labels), "acc_top1": (logits.argmax(1) == labels).float().mean()}

    def backbone_state_dict(self):
        """The trunk's weights in torchvision names, without the classifier (ResNet's conv1 ... layer4, the
        others' features.*): what --init reads."""
        state = self.net.state_dict()
        pattern = trunk_key(state)
        return {k: v for k, v in state.items() if pattern.match(k)}

    def checkpoint_weights(self):
        return {"backbone": self.backbone_state_dict(), "model": self.state_dict()}
