"""The teacher: one dense pass over the calibration tokens, cached, and KL(teacher || student) from it.

The dense model (keep = 1) is run once under no_grad. We keep the hidden state at every layer
boundary, h[0] = embeddings ... h[L] = output of the last layer, and the teacher's log-probabilities.
Because the first changed layer of any student sees exactly the dense input, a student that removes
layers from `s` on only has to run layers s..L-1 from h[s]: the exhaustive oracle, the one-pass
baselines and the gate's neighbour check all use that, and the gate search uses the same batches.
"""
import time
from dataclasses import dataclass

import torch

import data


@dataclass
class Teacher:
    tokens: torch.Tensor  # (N, T) calibration windows
    hidden: list  # L + 1 tensors (N, T, C): h[i] is the input of layer i, h[L] the last layer's output
    logp: torch.Tensor  # (N, T, V) teacher log-probabilities, fp32
    description: str = ""  # which text, how many windows of which length

    @property
    def num_tokens(self):
        return self.tokens.numel()


def calibration_tokens(tokenizer, source, nsamples, seqlen, seed, vocab_size):
    """(tokens (nsamples, seqlen), description): windows of `source` text, or random ids without a tokenizer."""
    if tokenizer is None:
        print("note: this checkpoint has no tokenizer: calibrating on uniformly random token ids")
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (nsamples, seqlen), generator=g), f"random ids {nsamples}x{seqlen}"
    text, desc = data.load_text(source, split="valid")
    ids = tokenizer.encode(text, bos=False)
    tokens = data.calibration_batch(ids, nsamples, seqlen, seed=seed)
    return tokens, f"{desc}, {nsamples} random windows x {seqlen} tokens (seed {seed}, of {len(ids):,})"


@torch.no_grad()
def build_teacher(model, tokens, description="", batch=4):
    """Run the dense model once; cache every layer boundary and the teacher log-probs."""
    cos, sin = model.rope(0, tokens.shape[1])
    hidden = [[] for _ in range(model.cfg.num_layers + 1)]
    logp = []
    for chunk in tokens.split(batch):
        x = model.embed_tokens(chunk)  # (b, T, C)
        hidden[0].append(x)
        for i, layer in enumerate(model.layers):
            x = layer(x, cos, sin)
            hidden[i + 1].append(x)
        logp.append(log_probs(model, x))
    return Teacher(tokens, [torch.cat(h) for h in hidden], torch.cat(logp), description)


def log_probs(model, h):
    """Final norm, head, log-softmax in fp32: (..., C) -> (..., V)."""
    return model.lm_head(model.norm(h)).float().log_softmax(-1)


def token_kl(model, h, teacher_logp):
    """KL(p_teacher || p_student) per token from the student's final hidden state h (n, C)."""
    logq = log_probs(model, h)  # (n, V)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)  # (n,)


def run_layers(model, x, first, keep=None, removed=()):
    """Layers first..L-1 from hidden state x: skipping `removed`, and weighting each by keep[i] if given.

    The gate is the decoder loop of model.py: x = x + keep[i] * (layer(x) - x).
    """
    cos, sin = model.rope(0, x.shape[1])
    for i in range(first, model.cfg.num_layers):
        if i in removed:
            continue
        if keep is None:
            x = model.layers[i](x, cos, sin)
        else:
            x = x + keep[i].to(x.dtype) * (model.layers[i](x, cos, sin) - x)
    return x


@torch.no_grad()
def kl_sum(model, h, teacher_logp, chunk):
    """Sum of per-token KL over h (..., C), `chunk` tokens at a time so only chunk x V logits live at once."""
    h, tl = h.reshape(-1, h.shape[-1]), teacher_logp.reshape(-1, teacher_logp.shape[-1])
    return sum(float(token_kl(model, h[j: j + chunk], tl[j: j + chunk]).sum()) for j in range(0, len(h), chunk))


def kl_backward(model, h, teacher_logp, chunk):
    """Mean KL over the tokens of h, and its gradient sent back through h, one chunk of tokens at a time.

    h is cut from the graph; each chunk's loss is back-propagated into that detached copy, and the summed
    gradient then goes through the layers once: memory holds one chunk's (tokens, V) logits, not all.
    """
    hd = h.detach().reshape(-1, h.shape[-1]).requires_grad_()
    tl = teacher_logp.reshape(-1, teacher_logp.shape[-1])
    n, total = len(hd), 0.0
    for j in range(0, n, chunk):
        loss = token_kl(model, hd[j: j + chunk], tl[j: j + chunk]).sum() / n
        loss.backward()
        total += float(loss.detach())
    h.backward(hd.grad.view_as(h))
    return total


@torch.no_grad()
def removed_kl(model, teacher, removed, batch=4, chunk=1024):
    """Mean calibration KL of the model with the layers in `removed` skipped (keep = 0 there)."""
    removed = set(removed)
    first = min(removed)
    total = 0.0
    for j in range(0, len(teacher.tokens), batch):
        x = run_layers(model, teacher.hidden[first][j: j + batch], first, removed=removed)
        total += kl_sum(model, x, teacher.logp[j: j + batch], chunk)
    return total / teacher.num_tokens


def eta(t0, done, total, unit="it"):
    """'12.3 s/it, 1:05 left' for a loop that has done `done` of `total` units of work since t0."""
    per = (time.perf_counter() - t0) / max(done, 1)
    left = per * (total - done)
    return f"{per:.1f} s/{unit}, {int(left // 60)}:{int(left % 60):02d} left"
