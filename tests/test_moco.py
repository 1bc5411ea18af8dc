"""MoCo v2 (aligndet/pretrain/moco.py) and the k-NN monitor (knn.py).

The loss against its per-sample definition, the queue as FIFO buffers, which
weights train and how the key encoder follows, shuffle BN in one process and
across two gloo processes, the k-NN vote by hand, and a loss that falls.
"""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import v2 as T

from aligndet.data.transforms import TwoCrops, build_moco_v2_transform
from aligndet.pretrain.knn import extract_features, knn_top1
from aligndet.pretrain.moco import MoCo
from aligndet.pretrain.momentum import MomentumUpdater, make_momentum_copy
from conftest import run_gloo_workers


def small_encoder(bn=True):
    """A conv net returning [B, 16], with or without batch norm."""
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), norm(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def small_moco(bn=True, **kwargs):
    kwargs = {"dim": 8, "queue_size": 10, "shuffle_splits": 3, **kwargs}
    return MoCo(small_encoder(bn), 16, **kwargs)


def tagged_images(n, first_id=0, size=16):
    """Random images whose pixel [0, 0, 0] holds an id, so hooks can tell them apart."""
    images = torch.randn(n, 3, size, size)
    images[:, 0, 0, 0] = torch.arange(first_id, first_id + n, dtype=torch.float32)
    return images


def record_batches(module):
    """The image ids of every batch ``module`` sees, one list per call."""
    seen = []
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0][:, 0, 0, 0].long().tolist()))
    return seen


# ---------------------------------------------------------------------------
# Queue
# ---------------------------------------------------------------------------

def test_queue_and_pointer_are_buffers_that_round_trip():
    torch.manual_seed(0)
    model = small_moco(queue_size=12)
    state = model.state_dict()
    assert state["queue"].shape == (8, 12) and state["queue_ptr"].dtype == torch.long
    torch.testing.assert_close(state["queue"].norm(dim=0), torch.ones(12))
    assert any(k.startswith("encoder_k.") for k in state)
    model.train()(torch.randn(5, 3, 16, 16), torch.randn(5, 3, 16, 16))  # moves the queue and pointer
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    restored = small_moco(queue_size=12)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert int(restored.queue_ptr) == 5
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.parametrize("queue_size, batch_sizes", [(10, [4, 4, 4, 1, 7]), (3, [2, 5, 1])])
def test_forward_enqueues_keys_fifo_with_wraparound(queue_size, batch_sizes):
    """Against a column-by-column FIFO; covers K % B != 0 and B > K."""
    torch.manual_seed(0)
    model = small_moco(bn=False, queue_size=queue_size).train()
    expected, ptr = model.queue.clone(), 0
    for b in batch_sizes:
        im_q, im_k = torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)
        keys = F.normalize(model.encoder_k(im_k), dim=1)  # no BN: shuffling cannot change them
        model(im_q, im_k)
        model.momentum_update(0)
        for key in keys:
            expected[:, ptr] = key
            ptr = (ptr + 1) % queue_size
        assert int(model.queue_ptr) == ptr
        torch.testing.assert_close(model.queue, expected, atol=1e-6, rtol=0)


def test_eval_forward_leaves_queue_alone_and_training_needs_momentum_update():
    torch.manual_seed(0)
    model = small_moco()
    im_q, im_k = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    queue = model.queue.clone()
    model.eval()(im_q, im_k)
    model(im_q, im_k)
    assert torch.equal(model.queue, queue) and int(model.queue_ptr) == 0
    model.train()(im_q, im_k)
    with pytest.raises(RuntimeError, match="momentum_update"):
        model(im_q, im_k)
    model.momentum_update(1)
    model(im_q, im_k)


def test_rejects_encoder_with_classifier():
    with pytest.raises(ValueError, match="fc"):
        MoCo(torchvision.models.resnet18(), 512)


# ---------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------

def naive_infonce(q, k, queue, temperature):
    """-log(exp(q.k/T) / (exp(q.k/T) + sum_j exp(q.n_j/T))), one sample at a time."""
    losses, hits = [], []
    for qi, ki in zip(q, k):
        positive = torch.exp(qi @ ki / temperature)
        negatives = [torch.exp(qi @ n / temperature) for n in queue.T]
        losses.append(-torch.log(positive / (positive + sum(negatives))))
        hits.append(float(all(qi @ ki > qi @ n for n in queue.T)))
    return torch.stack(losses).mean(), sum(hits) / len(hits)


