"""Bytes per device and layer passes of each task, from a Config alone: the formulas behind plan.py.

Symbols: L layers, C hidden size, F mlp width, V vocab, N calibration windows of T tokens, b bytes per weight
element (4 fp32, 2 bf16/fp16), n tokens per KL chunk. The formulas model what this code does, phase by phase:
a device holds its resident bytes (weights, caches, optimizer state) plus the largest transient of any phase
(the teacher pass, a gate or tuning step, the discrete read-off), plus a fixed runtime overhead.

Placement (our assumption, which --devices follows): contiguous slices of layers, balanced by weight bytes,
embeddings on the first device, final norm + head on the last (a tied head is counted on both); the teacher
cache h[i] lives with layer i. --offload keeps the weights in the memory-mapped checkpoint on the CPU and
holds two layers on the device (the one computing and room for the next: an upper bound) plus norm + head,
and the backward recomputes each layer's forward from its saved input. The teacher cache stays on the
computing devices unless --cache-on-cpu puts it in host memory.
"""
from dataclasses import dataclass, field

from gates import start_steps

GiB = 2**30
RUNTIME = {"cpu": 0.35 * GiB, "cuda": 0.6 * GiB}  # torch + our modules in RSS; CUDA context + allocator slack
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
COLUMNS = ["weights", "teacher_cache", "activations", "kl_chunk", "optimizer", "hessians"]


# ---------------------------------------------------------------- per-model sizes

def layer_params(cfg):
    """Parameters of one decoder layer: q,k,v,o + gate,up,down + two norms (+ q/k/v biases, q/k norms)."""
    C, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    n = 2 * C * q + 2 * C * kv + 3 * C * F + 2 * C
    n += (q + 2 * kv) if cfg.attention_bias else 0
    return n + (2 * cfg.head_dim if cfg.qk_norm else 0)


def activation_bytes(cfg, b, tokens):
    """Tensors autograd saves for one layer's backward, measured on our Block: tokens * (b (4C + 2F) + 6C);
    the 6C are the RMSNorms' fp32 copies. Includes the gate's residual x + keep * (layer(x) - x)."""
    return tokens * (b * (4 * cfg.hidden_size + 2 * cfg.intermediate_size) + 6 * cfg.hidden_size)


def forward_bytes(cfg, b, tokens):
    """Transient of one layer's forward without autograd: the F-wide MLP temporaries and q,k,v,attention out:
    tokens * b (3F + 4C)."""
    return tokens * b * (3 * cfg.intermediate_size + 4 * cfg.hidden_size)


def kl_bytes(cfg, b, n, grad):
    """One KL chunk of n tokens: the student's logits (n V b) and its fp32 log-softmax, the teacher's
    probabilities, their difference and product (4 fp32 n x V), 2 more for the backward; plus the teacher's
    own logits and log-softmax (n V (b + 4)): its head is applied per chunk to the cached last hidden state."""
    V = cfg.vocab_size
    return n * V * (b + 4 * (6 if grad else 4)) + n * V * (b + 4)


# ---------------------------------------------------------------- placement

def slices(cfg, n_devices):
    """Contiguous layer ranges, one per device of equal memory: placement.split_layers, the rule the runtime
    uses (balanced by weight bytes, the embedding on the first device, norm + head on the last)."""
    from machinery import placement
    head = cfg.vocab_size * cfg.hidden_size
    where = placement.split_layers(cfg.num_layers, layer_params(cfg), head, head + cfg.hidden_size, [1] * n_devices)
    return [range(where.index(d), len(where) - where[::-1].index(d)) if d in where else range(0)
            for d in range(n_devices)]


