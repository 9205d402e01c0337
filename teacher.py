"""The teacher: one dense pass over the calibration tokens, cached, and KL(teacher || student) from it.

The dense model (keep = 1) is run once under no_grad. We keep the hidden state at every layer
boundary, h[0] = embeddings ... h[L] = output of the last layer. The teacher's log-probabilities are not
stored: they are the final norm and head applied to h[L], recomputed one chunk of tokens at a time
wherever a KL needs them (a (tokens x vocab) fp32 table would be the largest thing in memory: 4 N T V
bytes, 0.8 GB for 16 x 256 tokens of a 49 k vocabulary, 134 GB for 128 x 2048 of a 128 k one).
Because the first changed layer of any student sees exactly the dense input, a student that removes
layers from `s` on only has to run layers s..L-1 from h[s]: the exhaustive oracle, the one-pass
baselines and the gate's neighbour check all use that, and the gate search uses the same batches.
"""
import time
from dataclasses import dataclass

import torch

import data
from machinery import placement
from model import follow


@dataclass
class Teacher:
    """The cached dense pass. Bytes: (L + 1) * N * T * C * bytes(weights' dtype) for `hidden`, on the layers'
    devices or in (pinned) CPU memory; nothing of size V."""
    tokens: torch.Tensor  # (N, T) calibration windows
    hidden: list  # L + 1 tensors (N, T, C): h[i] is the input of layer i, h[L] the last layer's output
    description: str = ""  # which text, how many windows of which length

    @property
    def num_tokens(self):
        return self.tokens.numel()

    @property
    def final(self):
        """h[L]: the teacher's log-probs are log_probs(model, h[L]), made per chunk when needed."""
        return self.hidden[-1]


@torch.no_grad()
def build_teacher(model, tokens, description="", batch=4, cache_device=None):
    """Run the dense model once, layer by layer, and cache every layer boundary (in the weights' dtype).

    Layers are the outer loop, so a streamed layer (placement.py --offload) is fetched once for all windows.
    `cache_device` "cpu" keeps the cache in CPU memory (pinned when the compute is on a GPU).
    """
    cos, sin = model.rope(0, tokens.shape[1])
    xs = [model.embed_tokens(chunk) for chunk in tokens.split(batch)]  # (b, T, C) each
    hidden = [keep_cached(torch.cat(xs), cache_device)]
    for i in range(model.cfg.num_layers):
        layer = placement.on_device(model, i)
        xs = [layer(follow(x, layer), cos, sin) for x in xs]
        hidden.append(keep_cached(torch.cat(xs), cache_device))
    return Teacher(tokens, hidden, description)


def make_teacher(model, tokenizer, calib, nsamples, seqlen, seed, cache_device=None):
    """Calibration windows and the cached dense pass over them."""
    tokens, _, desc = data.calibration_windows(tokenizer, calib, nsamples, seqlen, seed, model.cfg.vocab_size)
    t0 = time.perf_counter()
    teacher = build_teacher(model, tokens, desc, cache_device=cache_device)
    size = sum(h.numel() * h.element_size() for h in teacher.hidden)
    print(f"teacher: {teacher.num_tokens:,} calibration tokens ({desc}), dense pass {time.perf_counter() - t0:.1f} s, "
          f"cache {size / 2**20:,.0f} MiB on {teacher.hidden[0].device}")
    return teacher


def keep_cached(h, cache_device):
    if cache_device is None or h.device == torch.device(cache_device):
        return h
    out = h.to(cache_device)
    return out.pin_memory() if h.device.type == "cuda" else out


def log_probs(model, h):
    """Final norm, head, log-softmax in fp32: (..., C) -> (..., V)."""
    h = h.to(model.norm.weight.device)  # states kept elsewhere (--cache-on-cpu, another GPU) meet the head here
    return model.lm_head(model.norm(h)).float().log_softmax(-1)


def token_kl(model, h, teacher_logp):
    """KL(p_teacher || p_student) per token from the student's final hidden state h (n, C)."""
    logq = log_probs(model, h)  # (n, V), on the device of the student's head
    teacher_logp = teacher_logp.to(logq.device)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(-1)  # (n,)


