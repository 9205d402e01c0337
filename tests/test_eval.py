"""eval.py, zeroshot.py and tasks.py against hand-computed values and invariants (fast, CPU)."""
import dataclasses
import json
import math
import statistics
from types import SimpleNamespace

import pytest
import torch

import eval as ev
import latency
import tasks
import zeroshot as zs
from conftest import DATA, WHOLE, need
from data import eval_windows
from machinery import atomic
from machinery.errors import UserError
from model import Config, Transformer


class Bigram(torch.nn.Module):
    """logits[b, t] = table[tokens[b, t]]: every log-prob the scorer sees can be computed by hand."""

    def __init__(self, table, max_len=256):
        super().__init__()
        self.table = table
        self.cfg = SimpleNamespace(vocab_size=table.shape[0], max_position_embeddings=max_len, num_layers=1)

    def forward(self, tokens, keep=None, cache=None):
        return self.table[tokens]  # (B, T, V)


class CharTok:
    """One token per ASCII character, no BOS: the continuation split is visible by eye."""
    add_bos, bos_id = False, None

    def encode(self, text, bos=False):
        return [ord(c) for c in text]


def lp(table, prev, nxt):
    """log p(nxt | prev) of a bigram table, by hand: row value minus log-sum-exp of the row."""
    row = table[prev].tolist()
    return row[nxt] - math.log(sum(math.exp(v) for v in row))


def hand_ll(table, context, continuation):
    ids = [ord(c) for c in context + continuation]
    return sum(lp(table, ids[t - 1], ids[t]) for t in range(len(context), len(ids)))