@dataclass
class Row:
    device: str
    capacity: float | None  # bytes available; None: not checked (planning another machine's host memory)
    resident: dict = field(default_factory=lambda: dict.fromkeys(COLUMNS, 0))
    transient: dict = field(default_factory=dict)  # phase -> {column: bytes} on top of the resident ones
    runtime: float = 0

    @property
    def phase(self):
        """The phase with the largest transient: the one that sets the peak."""
        return max(self.transient, key=lambda ph: sum(self.transient[ph].values()), default=None)

    @property
    def parts(self):
        """Bytes per column at the peak: resident plus the peak phase's transient."""
        peak = self.transient.get(self.phase, {})
        return {c: self.resident[c] + peak.get(c, 0) for c in COLUMNS}

    @property
    def peak(self):
        return self.runtime + sum(self.parts.values())

    @property
    def fits(self):
        return self.capacity is None or self.peak <= self.capacity


@dataclass
class Plan:
    task: str
    rows: list
    forward: int  # layer forward passes, one layer over one calibration window
    backward: int
    notes: list
    bytes_per_weight: int = 0

    @property
    def fits(self):
        return all(r.fits for r in self.rows)


def make_rows(devices, capacity, offload):
    """One row per device, plus a CPU row for the host when the devices are GPUs."""
    rows = [Row(d, capacity(d), runtime=RUNTIME["cpu" if d == "cpu" else "cuda"]) for d in devices]
    if "cpu" not in devices:
        rows.append(Row("cpu", capacity("cpu"), runtime=RUNTIME["cpu"]))
    return rows


def add(row, part, nbytes, phase=None):
    """Count bytes as resident (phase None) or as one phase's transient, and under a column for the table."""
    into = row.resident if phase is None else row.transient.setdefault(phase, dict.fromkeys(COLUMNS, 0))
    into[part] += nbytes


def place_model(rows, cfg, b, devices, offload, layers=None):
    """Weights by the placement rule; returns the layer range of each device row (offload: all on row 0)."""
    L, per, head = cfg.num_layers if layers is None else layers, layer_params(cfg), cfg.vocab_size * cfg.hidden_size
    n_head = 1 if cfg.tie_word_embeddings else 2
    if offload:
        # weights stay in the mmapped file; the device holds the computing layer, the prefetched one, norm + head
        add(rows[0], "weights", b * (2 * per + head + cfg.hidden_size))
        return [range(L)] + [range(0)] * (len(devices) - 1)
    parts = slices(cfg, len(devices)) if layers is None else [range(L)]
    for j, r in enumerate(parts):
        add(rows[j], "weights", b * per * len(r))
    add(rows[0], "weights", b * head)
    if n_head == 2 or len(devices) > 1:
        add(rows[len(devices) - 1], "weights", b * (head + cfg.hidden_size))
    return parts


def place_cache(rows, parts, devices, on_host, per_boundary):
    """Teacher cache: boundary h[i] beside layer i, h[L] on the last device; all in host memory when `on_host`."""
    if on_host:
        add(rows[-1], "teacher_cache", (sum(len(r) for r in parts) + 1) * per_boundary)
        return
    last = len(devices) - 1
    for j, r in enumerate(parts):
        add(rows[j], "teacher_cache", per_boundary * (len(r) + (j == last)))


def gate_activations(rows, parts, cfg, b, tokens, offload, phase="step"):
    """Activations of a backward through every layer (the gated span can start at layer 0 while tau is large).
    --offload saves only each layer's input (tokens C b per layer) and recomputes one layer at a time."""
    if offload:
        add(rows[0], "activations", cfg.num_layers * tokens * cfg.hidden_size * b + activation_bytes(cfg, b, tokens), phase)
        return
    for j, r in enumerate(parts):
        add(rows[j], "activations", activation_bytes(cfg, b, tokens) * len(r), phase)


