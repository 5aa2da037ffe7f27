"""ssd_scan's "torch" path: what CPU tensors run without the Triton interpreter (CPU training).

The oracle (`refrag_kernels.reference.ssd_scan`) walks every sequence and, in doc_mode, every
document run in Python, each run its own chunked scan that passes the state chunk by chunk: a
packed demo row (3 examples, 6 documents) is ~15 runs and ~50 chunk steps per layer, so a CPU
training step spends half its time in that bookkeeping. Here every chunk of every run is one
batch, and the two sequential recurrences become masked matrix products:

1. Runs (maximal spans of one doc id inside one sequence; in plain mode whole sequences) are
   padded to a multiple of the chunk size and cut into chunks: ``(nc, Q, ...)`` for all runs.
2. Inside each chunk, as the oracle: the quadratic term and the chunk's state from zero.
3. Chunks of a run: the state entering chunk c from zero at the run start is
   ``sum_{j<c} exp(sum_{j<k<c} a_k) u_j`` (a_k the chunk's log-decay <= 0, u_j its state).
   The exponent is a sum of same-sign terms built with a masked cumsum (no difference of two
   long prefix sums, so no cancellation), then one einsum over an (nc, nc) weight matrix.
4. Runs of a sequence: the carried state obeys the same recurrence over runs (a document
   run advances it exactly like a shared run: ``exp(L) carried + final_from_zero``), so the
   same masked product gives every run's carried state at its start. A shared run starts
   from it; a document run starts from its block's entry state (the carried state where the
   retrieval block begins).
5. Each chunk's entering state = its run's start state decayed + step 3's state; the output
   term reads it as in the oracle. D, z and padding as in the oracle.

Rows that are whole sequences without documents (no cu_seqlens, no doc_mode: a cache's
decode-time continuation, documents encoded as rows) skip steps 1, 3 and 4: their chunks are a
reshape and the state passes chunk to chunk in a loop over a row's few chunks, a row shorter
than the chunk size being one chunk (a 15-token continuation: a few dozen ops, not ~150).

The run/chunk index tables are built on the host from cu_seqlens and the doc ids (this path
only runs on CPU tensors, where reading them costs nothing). Autograd gives the gradients.
"""
from __future__ import annotations

import math

import torch

from refrag_kernels import reference


def _runs(cu: list[int], docs: list[int] | None) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """([(start, end, sequence, index of the run whose start state this run reads)], last run of each
    sequence or -1). A document run reads the state where its retrieval block began."""
    runs, last = [], []
    for seq, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        prev_doc, entry = 0, -1
        for rs, re_, doc in reference.segments(docs, s, e):
            if doc and prev_doc == 0:
                entry = len(runs)
            runs.append((rs, re_, seq, entry if doc else len(runs)))
            prev_doc = doc
        last.append(len(runs) - 1 if e > s else -1)
    return runs, last


def _before_in_group(group: torch.Tensor) -> torch.Tensor:
    """(m, m) bool: [i, j] is True when j < i and both are in the same group (group (m,) int,
    equal values contiguous)."""
    idx = torch.arange(group.shape[0], device=group.device)
    return (idx[:, None] > idx[None, :]) & (group[:, None] == group[None, :])