def small_transformer(seed=0, vocab=128):
    torch.manual_seed(seed)
    cfg = Config(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    return Transformer(cfg).eval()


# ---------------------------------------------------------------- perplexity

def test_perplexity_equals_hand_computed_nll_and_drops_the_tail():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(11, 11, generator=g)
    ids = torch.randint(11, (2 * 8 + 3,), generator=g)
    windows = eval_windows(ids, 8)
    assert windows.shape == (2, 8) and torch.equal(windows.flatten(), ids[:16])
    m = ev.text_metrics(Bigram(table), windows)
    # each window predicts its tokens 2..8 from the token before; nothing crosses a window boundary
    nll = [-lp(table, w[t - 1], w[t]) for w in windows.tolist() for t in range(1, 8)]
    assert m["predicted_tokens"] == 14
    assert m["ppl"] == pytest.approx(math.exp(sum(nll) / 14), rel=1e-6)
    tail_changed = ids.clone()
    tail_changed[16:] = (tail_changed[16:] + 1) % 11
    assert ev.text_metrics(Bigram(table), eval_windows(tail_changed, 8))["ppl"] == m["ppl"]
    with pytest.raises(ValueError, match="fewer than one window"):
        eval_windows(ids[:7], 8)


def test_nll_is_chunk_size_invariant():
    g = torch.Generator().manual_seed(1)
    logits, tokens = torch.randn(37, 50, generator=g), torch.randint(50, (37,), generator=g)
    ref = torch.nn.functional.cross_entropy(logits[:-1], tokens[1:], reduction="sum").item()
    for chunk in (1, 5, 36, 37, 1000):
        assert ev.chunked_nll(logits, tokens, chunk) == pytest.approx(ref, rel=1e-6)


# ---------------------------------------------------------------- KL

def test_kl_of_a_model_to_itself_is_zero():
    model = small_transformer()
    windows = torch.randint(128, (2, 24), generator=torch.Generator().manual_seed(2))
    m = ev.text_metrics(model, windows, teacher=model, chunk=5)
    assert abs(m["kl"]) < 1e-6
    assert m["teacher_ppl"] == pytest.approx(m["ppl"], rel=1e-6)


def test_kl_matches_hand_value_and_is_chunk_size_invariant():
    # constant models: p and q are the same at every position, so the mean KL is one hand-computed sum
    p_row, q_row = torch.tensor([2.0, 0.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.0, -2.0])
    teacher, student = Bigram(p_row.repeat(4, 1)), Bigram(q_row.repeat(4, 1))
    p = [math.exp(v) / sum(math.exp(u) for u in p_row.tolist()) for v in p_row.tolist()]
    q = [math.exp(v) / sum(math.exp(u) for u in q_row.tolist()) for v in q_row.tolist()]
    hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    windows = torch.randint(4, (3, 10), generator=torch.Generator().manual_seed(3))
    for chunk in (1, 3, 10, 4096):
        assert ev.text_metrics(student, windows, teacher, chunk)["kl"] == pytest.approx(hand, rel=1e-6)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(50, 300, generator=g), torch.randn(50, 300, generator=g)
    ref = ev.chunked_kl(a, b, 50)
    assert ref > 0 and all(ev.chunked_kl(a, b, c) == pytest.approx(ref, rel=1e-6) for c in (1, 7, 49, 10_000))


# ---------------------------------------------------------------- zero-shot

def test_encode_pair_moves_trailing_space_to_the_continuation():
    ctx, cont = zs.encode_pair(CharTok(), "Answer: ", "yes")
    assert ctx == [ord(c) for c in "Answer:"] and cont == [ord(c) for c in " yes"]


def test_forced_answer_and_loglikelihoods_equal_hand_sums():
    table = torch.zeros(128, 128)
    table[ord(" "), ord("b")] = 6.0  # after a space, "b" is far more likely than "a"
    item = tasks.mc_item("Q:", ["a", "b"], gold=1)
    reqs = [zs.encode_pair(CharTok(), c, k) for c, k in zip(item.contexts, item.continuations)]
    lls = zs.loglikelihoods(Bigram(table), reqs, batch_size=2)
    assert lls == pytest.approx([hand_ll(table, "Q:", " a"), hand_ll(table, "Q:", " b")], rel=1e-6)
    assert zs.task_metrics([item], lls)["acc"] == 1.0
    wrong = tasks.mc_item("Q:", ["a", "b"], gold=0)
    assert zs.task_metrics([wrong], lls)["acc"] == 0.0


def test_acc_and_acc_norm_differ_when_lengths_differ():
    # a context-free model: p(" ") = 0.3, p("x") = 0.01, p("y") = 0.3, whatever came before
    row = torch.full((128,), -float("inf"))
    row[ord(" ")], row[ord("x")], row[ord("y")], row[ord("z")] = (math.log(p) for p in (0.3, 0.01, 0.3, 0.39))
    model = Bigram(row.repeat(128, 1))
    item = tasks.mc_item("Q:", ["x", "yyyy"], gold=1)
    assert item.norm_lens == [1, 4]  # characters of the choice, without the leading space
    reqs = [zs.encode_pair(CharTok(), c, k) for c, k in zip(item.contexts, item.continuations)]
    lls = zs.loglikelihoods(model, reqs)
    assert lls == pytest.approx([math.log(0.3 * 0.01), math.log(0.3 ** 5)], rel=1e-6)
    # summed: " x" wins (-5.81 > -6.02); per character of the choice: "yyyy" wins (-1.50 > -5.81)
    assert lls[0] > lls[1] and lls[0] / 1 < lls[1] / 4
    m = zs.task_metrics([item], lls)
    assert (m["acc"], m["acc_norm"], m["n"]) == (0.0, 1.0, 1)


def test_winogrande_partial_scoring_scores_only_the_shared_continuation():
    item = tasks.winogrande({"sentence": "Tom hit Ann so _ was sad.", "option1": "Tom", "option2": "Ann",
                             "answer": "2"}, None)
    assert item.contexts == ["Tom hit Ann so Tom", "Tom hit Ann so Ann"]
    assert item.continuations == [" was sad.", " was sad."] and item.gold == 1
    table = torch.zeros(128, 128)
    table[ord(" "), ord("T")] = 8.0  # the contexts alone strongly prefer "Tom" ...
    table[ord("n"), ord(" ")] = 5.0  # ... but " was" follows "Ann" far better than "Tom"
    full = [hand_ll(table, "", s) for s in ("Tom hit Ann so Tom was sad.", "Tom hit Ann so Ann was sad.")]
    assert full[0] > full[1]  # scoring whole sentences would choose option 1
    reqs = [zs.encode_pair(CharTok(), c, k) for c, k in zip(item.contexts, item.continuations)]
    lls = zs.loglikelihoods(Bigram(table), reqs)
    assert lls == pytest.approx([hand_ll(table, c, " was sad.") for c in item.contexts], rel=1e-6)
    m = zs.task_metrics([item], lls)
    assert m["acc"] == 1.0 and m["acc_norm"] == m["acc"]


def test_batched_scoring_equals_one_sequence_at_a_time():
    model = small_transformer(seed=5)
    g = torch.Generator().manual_seed(5)
    reqs = [(torch.randint(128, (n,), generator=g).tolist(), torch.randint(128, (k,), generator=g).tolist())
            for n, k in [(3, 1), (17, 4), (9, 2), (30, 5), (5, 5)]]
    ref = []
    for c, k in reqs:  # unpadded reference: one full forward per request
        logp = torch.log_softmax(model(torch.tensor([c + k]))[0], dim=-1)
        ref.append(sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(k)))
    for bs in (1, 2, 8):
        assert zs.loglikelihoods(model, reqs, batch_size=bs) == pytest.approx(ref, abs=1e-4)