@pytest.mark.parametrize("training", [True, False])
def test_loss_equals_naive_infonce(monkeypatch, training):
    torch.manual_seed(0)
    model = small_moco(queue_size=7, temperature=0.2).double().train(training)
    captured = {}
    for name in ("encode_queries", "encode_keys"):  # record what the forward used
        method = getattr(model, name)
        monkeypatch.setattr(model, name, lambda x, method=method, name=name:
                            captured.setdefault(name, method(x)))
    queue = model.queue.clone()
    out = model(torch.randn(6, 3, 16, 16, dtype=torch.float64), torch.randn(6, 3, 16, 16, dtype=torch.float64))
    q, (k, _) = captured["encode_queries"], captured["encode_keys"]
    torch.testing.assert_close(q.norm(dim=1), torch.ones(6, dtype=torch.float64))
    loss, accuracy = naive_infonce(q.detach(), k, queue, 0.2)
    torch.testing.assert_close(out["loss_contrastive"], loss, atol=1e-5, rtol=0)
    assert out["acc_top1"].item() == pytest.approx(accuracy)
    assert not [name for name in out if name.startswith("loss") and name != "loss_contrastive"]
    assert 0 <= out["acc_top1"] <= out["acc_top5"] <= 1


# ---------------------------------------------------------------------------
# What trains, and the momentum update
# ---------------------------------------------------------------------------

def test_gradients_reach_only_the_query_encoder_and_key_follows_by_ema():
    torch.manual_seed(0)
    model = small_moco(momentum=0.9).train()
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # frozen ones included on purpose
    model(torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16))["loss_contrastive"].backward()
    for name, p in model.encoder_q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.encoder_k.parameters())
    key_params = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    key_buffers = {n: b.clone() for n, b in model.encoder_k.named_buffers()}
    optimizer.step()
    for name, p in model.encoder_k.named_parameters():
        assert torch.equal(p, key_params[name]), f"{name} moved in the optimiser step"

    assert model.momentum_update(1) == 0.9
    query = dict(model.encoder_q.named_parameters())
    for name, p in model.encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.9 * key_params[name] + 0.1 * query[name].detach(), atol=1e-7, rtol=0)
        assert not torch.equal(p, key_params[name]), name
    # The key encoder keeps its own batch-norm statistics (see MoCo.__init__).
    query_buffers = dict(model.encoder_q.named_buffers())
    for name, b in model.encoder_k.named_buffers():
        assert torch.equal(b, key_buffers[name]), name
    assert not torch.equal(query_buffers["backbone.1.running_mean"], key_buffers["backbone.1.running_mean"])


def test_momentum_updater_constant_schedule_and_kept_buffers():
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = make_momentum_copy(online)
    online.train()(torch.randn(8, 3))
    updater = MomentumUpdater(online, target, base=0.99, total_steps=10, schedule="constant", copy_buffers=False)
    assert [updater.update(step) for step in (0, 5, 10)] == [0.99, 0.99, 0.99]
    assert torch.equal(target[1].running_mean, torch.zeros(4))
    with pytest.raises(ValueError, match="schedule"):
        MomentumUpdater(online, target, schedule="linear")


def test_backbone_state_dict_has_torchvision_names():
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    model = MoCo(resnet, 512, queue_size=16)
    state = model.backbone_state_dict()
    assert model.backbone_q is resnet
    expected = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    assert set(state) == expected
    missing, unexpected = torchvision.models.resnet18().load_state_dict(state, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


# ---------------------------------------------------------------------------
# Shuffle BN in one process
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [7, 1, 2, 3, 8])
def test_single_process_shuffle_returns_keys_in_order(batch):
    """Without BN the groups cannot change a key, so shuffled = unshuffled."""
    torch.manual_seed(batch)
    model = small_moco(bn=False, shuffle_splits=3).train()
    im_k = tagged_images(batch)
    seen = record_batches(model.encoder_k)
    k, all_k = model.encode_keys(im_k)
    assert all_k is k and k.shape == (batch, 8)
    torch.testing.assert_close(k, F.normalize(model.encoder_k(im_k), dim=1), atol=1e-6, rtol=0)
    groups = seen[:-1]  # the last call is the unshuffled reference above
    assert len(groups) == min(3, batch)
    assert sorted(i for g in groups for i in g) == list(range(batch))  # each image once
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_single_process_bn_groups():
    """Queries: contiguous chunks in order; keys: chunks of a random permutation;
    in eval mode both run as one batch."""
    torch.manual_seed(0)
    model = small_moco(shuffle_splits=4).train()
    seen_q, seen_k = record_batches(model.encoder_q), record_batches(model.encoder_k)
    batches = [tagged_images(10) for _ in range(3)]
    for images in batches:
        model(images, images)
        model.momentum_update(0)
    assert seen_q == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]] * 3
    assert all(sorted(i for g in seen_k[j:j + 4] for i in g) == list(range(10)) for j in (0, 4, 8))
    assert [g for g in seen_k if g not in seen_q]  # the keys were shuffled
    seen_q.clear(), seen_k.clear()
    model.eval()(batches[0], batches[0])
    assert seen_q == seen_k == [list(range(10))]


