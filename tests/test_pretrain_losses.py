"""Box-domain contrastive loss (docs/method.md §3.5) and its statistics.

The loss is checked against a naive per-instance loop written straight from the
definition. The momentum detector (3.1, 3.2) is in test_momentum.py.
"""
import math

import pytest
import torch

from aligndet.pretrain.losses import box_contrastive, box_contrastive_loss, box_contrastive_stats


# ---------------------------------------------------------------------------
# Naive reference: docs/method.md §3.5, one instance, one (query, key) pair at a time.
# ---------------------------------------------------------------------------

def naive_box_contrastive_loss(q, q_ids, k, k_ids, temperature=0.5):
    q = q.double()
    k = k.double().detach()  # momentum embeddings never receive gradient
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    q_ids, k_ids = q_ids.tolist(), k_ids.tolist()
    instances = sorted({i for i in q_ids if i >= 0})
    if not instances:
        return q.sum() * 0
    per_instance = []
    for i in instances:
        queries = [qn[a] for a in range(len(q_ids)) if q_ids[a] == i]
        keys = [kn[b] for b in range(len(k_ids)) if k_ids[b] == i]
        if not keys:  # the queries are their own keys, with gradient (as the official code)
            keys = [qn[a] for a in range(len(q_ids)) if q_ids[a] == i]
        negatives = ([qn[n].detach() for n in range(len(q_ids)) if q_ids[n] != i]
                     + [kn[n] for n in range(len(k_ids)) if k_ids[n] != i])
        pair_losses = []
        for qa in queries:
            for kb in keys:
                positive = torch.exp(torch.dot(qa, kb) / temperature)
                denominator = positive
                for n in negatives:
                    denominator = denominator + torch.exp(torch.dot(qa, n) / temperature)
                pair_losses.append(-torch.log(positive / denominator))
        per_instance.append(torch.stack(pair_losses).mean())
    return torch.stack(per_instance).mean()


def naive_accuracy(q, q_ids, k, k_ids, temperature=0.5):
    q, k = q.double().detach(), k.double().detach()
    qn = q / q.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    q_ids, k_ids = q_ids.tolist(), k_ids.tolist()
    per_instance = []
    for i in sorted({i for i in q_ids if i >= 0}):
        queries = [qn[a] for a in range(len(q_ids)) if q_ids[a] == i]
        keys = [kn[b] for b in range(len(k_ids)) if k_ids[b] == i] or queries
        negatives = ([qn[n] for n in range(len(q_ids)) if q_ids[n] != i]
                     + [kn[n] for n in range(len(k_ids)) if k_ids[n] != i])
        hits = []
        for qa in queries:
            for kb in keys:
                pos = float(torch.dot(qa, kb)) / temperature
                hits.append(all(pos > float(torch.dot(qa, n)) / temperature for n in negatives))
        per_instance.append(sum(hits) / len(hits))
    return sum(per_instance) / len(per_instance)


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------

def embeddings(n, dim, generator, dtype=torch.float64):
    """Un-normalised rows: random directions with random positive scales."""
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    scale = torch.exp(2 * torch.randn(n, 1, generator=generator, dtype=torch.float64))
    return (x * scale).to(dtype)


def random_case(seed):
    g = torch.Generator().manual_seed(seed)
    dim = int(torch.randint(2, 13, (1,), generator=g))
    num_ids = int(torch.randint(1, 7, (1,), generator=g))
    # Large, non-contiguous ids: nothing may assume ids < D or ids contiguous.
    pool = (torch.randperm(5000, generator=g)[:num_ids + 2] * 7 + 256).tolist()
    q_pool, k_only = pool[:num_ids], pool[num_ids:]
    nq = int(torch.randint(1, 13, (1,), generator=g))
    nk = int(torch.randint(0, 13, (1,), generator=g))
    bg = float(torch.rand(1, generator=g)) * 0.5

    def draw(n, ids):
        out = []
        for _ in range(n):
            if float(torch.rand(1, generator=g)) < bg:
                out.append(-1)
            else:
                out.append(ids[int(torch.randint(0, len(ids), (1,), generator=g))])
        return torch.tensor(out, dtype=torch.int64)

    q_ids = draw(nq, q_pool)
    # Keys: mostly q's ids (some left out by chance), some ids only the momentum view has.
    k_ids = draw(nk, q_pool[: max(1, num_ids - 1)] + k_only)
    temperature = [0.5, 0.2, 0.07, 1.0, 2.0][seed % 5]
    return (embeddings(nq, dim, g), q_ids, embeddings(nk, dim, g), k_ids, temperature)