def chunk_kl(model, h, teacher_top, th):
    """Per-token KL of one chunk: the teacher's log-probs from its final states th through its own norm and head."""
    with torch.no_grad():
        tl = log_probs(teacher_top, th)  # (chunk, V)
    return token_kl(model, h, tl)


def run_layers(model, x, first, keep=None, removed=()):
    """Layers first..L-1 from hidden state x: skipping `removed`, and weighting each by keep[i] if given.

    The gate is the decoder loop of model.py: x = x + keep[i] * (layer(x) - x).
    """
    cos, sin = model.rope(0, x.shape[1])
    for i in range(first, model.cfg.num_layers):
        if i in removed:
            continue
        layer = model.layers[i]
        x = follow(x, layer)
        if keep is None:
            x = layer(x, cos, sin)
        else:
            x = x + keep[i].to(x) * (layer(x, cos, sin) - x)
    return x


def run_windows(model, xs, start, stop=None, removed=()):
    """Layers start..stop-1 (default: to the last) over the batches of hidden states `xs`, skipping `removed`.
    Layers are the outer loop, so a streamed layer (--offload) is fetched once for all the batches."""
    cos, sin = model.rope(0, xs[0].shape[1])
    for i in range(start, model.cfg.num_layers if stop is None else stop):
        if i not in removed:
            layer = placement.on_device(model, i)
            xs = [layer(follow(x, layer), cos, sin) for x in xs]
    return list(xs)


@torch.no_grad()
def kl_sum(model, h, teacher_h, chunk, teacher_top=None):
    """Sum of per-token KL over h (..., C) against the teacher's final states teacher_h, `chunk` tokens at a
    time, so only chunk x V logits live at once. `teacher_top`: the teacher without its layers, whose final norm
    and output head make its logits (default: the model's own, when the teacher is the same weights)."""
    h, th = h.reshape(-1, h.shape[-1]), teacher_h.reshape(-1, teacher_h.shape[-1])
    return sum(float(chunk_kl(model, h[j: j + chunk], teacher_top or model, th[j: j + chunk]).sum())
               for j in range(0, len(h), chunk))


def kl_backward(model, h, teacher_h, chunk, teacher_top=None):
    """Mean KL over the tokens of h, and its gradient sent back through h, one chunk of tokens at a time.

    h is cut from the graph; each chunk's loss is back-propagated into that detached copy, and the summed
    gradient then goes through the layers once: memory holds one chunk's (tokens, V) logits (student and
    teacher), not all of them.
    """
    hd = h.detach().reshape(-1, h.shape[-1]).requires_grad_()
    th = teacher_h.reshape(-1, teacher_h.shape[-1])
    n, total = len(hd), 0.0
    for j in range(0, n, chunk):
        loss = chunk_kl(model, hd[j: j + chunk], teacher_top or model, th[j: j + chunk]).sum() / n
        loss.backward()
        total += float(loss.detach())
    h.backward(hd.grad.view_as(h))
    return total


@torch.no_grad()
def removed_kl(model, teacher, removed, batch=4, chunk=1024):
    """Mean calibration KL of the model with the layers in `removed` skipped (keep = 0 there).

    Layers are the outer loop (all windows through one layer, then the next), so a streamed layer is
    fetched once per block scored; the windows' states in flight take as much memory as one cached h[i].
    """
    first = min(removed)
    xs = run_windows(model, teacher.hidden[first].split(batch), first, removed=set(removed))
    total = sum(kl_sum(model, x, th, chunk) for x, th in zip(xs, teacher.final.split(batch)))
    return total / teacher.num_tokens


def eta(t0, done, total, unit="it"):
    """'12.3 s/it, 1:05 left' for a loop that has done `done` of `total` units of work since t0."""
    per = (time.perf_counter() - t0) / max(done, 1)
    left = per * (total - done)
    return f"{per:.1f} s/{unit}, {int(left // 60)}:{int(left % 60):02d} left"
