"""k-NN monitor of frozen features: the accuracy of a weighted k-nearest-neighbour
classifier that uses the train images' features as its memory.

Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination" (CVPR 2018), section 3.4: each of the ``k`` train features
most cosine-similar to a test feature votes for its label with weight
``exp(sim / T)``; the label with the largest total wins. It needs no
training, so it tracks self-supervised pre-training (MoCo) cheaply.

Nothing here is distributed: under torch.distributed, run the monitor on one
rank over the whole bank and test set, and share its accuracy with the others.
"""
import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(model, loader, device):
    """``model`` maps images ``[B, 3, H, W]`` to ``[B, C]`` (e.g. ``MoCo.backbone_q``);
    ``loader`` yields ``(images, labels)``. Runs in eval mode and restores the
    mode after. Returns ``(features [N, C] L2-normalised, labels [N] int64)`` on ``device``."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for images, targets in loader:
            features.append(F.normalize(model(images.to(device, non_blocking=True)).float(), dim=1))
            labels.append(torch.as_tensor(targets, dtype=torch.long).to(device))
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("extract_features: the loader yielded no batch")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07,
             num_classes=None, chunk=1024):
    """Top-1 accuracy (a float in [0, 1]) of the weighted k-NN classifier.

    Features ``[N, C]`` / ``[M, C]`` are L2-normalised here (cosine similarity);
    labels are int64 in ``[0, num_classes)`` (default: the largest label + 1).
    Test features are processed ``chunk`` at a time: memory ``chunk x N``.
    """
    device = train_features.device
    train_features = F.normalize(train_features.float(), dim=1)
    train_labels = train_labels.to(device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_features))
    correct = 0
    for features, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        features = F.normalize(features.to(device).float(), dim=1)
        similarity, index = (features @ train_features.T).topk(k, dim=1)  # [c, k]
        votes = torch.zeros(len(features), num_classes, device=device)  # [c, num_classes]
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == labels.to(device)).sum().item()
    return correct / len(test_features)