def ids(*values):
    return torch.tensor(values, dtype=torch.int64)


def case(q_ids, k_ids, dim, temperature=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (embeddings(len(q_ids), dim, g), ids(*q_ids), embeddings(len(k_ids), dim, g),
            ids(*k_ids), temperature)


NAMED_CASES = {
    # 1024 is in q only: its queries serve as their own keys.
    "empty_key_instance": case([300, 300, 1024, -1], [300, -1, 77777], dim=5),
    "no_keys_at_all": case([300, 301, 301], [], dim=4, temperature=0.2),
    "single_instance_with_background": case([500, 500, -1], [500, -1, -1], dim=6),
    "single_instance_no_negatives": case([500, 500], [500, 500, 500], dim=6),
    "single_instance_key_missing_no_negatives": case([500, 500, 500], [], dim=3),
    "several_queries_and_keys": case([1000, 1000, 1000, 4096, 4096, -1],
                                     [4096, 1000, 1000, 4096, -1, -1, 1000], dim=8, temperature=0.1),
    "ids_only_in_k": case([7, 9, 9], [7, 123456, 123456, 9, -1], dim=4, temperature=1.5),
    "few_dims_many_ids": case([256, 999, 1000, 4000, 12, 65536, 70000], [70000, 12, 999, 256, 31, -1],
                              dim=3),
    "many_dims_few_ids": case([257, 257, 3000], [3000, -1, 257], dim=64, temperature=0.07),
}


def call_loss(q, q_ids, k, k_ids, temperature):
    return box_contrastive_loss(q, q_ids, k, k_ids, temperature=temperature)


# ---------------------------------------------------------------------------
# 1. Loss equals its naive definition
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(NAMED_CASES))
def test_loss_matches_naive_named_cases(name):
    q, q_ids, k, k_ids, tau = NAMED_CASES[name]
    q_before, k_before = q.clone(), k.clone()
    loss = call_loss(q, q_ids, k, k_ids, tau)
    expected = naive_box_contrastive_loss(q, q_ids, k, k_ids, tau)
    assert loss.dim() == 0
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=0)
    # Normalisation happens on copies, never in place.
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


def test_loss_without_negatives_is_zero():
    for name in ("single_instance_no_negatives", "single_instance_key_missing_no_negatives"):
        q, q_ids, k, k_ids, tau = NAMED_CASES[name]
        assert abs(float(call_loss(q, q_ids, k, k_ids, tau))) < 1e-6, name


def test_loss_matches_naive_random():
    saw_empty_keys = saw_background = False
    for seed in range(40):
        q, q_ids, k, k_ids, tau = random_case(seed)
        loss = call_loss(q, q_ids, k, k_ids, tau)
        expected = naive_box_contrastive_loss(q, q_ids, k, k_ids, tau)
        torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=0,
                                   msg=lambda m: f"seed {seed}: {m}")
        present = set(q_ids.tolist()) - {-1}
        saw_empty_keys |= bool(present - set(k_ids.tolist()))
        saw_background |= bool((q_ids < 0).any() and (k_ids < 0).any())
    assert saw_empty_keys and saw_background  # the sweep covers those branches


def test_loss_float32_matches_naive():
    for seed in range(5):
        q, q_ids, k, k_ids, tau = random_case(100 + seed)
        loss = call_loss(q.float(), q_ids, k.float(), k_ids, tau)
        assert loss.dtype == torch.float32
        expected = naive_box_contrastive_loss(q.float(), q_ids, k.float(), k_ids, tau)
        torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nq", [0, 1, 4])
def test_background_only_queries_give_differentiable_zero(nq):
    g = torch.Generator().manual_seed(nq)
    q = embeddings(nq, 5, g).requires_grad_()
    k = embeddings(3, 5, g)
    loss = box_contrastive_loss(q, torch.full((nq,), -1, dtype=torch.int64), k, ids(4, -1, 300))
    assert loss.dim() == 0
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert q.grad is not None and torch.equal(q.grad, torch.zeros_like(q))


# ---------------------------------------------------------------------------
# 2. Gradient: into q only, equal to the naive loss's gradient
# ---------------------------------------------------------------------------

def grad_cases():
    return [NAMED_CASES[n] for n in sorted(NAMED_CASES)] + [random_case(200 + s) for s in range(15)]


