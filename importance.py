"""Layer importance by calibration perplexity and by first-order Taylor: SLEB and Shortened-LLaMA.

Both score single layers (not blocks) on the cached calibration windows of teacher.py, and both may
remove layers that are far apart: k removed layers can leave up to k cuts.

- SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
  Transformer Blocks", Algorithm 1): remove one layer at a time; at each step, try every remaining layer,
  and remove the one whose removal gives the lowest calibration perplexity of the model pruned so far.
  Re-scoring after each removal is what separates it from one-shot importance.
- Shortened-LLaMA PPL (Kim et al. 2024, "Shortened LLaMA: Depth Pruning for LLMs"): remove each layer
  alone from the dense model, score the calibration perplexity; the k layers with the lowest are removed.
  This is SLEB's first step, taken k layers at once.
- Shortened-LLaMA Taylor (same paper): I_n = sum over the weights W of layer n of |dL/dW * W| (element-wise,
  first-order Taylor estimate of the loss change when W is zeroed), L the next-token cross-entropy of the
  dense model on the calibration windows; the k layers with the lowest I_n are removed. (The paper's
  "+" variants also keep the first and last few layers by hand; we do not.) Not KL: the KL of the dense
  model to itself has zero gradient.
Perplexity is the next-token perplexity of the calibration windows themselves; ranking by it is ranking
by mean NLL, which is what we store.
"""
import time

import torch

from teacher import eta, log_probs, run_layers


def nll_sum(model, h, tokens):
    """Summed next-token NLL of windows `tokens` (b, T) from final hidden states h (b, T, C), one window at a time."""
    total = 0.0
    for x, t in zip(h, tokens):
        logp = log_probs(model, x[:-1])  # (T-1, V)
        total -= float(logp.gather(-1, t[1:, None].to(logp.device)).sum())
    return total


@torch.no_grad()
def single_removal_nll(model, teacher, removed=(), batch=4, quiet=True):
    """Mean calibration NLL of the model without `removed`, for each further layer i removed alone: {i: nll}.

    One streaming pass per batch of windows: x walks up the pruned model; at each remaining layer i the
    branch that skips i runs to the top, then x goes through layer i and on.
    """
    L, removed = model.cfg.num_layers, set(removed)
    todo = [i for i in range(L) if i not in removed]
    nll, t0 = dict.fromkeys(todo, 0.0), time.perf_counter()
    cos, sin = model.rope(0, teacher.tokens.shape[1])
    for j in range(0, len(teacher.tokens), batch):
        tokens, x = teacher.tokens[j: j + batch], teacher.hidden[0][j: j + batch]
        for i in todo:
            h = run_layers(model, x, i + 1, removed=removed)
            nll[i] += nll_sum(model, h, tokens)
            x = model.layers[i](x, cos, sin)
        if not quiet:
            print(f"  scored {len(todo)} layers on windows {j + 1}-{j + len(tokens)}  "
                  f"({eta(t0, j + len(tokens), len(teacher.tokens), 'window')})", flush=True)
    n = teacher.tokens.shape[0] * (teacher.tokens.shape[1] - 1)
    return {i: v / n for i, v in nll.items()}


def shortened_ppl(model, teacher, k):
    """Shortened-LLaMA PPL: (removed layers, {layer: calibration NLL with it removed alone})."""
    nll = single_removal_nll(model, teacher)
    return sorted(sorted(nll, key=nll.get)[:k]), nll


def sleb(model, teacher, k, start=(), quiet=False):
    """SLEB: (removed layers in the order removed, NLL after each removal). `start` resumes a stored order."""
    order, trace = list(start), []
    while len(order) < k:
        t0 = time.perf_counter()
        nll = single_removal_nll(model, teacher, order)
        best = min(nll, key=nll.get)
        order.append(best)
        trace.append(nll[best])
        if not quiet:
            print(f"  SLEB step {len(order)}/{k}: remove layer {best} (calibration ppl {torch.tensor(nll[best]).exp():.3f}, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
    return order, trace


def taylor_importance(model, teacher, batch=1):
    """Shortened-LLaMA Taylor: I_n = sum_W |dL/dW * W| over layer n's weights, L the mean calibration NLL."""
    params = list(model.layers.parameters())
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    n = teacher.tokens.shape[0] * (teacher.tokens.shape[1] - 1)
    try:
        for j in range(0, len(teacher.tokens), batch):
            tokens = teacher.tokens[j: j + batch]
            h = run_layers(model, teacher.hidden[0][j: j + batch], 0)
            logp = log_probs(model, h[:, :-1])  # (b, T-1, V)
            # gradients of the mean over all windows accumulate batch by batch
            (-logp.gather(-1, tokens[:, 1:, None].to(logp.device)).sum() / n).backward()
        return [float(sum((p.grad * p.detach()).abs().sum() for p in layer.parameters())) for layer in model.layers]
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def lowest(scores, k):
    """The k layers with the lowest score, sorted."""
    return sorted(sorted(range(len(scores)), key=lambda i: scores[i])[:k])