def test_resnet18_trains_with_batch_not_divisible_by_splits():
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    resnet.fc = nn.Identity()
    model = MoCo(resnet, 512, dim=16, hidden_dim=32, queue_size=20, shuffle_splits=3).train()
    out = model(torch.randn(7, 3, 32, 32), torch.randn(7, 3, 32, 32))  # groups of 3, 2, 2
    out["loss_contrastive"].backward()
    assert torch.isfinite(out["loss_contrastive"])
    assert resnet.conv1.weight.grad is not None and int(model.queue_ptr) == 7


# ---------------------------------------------------------------------------
# Shuffle BN across two processes (gloo)
# ---------------------------------------------------------------------------

WORKER = """
import torch
import torch.nn.functional as F
from aligndet import distributed as D
from tests.test_moco import small_moco, tagged_images, record_batches

D.init_distributed(device="cpu")
rank = D.get_rank()
torch.manual_seed(0)  # the same model and queue on both ranks
model = small_moco(bn=False, queue_size=20).train()
seen = record_batches(model.encoder_k)
torch.manual_seed(100 + rank)
batch = (3, 5)[rank]  # uneven, as the last batch of an epoch can be
total = 8
foreign = False
for step in range(5):
    im_k = tagged_images(batch, first_id=100 * rank)
    reference = F.normalize(model.encoder_k(im_k), dim=1)  # no BN: unaffected by the shuffle
    seen.clear()
    k, all_k = model.encode_keys(im_k)
    torch.testing.assert_close(k, reference, atol=1e-6, rtol=0)  # our keys, in our order
    assert torch.equal(all_k, torch.cat(D.all_gather_object(k)))  # every rank's, in rank order
    ids = [i for g in seen for i in g]
    assert len(ids) == batch
    everything = sorted(i for part in D.all_gather_object(ids) for i in part)
    assert everything == [0, 1, 2, 100, 101, 102, 103, 104]
    foreign |= any(i // 100 != rank for i in ids)
assert any(D.all_gather_object(foreign))  # images crossed ranks

im_q, im_k = tagged_images(batch), tagged_images(batch, first_id=100 * rank)
keys = F.normalize(model.encoder_k(im_k), dim=1)
queue_before = model.queue.clone()
model(im_q, im_k)["loss_contrastive"].backward()
model.momentum_update(1)
all_keys = torch.cat(D.all_gather_object(keys))
torch.testing.assert_close(model.queue[:, :total].T, all_keys, atol=1e-6, rtol=0)
assert torch.equal(model.queue[:, total:], queue_before[:, total:]) and int(model.queue_ptr) == total
queues = D.all_gather_object(model.queue)
assert torch.equal(queues[0], queues[1])  # the queue is the same on every rank
D.cleanup()
print("ok", rank)
"""


def test_two_gloo_processes_shuffle_and_enqueue():
    run_gloo_workers(WORKER)


# ---------------------------------------------------------------------------
# k-NN monitor
# ---------------------------------------------------------------------------

def test_knn_on_clusters_is_perfect_and_chunking_changes_nothing():
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(4, 32), dim=1) * 5
    train_labels, test_labels = torch.arange(4).repeat(25), torch.arange(4).repeat(10)
    train = centres[train_labels] + torch.randn(100, 32) * 0.3
    test = centres[test_labels] + torch.randn(40, 32) * 0.3
    assert knn_top1(train, train_labels, test, test_labels) == 1.0
    shuffled = test_labels[torch.randperm(40)]
    accuracy = knn_top1(train, train_labels, test, shuffled, k=5)
    assert accuracy == knn_top1(train, train_labels, test, shuffled, k=5, chunk=3) < 1.0