def test_gradient_only_into_q_and_matches_naive():
    for index, (q, q_ids, k, k_ids, tau) in enumerate(grad_cases()):
        q = q.clone().requires_grad_()
        k = k.clone().requires_grad_()
        call_loss(q, q_ids, k, k_ids, tau).backward()
        assert k.grad is None or torch.equal(k.grad, torch.zeros_like(k)), index
        assert q.grad is not None
        q_ref = q.detach().clone().requires_grad_()
        (expected,) = torch.autograd.grad(
            naive_box_contrastive_loss(q_ref, q_ids, k.detach(), k_ids, tau), q_ref)
        torch.testing.assert_close(q.grad, expected, atol=1e-6, rtol=0,
                                   msg=lambda m: f"case {index}: {m}")


def test_gradient_of_empty_key_instance_flows_through_self_keys():
    # Only instance 5 has no keys; its keys are its own queries, and the gradient flows
    # through both sides of each (query, own query) pair, as in the official code. With
    # detached self-keys the gradient would be a different one.
    q = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.1], [0.0, 0.4, 1.0]], dtype=torch.float64)
    q.requires_grad_()
    q_ids, k, k_ids = ids(5, 5, -1), torch.tensor([[0.5, -1.0, 0.2]], dtype=torch.float64), ids(-1)
    box_contrastive_loss(q, q_ids, k, k_ids).backward()
    q_ref = q.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(naive_box_contrastive_loss(q_ref, q_ids, k, k_ids), q_ref)
    torch.testing.assert_close(q.grad, expected, atol=1e-9, rtol=0)

    # The same loss with the self-keys detached, written out: its gradient differs.
    q_det = q.detach().clone().requires_grad_()
    qn = q_det / q_det.norm(dim=1, keepdim=True)
    kn = k / k.norm(dim=1, keepdim=True)
    pair_losses = []
    for a in (0, 1):
        for b in (0, 1):
            logits = torch.stack([qn[a] @ qn[b].detach(), qn[a] @ qn[2].detach(), qn[a] @ kn[0]]) / 0.5
            pair_losses.append(torch.logsumexp(logits, 0) - logits[0])
    (detached,) = torch.autograd.grad(torch.stack(pair_losses).mean(), q_det)
    assert (q.grad - detached).abs().max() > 1e-3


@pytest.mark.parametrize("block_elements", [1, 7, 40])
def test_row_blocks_give_the_same_loss_gradient_and_stats(block_elements):
    for seed in range(12):
        q, q_ids, k, k_ids, tau = random_case(500 + seed)
        q_one = q.clone().requires_grad_()
        loss_one, stats_one = box_contrastive(q_one, q_ids, k, k_ids, tau)
        loss_one.backward()
        q_blocks = q.clone().requires_grad_()
        loss_blocks, stats_blocks = box_contrastive(q_blocks, q_ids, k, k_ids, tau, block_elements=block_elements)
        loss_blocks.backward()
        torch.testing.assert_close(loss_blocks, loss_one, atol=1e-12, rtol=0)
        torch.testing.assert_close(q_blocks.grad, q_one.grad, atol=1e-12, rtol=0)
        assert stats_blocks == pytest.approx(stats_one, abs=1e-12), seed


def test_loss_and_stats_of_one_call_equal_the_separate_ones():
    for seed in range(10):
        q, q_ids, k, k_ids, tau = random_case(600 + seed)
        loss, stats = box_contrastive(q, q_ids, k, k_ids, tau)
        assert float(loss) == float(box_contrastive_loss(q, q_ids, k, k_ids, tau))
        assert stats == box_contrastive_stats(q, q_ids, k, k_ids, tau)
        expected = naive_accuracy(q, q_ids, k, k_ids, tau) if (q_ids >= 0).any() else 0.0
        assert stats["accuracy"] == pytest.approx(expected, abs=1e-9), seed


# ---------------------------------------------------------------------------
# 3. Statistics
# ---------------------------------------------------------------------------

def eye_rows(dim, *indices):
    return torch.eye(dim, dtype=torch.float64)[list(indices)]


def test_stats_counts_on_hand_made_example():
    q_ids, k_ids = ids(3, 3, -1, 7, 300, -1), ids(3, -1, 300, 300, 11)
    g = torch.Generator().manual_seed(0)
    stats = box_contrastive_stats(embeddings(6, 4, g), q_ids, embeddings(5, 4, g), k_ids)
    assert set(stats) >= {"accuracy", "instances", "matched_instances", "queries"}
    assert all(isinstance(stats[key], float)
               for key in ("accuracy", "instances", "matched_instances", "queries"))
    assert stats["instances"] == 3.0          # 3, 7, 300
    assert stats["matched_instances"] == 2.0  # 3, 300
    assert stats["queries"] == 4.0


