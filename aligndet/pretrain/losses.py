"""The box-level contrastive loss of AlignDet (Eq. 3, docs/method.md §3.5).

Predictions of the online detector on view 1 (``q``) and of the momentum
detector on view 2 (``k``) each carry the instance id of the selective-search
proposal their detector assigned them to (``-1``: background). For every
instance ``i`` among the online predictions:

    queries    Q_i = {q : id(q) = i}
    positives  K_i = {k : id(k) = i}          (Q_i itself, detached, if empty)
    negatives  N_i = {z in q and k : id(z) != i}, background included, detached
    l_i = mean_{a in Q_i, b in K_i} -log( e^{a.b/t} / (e^{a.b/t} + sum_{n in N_i} e^{a.n/t}) )
    L_con = mean_i l_i

The paper prints the positives as coming from the online view; the momentum
view is meant (as in MoCo and the official code). ``-log(e^p / (e^p + e^N))``
with ``N = logsumexp`` over the negatives is ``softplus(N - p)``, which is how
it is computed here: one similarity matrix, masks for positives and
negatives, no loop over instances.
"""
import torch
import torch.nn.functional as F


def _pairs(q, q_ids, k, k_ids, temperature):
    """Per positive pair (query a, key b): the positive logit, the logsumexp of
    a's negatives, and the pair's weight in the mean over instances.

    Returns (pos [P], neg_lse [P], max_neg [P], weight [P], instance ids of q [Nq]).
    """
    q = F.normalize(q, dim=1)                      # [Nq, D]
    k = F.normalize(k, dim=1).detach()             # [Nk, D]
    q_det = q.detach()
    # Keys: the momentum view, then the (detached) queries for instances the momentum view lacks.
    has_key = torch.isin(q_ids, k_ids)             # [Nq]
    keys = torch.cat([k, q_det])                   # [Nk + Nq, D]
    key_ids = torch.cat([k_ids, torch.where(has_key, torch.full_like(q_ids, -1), q_ids)])
    pos_mask = (q_ids[:, None] == key_ids[None, :]) & (q_ids[:, None] >= 0)  # [Nq, Nk + Nq]

    bank = torch.cat([q_det, k])                   # negatives come from both views
    bank_ids = torch.cat([q_ids, k_ids])
    neg_mask = q_ids[:, None] != bank_ids[None, :]  # [Nq, Nq + Nk]
    neg_logits = (q @ bank.t() / temperature).masked_fill(~neg_mask, float("-inf"))
    neg_lse = torch.logsumexp(neg_logits, dim=1)   # [Nq], -inf when a query has no negatives
    max_neg = neg_logits.max(dim=1).values if bank.numel() else neg_lse

    query, key = pos_mask.nonzero(as_tuple=True)   # [P], [P]
    pos = (q[query] * keys[key]).sum(dim=1) / temperature
    # Weight 1 / (|Q_i| |K_i| |I|): the mean over an instance's pairs, then over instances.
    ids, inverse, pairs_per_id = torch.unique(q_ids[query], return_inverse=True, return_counts=True)
    weight = 1.0 / (pairs_per_id[inverse].to(pos.dtype) * max(len(ids), 1))
    return pos, neg_lse[query], max_neg[query], weight, ids


def box_contrastive_loss(q, q_ids, k, k_ids, temperature=0.5):
    """L_con (module docstring) for online embeddings ``q`` [Nq, D] and momentum
    embeddings ``k`` [Nk, D] (normalised here) with int64 instance ids, -1 =
    background. Gradient flows into ``q`` only. Returns a scalar; exactly 0
    (still attached to ``q``) when no online prediction has an instance."""
    pos, neg_lse, _, weight, _ = _pairs(q, q_ids, k, k_ids, temperature)
    if pos.numel() == 0:
        return q.sum() * 0.0
    return (F.softplus(neg_lse - pos) * weight).sum()


@torch.no_grad()
def box_contrastive_stats(q, q_ids, k, k_ids, temperature=0.5):
    """What the log shows next to L_con: ``accuracy`` (positive ranked above every
    negative, weighted like the loss), ``instances`` among the online predictions,
    ``matched_instances`` (also in the momentum view), ``queries``."""
    pos, _, max_neg, weight, ids = _pairs(q, q_ids, k, k_ids, temperature)
    accuracy = float(((pos > max_neg).to(weight.dtype) * weight).sum()) if pos.numel() else 0.0
    return {"accuracy": accuracy, "instances": float(len(ids)),
            "matched_instances": float(torch.isin(ids, k_ids).sum()),
            "queries": float((q_ids >= 0).sum())}