def plan_search(cfg, b, devices, capacity, offload, nsamples, seqlen, k, gate=True, batch_size=1, chunk=1024,
                steps=30, starts=4, halving=True, radius=1, method="clp", cache_on_cpu=False):
    """Gate search (gate=True) or a baseline (gate=False) on a cached teacher.

    Teacher cache: (L+1) N T C b for the hidden states at the layer boundaries (the teacher's log-probs are
    not cached: its head runs per KL chunk on the last hidden state). Its pass holds, besides, one boundary's
    pieces and their concatenation (2 N T C b). A gate step: the activations of every layer for batch_size T
    tokens and one KL chunk with gradients. Read-off: 4 windows through the layers without gradients and a KL
    chunk without gradients."""
    N, T, L, C = nsamples, seqlen, cfg.num_layers, cfg.hidden_size
    rows = make_rows(devices, capacity, offload)
    parts = place_model(rows, cfg, b, devices, offload)
    hd = rows[0] if offload else rows[len(devices) - 1]  # where the norm and head compute
    place_cache(rows, parts, devices, cache_on_cpu, N * T * C * b)
    for j in range(len(devices)):
        add(rows[j], "activations", forward_bytes(cfg, b, 4 * T), "teacher")
        add(rows[j], "teacher_cache", 2 * N * T * C * b, "teacher")
    if gate:
        gate_activations(rows, parts, cfg, b, batch_size * T, offload)
        add(hd, "kl_chunk", kl_bytes(cfg, b, min(chunk, batch_size * T), True), "step")
    # read-off / scoring: no-grad forwards of 4 windows and a KL chunk without gradients
    add(hd, "kl_chunk", kl_bytes(cfg, b, min(chunk, 4 * T), False), "score")
    add(hd, "activations", 4 * T * C * b + forward_bytes(cfg, b, 4 * T), "score")
    forward, backward = L * N, 0
    if gate:
        work = start_steps(starts, steps, halving)[-1] * batch_size if steps > 0 else 0
        forward += work * L * (2 if offload else 1)
        backward += work * L
        forward += 3 * (2 * radius + 1) * (L - k) // 2 * N
    elif method == "exhaustive":
        forward += N * (L - k) * (L - k + 1) // 2
    else:
        forward += (L - k) * N
    notes = ["teacher cache: hidden states only",
             "gate passes are an upper bound: every step counted over all L layers"] if gate else []
    return Plan("search" if gate else f"baselines ({method})", rows, forward, backward, notes)


def head_bytes(cfg, b):
    """Embedding plus untied output head: what a model keeps besides its layers."""
    return b * cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)


def plan_tune(cfg, tcfg, b, devices, capacity, offload, tuned, nsamples=64, val_samples=8, seqlen=256,
              batch_size=4, chunk=1024, steps=100, method="full", rank=8):
    """Endpoint tuning of a pruned model `cfg` against its dense teacher `tcfg`; `tuned` are pruned-model indices.

    Teacher phase: the dense model loaded whole (its layers placed like the student's), its last hidden state
    (N + N_val) T C b cached, then its layers dropped (embedding + head kept). Optimizer: AdamW, 12 bytes per
    trainable parameter (fp32 gradient and two fp32 moments). Step: activations of every layer from the first
    tuned one up, for batch_size T tokens, and a KL chunk with the teacher's head applied per chunk. Save: the
    tuned weights copied to the host (unless already there) and serialised to bytes by safetensors."""
    N, T, C, Lp, first = nsamples + val_samples, seqlen, cfg.hidden_size, cfg.num_layers, tuned[0]
    rows = make_rows(devices, capacity, offload)
    parts = place_model(rows, cfg, b, devices, offload)
    hd = rows[0] if offload else rows[len(devices) - 1]
    store = rows[-1] if offload else hd
    for j, r in enumerate(slices(tcfg, 1 if offload else len(devices))):
        # on the CPU the allocator keeps the dropped layers' memory (RSS measured), on a GPU they are freed
        add(rows[j], "weights", b * layer_params(tcfg) * (2 if offload else len(r)),
            None if rows[j].device == "cpu" else "teacher")
    add(hd, "weights", head_bytes(tcfg, b))
    add(store, "teacher_cache", 2 * N * T * C * b)  # teacher's last states and the student's frozen prefix
    add(store, "teacher_cache", N * T * C * b, "teacher")  # the concatenation's second copy
    add(rows[0], "activations", forward_bytes(tcfg, b, 4 * T), "teacher")
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    # LoRA: rank (in + out) for each of the 7 Linears
    P = len(tuned) * (layer_params(cfg) if method == "full" else rank * (7 * C + 2 * q + 2 * kv + 3 * cfg.intermediate_size))
    owner = [j for j, r in enumerate(parts) if first in r][0] if not offload else 0
    add(rows[owner], "optimizer", 12 * P)
    tokens = batch_size * T
    if offload:
        add(rows[0], "activations", (Lp - first) * tokens * C * b + activation_bytes(cfg, b, tokens), "step")
    else:
        for j, r in enumerate(parts):
            add(rows[j], "activations", activation_bytes(cfg, b, tokens) * len([i for i in r if i >= first]), "step")
    add(hd, "kl_chunk", kl_bytes(cfg, b, min(chunk, tokens), True), "step")
    student = b * (Lp * layer_params(cfg) + cfg.vocab_size * C * (1 if cfg.tie_word_embeddings else 2))
    add(rows[-1], "weights", student * (1 if "cpu" in devices else 2), "save")
    forward = tcfg.num_layers * N + first * N + (steps * batch_size + 2 * val_samples) * (Lp - first)
    return Plan("tune", rows, forward, steps * batch_size * (Lp - first),
                [f"tuned layers {tuned} ({method}, {P:,} trainable parameters)"])