def _exclusive_decay(log_decay: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """(m, m, h) exp(sum_{j<k<i} log_decay[k]) where `before` (`_before_in_group`) holds, else 0.

    log_decay (m, h) <= 0. The sums add terms of one sign (a masked cumsum), so they are as
    exact as the terms."""
    idx = torch.arange(log_decay.shape[0], device=log_decay.device)
    above = (idx[:, None] > idx[None, :])[:, :, None]  # [k, j]: k > j
    partial = torch.where(above, log_decay[:, None, :], 0.0).cumsum(0)  # [i, j] = sum_{j<k<=i}
    exponent = torch.cat([torch.zeros_like(partial[:1]), partial[:-1]])  # [i, j] = sum_{j<k<i}
    keep = before[:, :, None]
    return torch.where(keep, torch.exp(torch.where(keep, exponent, 0.0)), 0.0)


def _chunk_terms(xc, dtc, A, Bc, Cc):
    """What each chunk computes from a zero entering state, as the oracle: chunks xc (c, Q, h, p),
    dtc (c, Q, h), Bc, Cc (c, Q, h, n) -> cs (c, Q, h) the log-decay from the chunk start,
    y_diag (c, Q, h, p) the quadratic (intra-chunk) output, u (c, h, p, n) the chunk's final state."""
    Q = xc.shape[1]
    cs = (dtc * A).cumsum(1)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=xc.device).tril()
    seg = (cs[:, :, None, :] - cs[:, None, :, :]).masked_fill(~causal[None, :, :, None], -math.inf)
    scores = torch.einsum("cthn,cshn->ctsh", Cc, Bc) * torch.exp(seg)
    y_diag = torch.einsum("ctsh,csh,cshp->cthp", scores, dtc, xc)
    u = torch.einsum("cshn,csh,cshp->chpn", Bc, torch.exp(cs[:, -1:, :] - cs) * dtc, xc)
    return cs, y_diag, u


def _state_term(Cc, entering, cs):
    """The output each chunk token reads from the chunk's entering state (c, h, p, n) -> (c, Q, h, p)."""
    return torch.einsum("cthn,chpn,cth->cthp", Cc, entering, torch.exp(cs))