def test_shared_context_scoring_equals_independent_requests():
    model = small_transformer(seed=8)
    g = torch.Generator().manual_seed(8)
    items = [[(ctx, torch.randint(128, (k,), generator=g).tolist()) for k in ks]
             for ctx, ks in [(torch.randint(128, (n,), generator=g).tolist(), ks)
                             for n, ks in [(12, [1, 4, 2]), (5, [3, 3]), (20, [1, 1])]]]
    flat = [q for r in items for q in r]
    ref = zs.loglikelihoods(model, flat, batch_size=1)
    assert zs.choice_loglikelihoods(model, items) == pytest.approx(ref, abs=1e-4)  # shared KV-cache path
    assert zs.shared_context_loglikelihoods(model, items[0][0][0], [k for _, k in items[0]]) == pytest.approx(ref[:3], abs=1e-4)
    items[1][1] = ([7] + items[1][1][0][1:], items[1][1][1])  # contexts differ: the independent path
    flat = [q for r in items for q in r]
    assert zs.choice_loglikelihoods(model, items) == pytest.approx(zs.loglikelihoods(model, flat, 1), abs=1e-4)


def test_overlong_requests_keep_their_last_tokens():
    table = torch.randn(128, 128, generator=torch.Generator().manual_seed(6))
    ctx, cont = "abcdefghij", " kl"
    lls = zs.loglikelihoods(Bigram(table, max_len=5), [zs.encode_pair(CharTok(), ctx, cont)])
    assert lls[0] == pytest.approx(hand_ll(table, ctx, cont), rel=1e-6)  # a bigram needs only the last token


def test_every_task_file_at_hand_parses():
    """The excerpt (tests/data) or the whole data ($CLP_DATA): every item is well formed."""
    for name in tasks.TASKS:
        items, _ = tasks.load_task(name, need(DATA))
        assert len(items) >= 4, name
        for it in items:
            n = len(it.continuations)
            assert n >= 2 and len(it.contexts) == len(it.norm_lens) == n and 0 <= it.gold < n
            assert all(k.startswith(" ") and len(k) > 1 for k in it.continuations)


@pytest.mark.whole_data
def test_whole_task_files_have_their_published_sizes():
    whole = WHOLE
    sizes = {"piqa": 1838, "winogrande": 1267, "boolq": 3270, "openbookqa": 500, "arc_easy": 2376,
             "arc_challenge": 1172, "hellaswag": 4}
    for name in tasks.TASKS:
        assert len(tasks.load_task(name, whole)[0]) == sizes[name], name
    boolq, _ = tasks.load_task("boolq", whole)
    assert sum(it.gold for it in boolq) == 2033  # BoolQ dev: 62.2% "yes" (boolq/SOURCE.md)


