"""Zero-shot multiple choice scored as lm-evaluation-harness scores it: every choice is a (context,
continuation) loglikelihood request; acc takes the choice with the highest summed log-prob, acc_norm the
highest log-prob per character of the choice. Task files and prompt formats are in tasks.py.

Requests whose choices share one context run the context once and reuse its KV cache for each
continuation (shared_context_loglikelihoods); the rest are batched, longest first (loglikelihoods).
Both give the numbers of scoring each context + continuation alone.
"""
import math
import time

import torch
import torch.nn.functional as F

import tasks as task_files
from machinery.errors import UserError


class Progress:
    """Prints `label: done/total unit, rate, time left` at most every `every` seconds, and once at the end."""

    def __init__(self, label, total, unit, every=10.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.t0 = self.last = time.perf_counter()

    def update(self, done, extra=""):
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"  {self.label}: {done:,}/{self.total:,} {self.unit}, {rate:,.2f}/s, "
              f"{now - self.t0:,.0f}s elapsed, {left:,.0f}s left{extra}", flush=True)


def encode_pair(tok, context, continuation, bos=False):
    """(context ids, continuation ids) split as lm-eval does: trailing spaces of the context move to the
    continuation, then continuation ids = encode(context + continuation) minus the first len(encode(context))."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, bos=bos)
    ctx = tok.encode(context, bos=bos)
    if not ctx or len(whole) <= len(ctx):
        raise UserError(f"cannot split {context[-40:]!r} + {continuation[:40]!r} into context and continuation tokens")
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=8, device="cpu", progress=None):
    """Summed log p(continuation | context) for (context ids, continuation ids) requests, several per forward.
    Sequences longer than the model's maximum keep their last tokens, as lm-eval does."""
    max_len = model.cfg.max_position_embeddings
    seqs = [(c + k)[-(max_len + 1):] for c, k in requests]
    # longest first: rows of a batch have similar lengths, and an out-of-memory shows up at once
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = [0.0] * len(seqs)
    for b in range(0, len(order), batch_size):
        rows = order[b:b + batch_size]
        x = torch.zeros(len(rows), len(seqs[rows[0]]) - 1, dtype=torch.long)  # (b, T), right-padded with 0
        for r, i in enumerate(rows):
            x[r, :len(seqs[i]) - 1] = torch.tensor(seqs[i][:-1])
        # causal attention: the padding after a row's end never reaches its real positions
        logits = model(x.to(device))  # (b, T, V)
        for r, i in enumerate(rows):
            n = len(seqs[i]) - 1
            k = min(len(requests[i][1]), n)  # a continuation longer than the model's maximum keeps its end
            logp = F.log_softmax(logits[r, n - k:n].float(), dim=-1)  # (k, V)
            target = torch.tensor(seqs[i][-k:], device=logp.device)
            out[i] = logp.gather(-1, target[:, None]).sum().item()
        if progress:
            progress.update(min(b + batch_size, len(order)))
    return out


@torch.no_grad()
def shared_context_loglikelihoods(model, ctx, conts, device="cpu"):
    """log p(continuation | ctx) for the continuations of one context: the context runs once and its KV cache
    serves every continuation (the numbers of scoring each ctx + continuation alone, for less work)."""
    n, K = len(conts), max(len(k) for k in conts)
    cache = model.make_cache(1, len(ctx) + K - 1)
    first = F.log_softmax(model(torch.tensor([ctx], device=device), cache=cache, last_only=True)[0, -1].float(), dim=-1)  # (V,)
    out = [first[k[0]].item() for k in conts]
    if K == 1:
        return out
    # one copy of the context's keys and values per continuation
    cache = cache.repeat_batch(n)
    x = torch.zeros(n, K - 1, dtype=torch.long)  # (n, K-1), right-padded with 0
    for j, k in enumerate(conts):
        x[j, :len(k) - 1] = torch.tensor(k[:-1])
    logits = model(x.to(device), cache=cache)  # (n, K-1, V)
    for j, k in enumerate(conts):
        logp = F.log_softmax(logits[j, :len(k) - 1].float(), dim=-1)  # (k-1, V)
        out[j] += logp.gather(-1, torch.tensor(k[1:], device=logp.device)[:, None]).sum().item()
    return out


def choice_loglikelihoods(model, reqs, batch_size=8, device="cpu", label="choices"):
    """Flat per-choice loglikelihoods of items given as lists of (context ids, continuation ids). When every item's
    choices share one context that fits the model, each context runs once; otherwise (WinoGrande) the
    requests run independently, `batch_size` per forward."""
    max_len = model.cfg.max_position_embeddings
    shared = all(len({tuple(c) for c, _ in r}) == 1 and len(r[0][0]) + max(len(k) for _, k in r) <= max_len
                 for r in reqs)
    if not shared:
        flat = [q for r in reqs for q in r]
        return loglikelihoods(model, flat, batch_size, device, Progress(label, len(flat), "choices"))
    prog, out = Progress(label, len(reqs), "items"), []
    for i, r in enumerate(reqs):
        out += shared_context_loglikelihoods(model, r[0][0], [k for _, k in r], device)
        prog.update(i + 1)
    return out


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)  # first maximum on ties, like numpy


def task_metrics(items, lls):
    """acc, acc_norm, n and acc's standard error from the flat list of per-choice loglikelihoods."""
    acc = acc_norm = pos = 0
    for it in items:
        ll = lls[pos:pos + len(it.continuations)]
        pos += len(it.continuations)
        acc += argmax(ll) == it.gold
        acc_norm += argmax([v / max(n, 1) for v, n in zip(ll, it.norm_lens)]) == it.gold
    n = len(items)
    p = acc / n
    return {"acc": p, "acc_norm": acc_norm / n, "n": n, "acc_stderr": math.sqrt(p * (1 - p) / max(n - 1, 1))}


def limit_items(items, limit, name):
    if limit is None:
        return items
    if limit > len(items):
        print(f"warning: --limit {limit:,} is larger than {name} ({len(items):,} items); scoring all {len(items):,}")
    return items[:limit]


def run_task(model, tok, name, data_dir, limit=None, bos=False, batch_size=8, device="cpu"):
    """lm-eval-style zero-shot scores of one task: {'acc', 'acc_norm', 'n', 'acc_stderr'}."""
    items, note = task_files.load_task(name, data_dir)
    if note:
        print(f"note: {note}")
    items = limit_items(items, limit, name)
    reqs = [[encode_pair(tok, c, k, bos) for c, k in zip(it.contexts, it.continuations)] for it in items]
    return task_metrics(items, choice_loglikelihoods(model, reqs, batch_size, device, name))