def _rows_scan(x, dt, A, B, C, init, chunk_size):
    """Every row one sequence, no documents (the decode-time continuations of a cache, documents
    encoded as rows): the rows' chunks are a reshape, and the state passes chunk to chunk in a
    loop over a row's few chunks. A row shorter than the chunk size is one chunk of its length.
    x (b, l, h, p) ... in the compute dtype, init (b, h, p, n) -> y (b, l, h, p), final (b, h, p, n)."""
    b, l, h, p = x.shape
    Q = min(chunk_size, l)
    nc = -(-l // Q)
    pad = nc * Q - l  # zero-dt padding steps are identities
    if pad:
        x, dt, B, C = (torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    xc, dtc, Bc, Cc = (t.reshape(b * nc, Q, *t.shape[2:]) for t in (x, dt, B, C))
    cs, y_diag, u = _chunk_terms(xc, dtc, A, Bc, Cc)
    if nc == 1:  # one chunk per row (a short continuation): it enters with the initial state
        entering, state = init, torch.exp(cs[:, -1])[:, :, None, None] * init + u
    else:
        decay = torch.exp(cs[:, -1]).reshape(b, nc, h)[:, :, :, None, None]
        u = u.reshape(b, nc, h, p, -1)
        state, entering = init, []
        for c in range(nc):
            entering.append(state)
            state = decay[:, c] * state + u[:, c]
        entering = torch.stack(entering, 1).reshape(b * nc, h, p, -1)
    y = y_diag + _state_term(Cc, entering, cs)
    return (y.reshape(b, nc * Q, h, p)[:, :l] if pad else y.reshape(b, l, h, p)), state


def ssd_scan(x, dt, A, B, C, *, chunk_size=64, D=None, z=None, dt_bias=None, dt_softplus=False,
             initial_states=None, cu_seqlens=None, doc_ids=None, doc_mode=False, return_final_states=False):
    """`refrag_kernels.reference.ssd_scan` (same signature and results up to rounding), vectorised."""
    out_dtype = x.dtype
    x, dt, A, B, C, D, z = reference._ssd_inputs(x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    b, l, h, p = x.shape
    n = B.shape[-1]
    cdt, device = x.dtype, x.device
    varlen = cu_seqlens is not None
    cu = cu_seqlens.tolist() if varlen else [r * l for r in range(b + 1)]  # rows are sequences
    docs = doc_ids.reshape(-1).tolist() if (doc_mode and doc_ids is not None) else None
    runs, last_run = _runs(cu, docs)
    n_seqs = len(cu) - 1
    if initial_states is None:
        init = torch.zeros(n_seqs, h, p, n, dtype=cdt, device=device)
    else:
        init = initial_states.to(cdt)

    if not varlen and docs is None and l > 0:
        y, after = _rows_scan(x, dt, A, B, C, init, chunk_size)
        y = reference._ssd_output(y, x, D, z, out_dtype, None)
        if not return_final_states:
            return y
        return y, after.float() if cdt != torch.float64 else after
    flat = [t.reshape(b * l, *t.shape[2:]) for t in (x, dt, B, C)]
    y_tokens = torch.zeros(b * l, h, p, dtype=cdt, device=device)
    if runs:
        Q = chunk_size
        # padded slots of every run's chunks -> token index (b * l = a zero row: dt 0, an identity step)
        slots, chunk_run, last_chunk = [], [], []
        for r, (s, e, _, _) in enumerate(runs):
            count = -(-(e - s) // Q)
            chunk_run += [r] * count
            last_chunk.append(len(chunk_run) - 1)
            slots += list(range(s, e)) + [b * l] * (count * Q - (e - s))
        nc = len(chunk_run)
        slot_index = torch.tensor(slots, device=device)
        xc, dtc, Bc, Cc = (torch.cat([t, t.new_zeros(1, *t.shape[1:])])[slot_index].reshape(nc, Q, *t.shape[1:])
                           for t in flat)
        # 2. inside each chunk (as the oracle)
        cs, y_diag, u = _chunk_terms(xc, dtc, A, Bc, Cc)
        a = cs[:, -1]  # (nc, h)
        # 3. chunks of a run, from zero at the run start
        run_of_chunk = torch.tensor(chunk_run, device=device)
        same_run_before = _before_in_group(run_of_chunk)
        from_zero = torch.einsum("cjh,jhpn->chpn", _exclusive_decay(a, same_run_before), u)
        to_chunk = torch.einsum("cj,jh->ch", same_run_before.to(cdt), a)  # log-decay run start -> chunk start
        # 4. runs of a sequence: the carried state at each run's start
        lastc = torch.tensor(last_chunk, device=device)
        run_final = torch.exp(a[lastc])[:, :, None, None] * from_zero[lastc] + u[lastc]  # (nr, h, p, n)
        run_decay = to_chunk[lastc] + a[lastc]  # (nr, h)
        seq_of_run = torch.tensor([r[2] for r in runs], device=device)
        same_seq_before = _before_in_group(seq_of_run)
        to_run = torch.einsum("rj,jh->rh", same_seq_before.to(cdt), run_decay)
        carried = (torch.einsum("rjh,jhpn->rhpn", _exclusive_decay(run_decay, same_seq_before), run_final)
                   + torch.exp(to_run)[:, :, None, None] * init[seq_of_run])
        start = carried[torch.tensor([r[3] for r in runs], device=device)]  # documents: the block's entry
        # 5. every chunk's entering state, the output term, back to token order
        entering = from_zero + torch.exp(to_chunk)[:, :, None, None] * start[run_of_chunk]
        y_slots = (y_diag + _state_term(Cc, entering, cs)).reshape(nc * Q, h, p)
        real = slot_index < b * l
        y_tokens = y_tokens.index_put((slot_index[real],), y_slots[real])
        after = torch.exp(run_decay)[:, :, None, None] * carried + run_final
    y = y_tokens.reshape(b, l, h, p)
    y = reference._ssd_output(y, x, D, z, out_dtype, reference.live_tokens(cu_seqlens, b, l, device))
    if not return_final_states:
        return y
    finals = torch.stack([after[r] if r >= 0 else init[seq] for seq, r in enumerate(last_run)])
    return y, finals.float() if cdt != torch.float64 else finals
