"""The box-level contrastive loss of AlignDet (Eq. 3, docs/method.md §3.5).

Predictions of the online detector on view 1 (``q``) and of the momentum
detector on view 2 (``k``) each carry the instance id of the selective-search
proposal their detector assigned them to (``-1``: background). For every
instance ``i`` among the online predictions:

    queries    Q_i = {q : id(q) = i}
    positives  K_i = {k : id(k) = i}          (Q_i itself, with gradient, if empty)
    negatives  N_i = {z in q and k : id(z) != i}, background included, detached
    l_i = mean_{a in Q_i, b in K_i} -log( e^{a.b/t} / (e^{a.b/t} + sum_{n in N_i} e^{a.n/t}) )
    L_con = mean_i l_i

The paper prints the positives as coming from the online view; the momentum
view is meant (as in MoCo and the official code). When the momentum view has
no prediction of instance ``i``, its queries are its keys and the gradient
flows through both sides of those pairs, as in the official code.

``-log(e^p / (e^p + e^N))`` with ``N = logsumexp`` over the negatives is
``softplus(N - p)``, which is how it is computed here, without a loop over
instances: one similarity matrix of the queries against the bank of both
views gives the negatives *and* the positives with momentum keys (those are
its same-id entries in the momentum half), and the statistics for the log
come from the same pass. Above ``block_elements`` entries the matrix is
computed in row blocks whose activations are recomputed in the backward pass,
so peak memory stays bounded however many predictions a batch holds.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Above this many similarities (4 GiB in float32) the matrix is built in row blocks. Blocks cap the
# memory but cost time (each is computed again in the backward pass; benchmarks/contrastive_loss.py).
BLOCK_ELEMENTS = 1 << 30


class _MaskedSimilarities(torch.autograd.Function):
    """For queries ``q`` [B, D] (already divided by the temperature) and the detached
    ``bank`` [N, D]: the logits at the positive pairs ``(rows, cols)``, and per row the
    logsumexp and the maximum of the logits outside ``same`` [B, N] (-inf without any).

    Autograd through ``mm``, ``masked_fill`` and ``logsumexp`` would keep the matrix and
    then make three more of its size in the backward pass; here the forward pass turns
    the one [B, N] matrix into the softmax over the negatives in place, and the backward
    pass is one multiply and one product with the bank."""

    @staticmethod
    def forward(ctx, q, bank, same, rows, cols):
        q_dtype = q.dtype
        with torch.autocast(q.device.type, enabled=False):  # logits and their exp in float32 at least
            dtype = torch.promote_types(q.dtype, torch.float32)
            q, bank = q.to(dtype), bank.to(dtype)
            logits = q @ bank.t()                                   # [B, N]
            pos = logits[rows, cols]
            logits.masked_fill_(same, float("-inf"))
            if logits.shape[1]:
                max_neg = logits.max(dim=1).values
            else:
                max_neg = logits.new_full((logits.shape[0],), float("-inf"))
            shift = torch.where(torch.isfinite(max_neg), max_neg, torch.zeros_like(max_neg))
            probs = logits.sub_(shift[:, None]).exp_()              # in place; masked entries are exactly 0
            total = probs.sum(dim=1)
            lse = total.log() + shift                               # -inf for a row without negatives
            probs.div_(torch.where(total > 0, total, torch.ones_like(total))[:, None])
        ctx.save_for_backward(probs, bank, rows, cols)
        ctx.q_dtype = q_dtype
        ctx.mark_non_differentiable(max_neg)
        return lse, pos, max_neg

    @staticmethod
    def backward(ctx, grad_lse, grad_pos, _):
        probs, bank, rows, cols = ctx.saved_tensors
        grad = probs * grad_lse[:, None]
        grad.index_put_((rows, cols), grad_pos, accumulate=True)
        return (grad @ bank).to(ctx.q_dtype), None, None, None, None


def _row_block(q, q_ids, bank, bank_ids, num_queries):
    """Queries ``q`` [B, D] (over the temperature) against ``bank`` [Nq + Nk, D] (the
    detached queries, then the keys). Returns the positive logits with momentum keys and
    their row indices, and per row the logsumexp and the maximum over its negatives."""
    same = q_ids[:, None] == bank_ids[None, :]                  # [B, Nq + Nk]: not negatives
    rows, keys = (same[:, num_queries:] & (q_ids >= 0)[:, None]).nonzero(as_tuple=True)
    neg_lse, pos, max_neg = _MaskedSimilarities.apply(q, bank, same, rows, num_queries + keys)
    return pos, rows, neg_lse, max_neg


def box_contrastive(q, q_ids, k, k_ids, temperature=0.5, block_elements=BLOCK_ELEMENTS):
    """L_con (module docstring) and the statistics the log shows next to it, from one pass.

    ``q`` [Nq, D] online and ``k`` [Nk, D] momentum embeddings (normalised here) with int64
    instance ids, -1 = background. Gradient flows into ``q`` only. Returns ``(loss, stats)``:
    the loss is a scalar, exactly 0 (still attached to ``q``) when no online prediction has an
    instance; ``stats`` holds ``accuracy`` (the positive ranked above every negative, weighted
    like the loss), ``instances`` among the online predictions, ``matched_instances`` (also in
    the momentum view) and ``queries``, as floats."""
    q = F.normalize(q, dim=1)                                   # [Nq, D]
    k = F.normalize(k, dim=1).detach()                          # [Nk, D]
    num_queries = len(q)
    bank = torch.cat([q.detach(), k])                           # negatives come from both views
    bank_ids = torch.cat([q_ids, k_ids])

    q_t = q / temperature                                       # [Nq, D]: the temperature on D columns, not N
    rows_per_block = max(1, block_elements // max(len(bank), 1))
    parts = []
    for start in range(0, num_queries, rows_per_block):
        args = (q_t[start:start + rows_per_block], q_ids[start:start + rows_per_block], bank, bank_ids, num_queries)
        if rows_per_block < num_queries and q.requires_grad:    # recompute the block in backward
            part = checkpoint(_row_block, *args, use_reentrant=False)
        else:
            part = _row_block(*args)
        parts.append((part[0], part[1] + start, *part[2:]))
    if parts:
        pos_k, rows_k, neg_lse, max_neg = (torch.cat(t) for t in zip(*parts))
    else:
        pos_k = neg_lse = max_neg = q.new_zeros(0)
        rows_k = q_ids.new_zeros(0)

    # Instances the momentum view lacks: their queries are their keys, gradient on both sides.
    lacking = (q_ids >= 0) & ~torch.isin(q_ids, k_ids)
    idx = lacking.nonzero(as_tuple=True)[0]
    a, b = (q_ids[idx][:, None] == q_ids[idx][None, :]).nonzero(as_tuple=True)
    rows_self = idx[a]
    pos_self = (q_t[rows_self] * q[idx[b]]).sum(dim=1)

    pos, rows = torch.cat([pos_k, pos_self]), torch.cat([rows_k, rows_self])
    # Weight 1 / (|Q_i| |K_i| |I|): the mean over an instance's pairs, then over instances.
    ids, inverse, pairs_per_id = torch.unique(q_ids[rows], return_inverse=True, return_counts=True)
    weight = 1.0 / (pairs_per_id[inverse].to(pos.dtype) * max(len(ids), 1))
    neg_lse, max_neg = neg_lse[rows], max_neg[rows]
    loss = q.sum() * 0.0 if pos.numel() == 0 else (F.softplus(neg_lse - pos) * weight).sum()
    with torch.no_grad():
        hits = ((pos.detach() > max_neg).to(weight.dtype) * weight).sum()
        stats = {"accuracy": float(hits) if pos.numel() else 0.0, "instances": float(len(ids)),
                 "matched_instances": float(torch.isin(ids, k_ids).sum()),
                 "queries": float((q_ids >= 0).sum())}
    return loss, stats


def box_contrastive_loss(q, q_ids, k, k_ids, temperature=0.5, block_elements=BLOCK_ELEMENTS):
    """L_con alone (``box_contrastive``'s first output)."""
    return box_contrastive(q, q_ids, k, k_ids, temperature, block_elements)[0]


@torch.no_grad()
def box_contrastive_stats(q, q_ids, k, k_ids, temperature=0.5, block_elements=BLOCK_ELEMENTS):
    """The log's statistics alone (``box_contrastive``'s second output)."""
    return box_contrastive(q, q_ids, k, k_ids, temperature, block_elements)[1]