def plan_gptq(cfg, b, devices, capacity, offload, nsamples=128, seqlen=2048, bits=4):
    """GPTQ, layer by layer: calibration inputs X (N, T, C) in the weights' dtype and the next layer's inputs
    while they are computed; per Linear group the Hessian H = 2 X X^T / n, I^2 fp32 with I = in_features, and GPTQ's working
    copies (damped H, its Cholesky factor and inverse: 4 I^2 fp32 in all) plus the weight's float copy, int64
    codes, dequantized Q and the RTN reference (32 bytes per weight of the largest Linear, C x F). The codes of every
    quantized layer wait in host memory for the save (1 byte per weight), which also makes fp16 copies of
    the unquantized tensors and the packed ones (2 + bits/8 bytes per weight), and safetensors serialises
    them to bytes before writing (the same again)."""
    N, T, C, F, L = nsamples, seqlen, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    rows = make_rows(devices, capacity, offload)
    place_model(rows, cfg, b, devices, offload)
    I = max(C, F, cfg.num_heads * cfg.head_dim)
    for r in rows[:len(devices)]:
        add(r, "activations", N * T * C * b)
        add(r, "activations", N * T * C * b + forward_bytes(cfg, b, min(N, max(1, 4096 // T)) * T), "layer")
        add(r, "hessians", 4 * I * I * 4 + 32 * C * F, "layer")
    P_lin = L * (layer_params(cfg) - 2 * C)
    P = L * layer_params(cfg) + cfg.vocab_size * C * (1 if cfg.tie_word_embeddings else 2)
    add(rows[-1], "weights", P_lin)  # codes, 1 byte each, until the save
    add(rows[-1], "weights", 2 * (2 * P + P_lin * bits // 8), "save")
    return Plan("quantize (gptq)", rows, 5 * L * N, 0,
                ["forward passes count the 4 partial passes that capture each Linear group's inputs"])


def plan_eval(cfgs, b, devices, capacity, offload, seqlen=2048, chunk=256):
    """Evaluation: every model it loads (checkpoint, --compare, --teacher) resident; one window of T tokens at a
    time: a layer's forward transient with the attention matrix nh T^2 fp32 (the CPU kernel forms it; a GPU's
    flash kernel does not), each model's full (T, V) logits, and the NLL / KL chunks: chunk V fp32, 4 of them."""
    rows = make_rows(devices, capacity, offload)
    hd = rows[0] if offload else rows[len(devices) - 1]
    for cfg in cfgs:
        place_model(rows, cfg, b, devices, offload)
        add(rows[0], "activations", forward_bytes(cfg, b, seqlen) + 4 * cfg.num_heads * seqlen ** 2, "window")
        add(hd, "kl_chunk", seqlen * cfg.vocab_size * b, "window")
    add(hd, "kl_chunk", 16 * min(chunk, seqlen) * max(c.vocab_size for c in cfgs), "window")
    return Plan("eval", rows, sum(c.num_layers for c in cfgs), 0, ["layer passes per evaluation window"])