def test_knn_weighted_vote_by_hand():
    """k = 3 neighbours of the test point (1, 0): one of class 1 at cosine 0.9,
    two of class 0 at 0.2. Majority says 0; with T = 0.1 the weights are
    e^9 vs 2 e^2, so 1 wins; with T = 10, 2 e^0.02 > e^0.09 and 0 wins."""
    def at(cos):
        return [cos, (1 - cos ** 2) ** 0.5]
    train = torch.tensor([at(0.9), at(0.2), at(0.2), at(-0.5), at(-0.9)])
    train[2, 1] *= -1  # the same cosine on the other side
    labels = torch.tensor([1, 0, 0, 2, 2])
    test = torch.tensor([[3.0, 0.0]])  # not normalised: cosine similarity is
    assert knn_top1(train, labels, test, torch.tensor([1]), k=3, temperature=0.1) == 1.0
    assert knn_top1(train, labels, test, torch.tensor([0]), k=3, temperature=10.0) == 1.0
    assert knn_top1(train, labels, test, torch.tensor([2]), k=5, temperature=1.0, num_classes=4) == 0.0


def test_extract_features_in_eval_mode_and_restores_train_mode():
    torch.manual_seed(0)
    encoder = small_encoder().train()
    images, labels = torch.randn(10, 3, 16, 16), torch.arange(10) % 3
    loader = [(images[:4], labels[:4]), (images[4:], labels[4:].tolist())]
    stats = {n: b.clone() for n, b in encoder.named_buffers()}
    features, got = extract_features(encoder, loader, torch.device("cpu"))
    assert encoder.training
    assert all(torch.equal(b, stats[n]) for n, b in encoder.named_buffers())  # no BN update: eval mode
    torch.testing.assert_close(features, F.normalize(encoder.eval()(images), dim=1))
    assert torch.equal(got, labels) and got.dtype == torch.long


# ---------------------------------------------------------------------------
# Learning, and the augmentation
# ---------------------------------------------------------------------------

def test_loss_decreases():
    """32 images of distinct colours seen in batches of 8 with a queue of 16
    (the two batches before: never the same images); the views are noisy flips."""
    torch.manual_seed(0)
    model = small_moco(dim=16, queue_size=16, shuffle_splits=2, momentum=0.9).train()
    optimizer = torch.optim.Adam(model.encoder_q.parameters(), lr=3e-3)
    pool = torch.randn(32, 3, 1, 1) + 0.5 * torch.randn(32, 3, 16, 16)

    def view(images):
        flip = torch.rand(len(images)) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images + 0.1 * torch.randn_like(images)

    losses = []
    for step in range(40):
        images = pool[8 * (step % 4):8 * (step % 4 + 1)]
        loss = model(view(images), view(images))["loss_contrastive"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.momentum_update(step)
        losses.append(loss.item())
    # The first two steps meet the random initial queue (easy negatives); from
    # step 2 on the queue holds real keys.
    first, last = np.mean(losses[2:6]), np.mean(losses[-4:])
    assert last < 0.8 * first, losses


def test_transform_gives_two_different_views():
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    for blur in (True, False):
        q, k = TwoCrops(build_moco_v2_transform(size=32, blur=blur))(image)
        assert q.shape == k.shape == (3, 32, 32) and q.dtype == k.dtype == torch.float32
        assert not torch.equal(q, k)
        assert q.min() < 0 < q.max()  # normalised, not in [0, 1]
        assert type(q) is torch.Tensor  # not a tv_tensors.Image
    blur = [t for t in build_moco_v2_transform(size=224).transforms if isinstance(t, T.RandomApply)][-1]
    assert blur.p == 0.5 and blur.transforms[0].kernel_size == (23, 23)  # ~10% of 224, odd
    assert list(blur.transforms[0].sigma) == [0.1, 2.0]  # SimCLR's range at 224 px
    blur = [t for t in build_moco_v2_transform(size=64, blur_sigma=(0.03, 0.6)).transforms
            if isinstance(t, T.RandomApply)][-1]
    assert list(blur.transforms[0].sigma) == [0.03, 0.6] and blur.transforms[0].kernel_size == (7, 7)
    jitter, gray = build_moco_v2_transform(size=224).transforms[2:4]  # MoCo v2's (0.4, 0.4, 0.4, 0.1), p 0.8
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4) and jitter.transforms[0].hue == (-0.1, 0.1)
    assert gray.p == 0.2
    jitter, gray = build_moco_v2_transform(size=64, jitter_strength=1.0, grayscale=0.5).transforms[2:4]
    assert jitter.transforms[0].saturation == pytest.approx((0.2, 1.8)) and jitter.transforms[0].hue == (-0.2, 0.2) and gray.p == 0.5