def test_stats_accuracy_one_when_keys_equal_queries_and_negatives_orthogonal():
    q = eye_rows(8, 0, 1, 1, 2) * torch.tensor([[2.0], [0.5], [0.5], [3.0]], dtype=torch.float64)
    q_ids, k_ids = ids(10, 20, 20, 30), ids(30, 10, 20, -1, -1)
    k = eye_rows(8, 2, 0, 1, 5, 6)
    assert box_contrastive_stats(q, q_ids, k, k_ids)["accuracy"] == 1.0


def test_stats_accuracy_one_without_negatives():
    q, k = eye_rows(4, 0, 1), eye_rows(4, 2)
    assert box_contrastive_stats(q, ids(9, 9), k, ids(9))["accuracy"] == 1.0


def test_stats_accuracy_zero_when_a_negative_equals_the_query():
    q, q_ids = eye_rows(6, 0, 1), ids(1, 2)
    k, k_ids = eye_rows(6, 2, 3, 0, 1), ids(1, 2, -1, -1)
    assert box_contrastive_stats(q, q_ids, k, k_ids)["accuracy"] == 0.0


def test_stats_accuracy_ties_are_misses():
    # The positive equals a negative: "strictly larger" fails.
    q, q_ids = eye_rows(4, 0), ids(1)
    k, k_ids = eye_rows(4, 0, 0), ids(1, -1)
    assert box_contrastive_stats(q, q_ids, k, k_ids)["accuracy"] == 0.0


def test_stats_accuracy_is_mean_over_instances_of_mean_over_pairs():
    # Instance 5: 1 pair, right. Instance 9: 3 pairs, 1 right -> (1 + 1/3) / 2, not 2/4.
    q, q_ids = eye_rows(8, 0, 1, 2, 3), ids(5, 9, 9, 9)
    bg = (eye_rows(8, 2) + eye_rows(8, 3)) / math.sqrt(2)
    k, k_ids = torch.cat([eye_rows(8, 0, 1), bg]), ids(5, 9, -1)
    accuracy = box_contrastive_stats(q, q_ids, k, k_ids)["accuracy"]
    assert accuracy == pytest.approx(2 / 3, abs=1e-12)


def test_stats_accuracy_matches_naive_random():
    for seed in range(20):
        q, q_ids, k, k_ids, tau = random_case(300 + seed)
        if not (q_ids >= 0).any():
            continue
        stats = box_contrastive_stats(q, q_ids, k, k_ids, temperature=tau)
        assert stats["accuracy"] == pytest.approx(naive_accuracy(q, q_ids, k, k_ids, tau), abs=1e-9), seed
        present = set(q_ids.tolist()) - {-1}
        assert stats["instances"] == len(present)
        assert stats["matched_instances"] == len(present & set(k_ids.tolist()))
        assert stats["queries"] == int((q_ids >= 0).sum())


# ---------------------------------------------------------------------------
# 4. Invariances
# ---------------------------------------------------------------------------

def test_loss_invariant_to_row_order_id_names_and_row_scale():
    for seed in range(10):
        q, q_ids, k, k_ids, tau = random_case(400 + seed)
        reference = call_loss(q, q_ids, k, k_ids, tau).double()
        g = torch.Generator().manual_seed(seed)
        pq, pk = torch.randperm(len(q_ids), generator=g), torch.randperm(len(k_ids), generator=g)
        permuted = call_loss(q[pq], q_ids[pq], k[pk], k_ids[pk], tau).double()
        torch.testing.assert_close(permuted, reference, atol=1e-9, rtol=0)

        # Injective relabelling that keeps -1, reversing the order of the ids.
        distinct = sorted((set(q_ids.tolist()) | set(k_ids.tolist())) - {-1})
        new_names = (torch.randperm(10 ** 6, generator=g)[:len(distinct)].sort().values + 1).tolist()
        mapping = {-1: -1, **dict(zip(distinct, reversed(new_names)))}
        relabel = lambda t: torch.tensor([mapping[i] for i in t.tolist()], dtype=torch.int64)  # noqa: E731
        relabelled = call_loss(q, relabel(q_ids), k, relabel(k_ids), tau).double()
        torch.testing.assert_close(relabelled, reference, atol=1e-9, rtol=0)

        sq = torch.rand(len(q_ids), 1, generator=g, dtype=torch.float64) * 10 + 0.01
        sk = torch.rand(len(k_ids), 1, generator=g, dtype=torch.float64) * 10 + 0.01
        rescaled = call_loss(q * sq, q_ids, k * sk, k_ids, tau).double()
        torch.testing.assert_close(rescaled, reference, atol=1e-9, rtol=0)