# ---------------------------------------------------------------- bad input

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_bad_task_files_give_errors_naming_file_and_line(tmp_path):
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    write(tmp_path / "piqa/valid.jsonl", good + "\n{not json\n")
    write(tmp_path / "piqa/valid-labels.lst", "0\n1\n")
    with pytest.raises(tasks.TaskFileError, match=r"valid.jsonl:2: malformed JSON"):
        tasks.load_task("piqa", tmp_path)
    write(tmp_path / "piqa/valid.jsonl", good + "\n" + good + "\n")
    write(tmp_path / "piqa/valid-labels.lst", "0\n")
    with pytest.raises(tasks.TaskFileError, match="1 labels for 2 items"):
        tasks.load_task("piqa", tmp_path)
    write(tmp_path / "openbookqa/test.jsonl", json.dumps({"question": {"stem": "s", "choices": [
        {"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "E"}) + "\n")
    with pytest.raises(tasks.TaskFileError, match=r"test.jsonl:1: cannot read"):
        tasks.load_task("openbookqa", tmp_path)
    write(tmp_path / "boolq/dev.jsonl", "\n \n")
    with pytest.raises(tasks.TaskFileError, match="is empty"):
        tasks.load_task("boolq", tmp_path)
    with pytest.raises(FileNotFoundError, match="no file for task winogrande"):
        tasks.load_task("winogrande", tmp_path)
    with pytest.raises(UserError, match="unknown task"):
        tasks.load_task("mmlu", tmp_path)


def test_limit_larger_than_the_set_warns_and_reports_the_true_n(capsys):
    items = [tasks.mc_item("Q:", ["a", "b"], 0)] * 3
    assert len(zs.limit_items(items, 10, "piqa")) == 3
    assert "larger than piqa (3 items)" in capsys.readouterr().out
    assert len(zs.limit_items(items, 2, "piqa")) == 2


def test_cli_rejects_bad_flags():
    for argv in ([], ["--tasks", "piqa,nope"], ["--latency", "--runs", "3"], ["--tasks", "piqa", "--limit", "0"],
                 ["--teacher", "x", "--tasks", "piqa"], ["--compare", "p", "--teacher", "t", "--ppl", "wikitext2"]):
        with pytest.raises(SystemExit):
            ev.parse_args(argv)
    assert ev.parse_args(["--tasks", "all"]).tasks == tasks.TASKS


def test_fallback_text_never_poses_as_wikitext2():
    assert ev.ppl_key("wikitext2", "pydoc-eval (WikiText-2 not found)") == "pydoc-eval"
    assert ev.ppl_key("wikitext2", "wikitext2-test (/x/wiki.test.raw)") == "wikitext2"


# ---------------------------------------------------------------- latency and the report

def test_decode_path_equals_full_forwards():
    model = small_transformer(seed=7)
    prompt = torch.randint(128, (1, 10), generator=torch.Generator().manual_seed(7))
    out, seconds = latency.greedy_decode(model, prompt, new_tokens=12)
    assert out.shape == (1, 22) and torch.equal(out[:, :10], prompt) and seconds > 0
    with torch.no_grad():
        full = model(out)[0]  # (T, V), no cache
    assert torch.equal(full[9:21].argmax(-1), out[0, 10:])


def test_latency_figures_are_positive_and_finite():
    lat = latency.one_model(small_transformer(), seqlen=32, new_tokens=8, runs=5, probe_mbytes=1)
    for key in ("prefill_tok_s", "decode_tok_s", "peak_mem_bytes", "roofline_fraction", "weight_bytes_per_token"):
        assert math.isfinite(lat[key]) and lat[key] > 0
    assert lat["threads"] == torch.get_num_threads()
    assert len(lat["decode_s"]["runs"]) == lat["decode_s"]["n"] == 5 and lat["bandwidth"]["n"] == 5
    assert lat["decode_s"]["min"] <= lat["decode_s"]["q1"] <= lat["decode_s"]["median"] <= lat["decode_s"]["q3"]


def test_interleaved_rounds_alternate_models_and_speedup_uses_medians(monkeypatch):
    import latency

    order, script = [], {"dense": [9.0, 2.0, 3.0, 4.0, 100.0], "pruned": [1.0, 1.5, 2.5, 50.0, 2.0]}
    models = {k: small_transformer(seed=1) for k in script}
    names = {id(m): k for k, m in models.items()}
    calls = {}

    def scripted(kind, model):
        k = names[id(model)]
        order.append((kind, k))
        calls[kind, k] = calls.get((kind, k), 0) + 1
        # call 1 is the memory pass, call 2 the warm-up round; then the timed rounds
        return script[k][calls[kind, k] - 3] if calls[kind, k] > 2 else 1e3

    def fake_prefill(model, tokens, device):
        return scripted("prefill", model)

    def fake_decode(model, prompt, new_tokens, device="cpu", step=None, cache=None):
        return None, scripted("decode", model) / 10

    monkeypatch.setattr(latency, "prefill_seconds", fake_prefill)
    monkeypatch.setattr(latency, "greedy_decode", fake_decode)
    res, bw = latency.interleaved_latency(models, seqlen=16, new_tokens=4, runs=5, warmup=1, probe_mbytes=1)
    rounds = [k for _, k in order[4:]]  # after the memory pass (2 models x prefill + decode)
    # prefill and decode of one model, then the other; each round starts one model later (ABBA...)
    assert rounds == ["dense", "dense", "pruned", "pruned", "pruned", "pruned", "dense", "dense"] * 3
    assert res["dense"]["prefill_s"]["runs"] == script["dense"] and res["pruned"]["prefill_s"]["median"] == 2.0
    sp = latency.speedups(res["dense"], res["pruned"])
    # medians 4.0 and 2.0 (means would give 23.6 / 11.4, the last runs 100 / 2)
    assert sp["prefill"] == pytest.approx(2.0) and sp["decode"] == pytest.approx(2.0)
    assert res["pruned"]["prefill_tok_s"] == pytest.approx(16 / 2.0) and bw["n"] == 5


def test_compare_block_retention_and_ideal_speedup():
    def res(layers, piqa, boolq, pre, dec):
        return {"tasks": {"piqa": {"acc": 0.0, "acc_norm": piqa, "n": 50}, "boolq": {"acc": boolq, "acc_norm": 0.0, "n": 50}},
                "settings": {"layers": layers},
                "latency": {"prefill_s": {"median": 1 / pre}, "decode_s": {"median": 1 / dec}}}
    c = ev.compare_block(res(30, 0.60, 0.50, 100.0, 10.0), res(24, 0.54, 0.55, 120.0, 12.5))
    assert c["retention"] == pytest.approx({"piqa": 0.9, "boolq": 1.1})
    assert c["retention_mean"] == pytest.approx(1.0) and c["ideal_speedup"] == 1.25
    assert (c["prefill_speedup"], c["decode_speedup"]) == pytest.approx((1.2, 1.25))


def test_mean_retention_leaves_out_the_hellaswag_smoke_sample(capsys):
    n_small = len(tasks.load_task("hellaswag", need(DATA))[0])  # what --tasks all scores of HellaSwag
    assert "hellaswag" in tasks.TASKS and n_small < ev.MIN_ITEMS_IN_MEAN, "the full HellaSwag is here: drop this test"

    def res(layers, scores):
        return {"ckpt": "x", "ppl": {}, "kl": {}, "latency": None, "settings": {"layers": layers},
                "tasks": {t: {"acc": a, "acc_norm": a, "n": n} for t, (a, n) in scores.items()}}
    n = ev.MIN_ITEMS_IN_MEAN
    dense = res(30, {"piqa": (0.6, n), "boolq": (0.5, n), "hellaswag": (0.5, n_small)})
    pruned = res(24, {"piqa": (0.54, n), "boolq": (0.55, n), "hellaswag": (0.25, n_small)})
    c = ev.compare_block(dense, pruned)
    assert c["retention"]["hellaswag"] == pytest.approx(0.5)  # still reported on its own
    assert c["retention_mean"] == pytest.approx(statistics.mean([0.54 / 0.6, 0.55 / 0.5]))
    assert list(c["retention_mean_excludes"]) == ["hellaswag"] and f"{n_small} items" in c["retention_mean_excludes"]["hellaswag"]
    ev.print_table(pruned, dense, c)
    mean_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("retention mean"))
    assert "without hellaswag" in mean_line


def test_evaluate_writes_the_documented_schema(tmp_path):
    text = write(tmp_path / "t.txt", "the cat sat on the mat. " * 10)
    write(tmp_path / "d/piqa/valid.jsonl", "\n".join(json.dumps({"goal": f"g{i}", "sol1": "a", "sol2": "bb"})
                                                     for i in range(3)) + "\n")
    write(tmp_path / "d/piqa/valid-labels.lst", "0\n1\n0\n")
    res = ev.evaluate(small_transformer(), CharTok(), "tiny", ppl=[str(text)], tasks=["piqa"], latency_runs=5,
                      seqlen=32, new_tokens=4, data_dir=tmp_path / "d")
    atomic.write_json(tmp_path / "out.json", res)
    back = json.loads((tmp_path / "out.json").read_text())
    assert set(back) >= {"ckpt", "ppl", "kl", "tasks", "latency", "settings"}
    assert math.isfinite(back["ppl"][str(text)]) and back["kl"] == {}
    assert set(back["tasks"]["piqa"]) >= {"acc", "acc_norm", "n"} and back["tasks"]["piqa"]["n"] == 3
    assert set(back["latency"]) >= {"prefill_tok_s", "decode_tok_s", "peak_mem_bytes"}
    assert back["settings"]["data"][str(text)]["windows"] == 240 // 32


def test_compare_mode_reports_pruned_dense_kl_and_retention(tmp_path, monkeypatch):
    dense, pruned = small_transformer(seed=9), small_transformer(seed=9)
    pruned.layers = pruned.layers[:1]  # the same model with its second layer cut out
    pruned.cfg = dataclasses.replace(dense.cfg, num_layers=1)
    monkeypatch.setattr(ev, "load_model", lambda ckpt, place, decode=False: ({"D": dense, "P": pruned}[ckpt], CharTok(), "cpu", "float32"))
    text = write(tmp_path / "t.txt", "a quick brown fox jumps over the lazy dog. " * 4)
    write(tmp_path / "d/piqa/valid.jsonl", "\n".join(json.dumps({"goal": f"g{i}", "sol1": "ab", "sol2": "b"})
                                                     for i in range(4)) + "\n")
    write(tmp_path / "d/piqa/valid-labels.lst", "0\n1\n1\n0\n")
    res = ev.run("D", compare="P", ppl=[str(text)], tasks=["piqa"], latency=True, seqlen=32, new_tokens=4,
                 data_dir=tmp_path / "d", json_out=tmp_path / "cmp.json")
    back = json.loads((tmp_path / "cmp.json").read_text())
    key = str(text)
    alone = ev.evaluate(dense, CharTok(), "D", ppl=[key], seqlen=32)
    assert back["reference"]["ppl"][key] == pytest.approx(alone["ppl"][key], rel=1e-6)  # the teacher's by-product
    assert back["ckpt"] == "P" and back["kl"][key] > 0 and back["settings"]["teacher"] == "D"
    c = back["compare"]
    assert c["layers"] == [2, 1] and c["ideal_speedup"] == 2.0 and c["prefill_speedup"] > 0
    d_score, p_score = back["reference"]["tasks"]["piqa"]["acc_norm"], back["tasks"]["piqa"]["acc_norm"]
    assert c["retention"]["piqa"] == (p_score / d_score if d_score else None)
    assert c["retention_metric"]["piqa"] == "acc_norm" and res["compare"] == c


def test_ppl_windows_takes_a_stated_prefix_subset(tmp_path):
    import eval as ev

    class Chars:  # one token per character: 26 tokens -> 5 windows of 5
        add_bos = False

        def encode(self, text, bos=False):
            return [ord(c) for c in text]

    f = tmp_path / "t.txt"
    f.write_text("abcdefghijklmnopqrstuvwxyz")
    (w_all, d_all), = ev.text_windows(Chars(), [str(f)], 5, None, False).values()
    two = ev.text_windows(Chars(), [str(f)], 5, None, False, max_windows=2)
    assert list(two) == [f"{f}[:2]"]
    (w_two, d_two), = two.values()
    assert w_all.shape == (5, 5) and torch.equal(w_two, w_all[:2])
    assert "first 2 of 5 windows" in d_two and "subset" not in d_all
