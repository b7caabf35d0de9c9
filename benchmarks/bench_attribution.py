"""Attribution engine throughput, as ratios measured in one run on one machine.

Run:  pytest benchmarks/bench_attribution.py --benchmark-enable -p no:cacheprovider -o addopts="" -s

Setting (per model family): ~4M parameters (4 layers, width 256, vocab 4096),
512 sequences of 64 tokens, batch 32, all block linear weights, d ≈ 4096.

* extraction / training step: features with Adafactor V applied vs a plain
  training step (forward + backward + optimizer step), examples per second.
  Target >= 1.3.
* extraction / naive: vs torch.func vmap per-example gradients, flattened and
  multiplied by a dense Gaussian projection to the same d. The dense matrix
  (D × d, tens of GB here) cannot be stored, so the naive way regenerates it in
  slices for every batch; it is timed on one batch. Target >= 20.
* scoring / matmul: streaming top-k from a feature store vs the machine's own
  float32 matmul rate for the same shapes, without R (target >= 0.5: 2·M·d
  flops per row, so reading and checking the store weighs) and with R^{-1/2}
  applied to every training chunk (d² per row; target >= 0.8).
* extraction / floor: vs the model's own forward and backward down to the
  lowest sites with no hook, no projection and frozen weights (the same fused
  activations and loss), which no extraction can beat; and that floor against
  a training step. What is left between extraction and floor is the hooks and
  the projections.
* stacked / separate right projections: sites that read one input (q/k/v,
  gate/up) projected by one product with their stacked matrices, against one
  product per site, at the workload's widths and at 1B-model widths.
"""

from __future__ import annotations

import math
import statistics
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trackstar.attribution.features import FeatureExtractor
from trackstar.attribution.gradients import block_linear_sites
from trackstar.attribution.output import Example, collate
from trackstar.attribution.projection import Projector
from trackstar.attribution.scoring import top_k, unit_normalize
from trackstar.attribution.second_moment import second_moment_from_optimizer
from trackstar.attribution.store import FeatureStore

N_SEQ, SEQ_LEN, BATCH, VOCAB, D = 512, 64, 32, 4096, 4096


def build(family: str):
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=256, n_layer=4, n_head=4)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ_LEN)
    return LlamaForCausalLM(cfg)


def examples() -> list[Example]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (N_SEQ, SEQ_LEN), generator=gen).tolist()
    w = (0.0,) + (1.0 / (SEQ_LEN - 1),) * (SEQ_LEN - 1)
    return [Example(tuple(row), w, "loss", str(i)) for i, row in enumerate(ids)]


def batches(exs):
    return [collate(exs[i:i + BATCH]) for i in range(0, len(exs), BATCH)]


def timed(fn, repeat=1):
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def train_steps(model, opt, bs) -> None:
    """Plain training steps (dropout on), e.g. to give the optimizer its state."""
    model.train()
    for b in bs:
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.input_ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def naive_rate(model, bs, d, names) -> float:
    """vmap per-example grads over the same weights, flatten, dense Gaussian P."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    chosen = {n: params[n] for n in names}
    rest = {n: p for n, p in params.items() if n not in chosen}

    def loss(weights, ids):
        logits = functional_call(model, {**rest, **weights}, (ids[None],)).logits[0]
        return torch.nn.functional.cross_entropy(logits[:-1], ids[1:])

    per_example = vmap(grad(loss), in_dims=(None, 0))
    b = bs[0]

    def run():
        g = per_example(chosen, b.input_ids)
        flat = torch.cat([g[n].flatten(1) for n in names], dim=1)
        out = torch.zeros(flat.shape[0], d)
        gen = torch.Generator().manual_seed(0)
        for start in range(0, flat.shape[1], 8192):
            part = flat[:, start:start + 8192]
            p = torch.randn(part.shape[1], d, generator=gen) / math.sqrt(d)
            out += part @ p
        return out

    with torch.no_grad():
        seconds = timed(run)
    return len(b.examples) / seconds


def interleaved_rates(model, opt, extractor, bs, rounds=2):
    """Examples/s of extraction and of a training step, batch for batch in turn.

    Alternating the two on the same batches means both see the same load from
    anything else running on the machine; the median batch time of each is
    used, which ignores stalls.
    """
    ext, train = [], []
    for _ in range(rounds):
        for b in bs:
            model.eval()
            t = time.perf_counter()
            extractor(b)
            ext.append(time.perf_counter() - t)
            t = time.perf_counter()
            train_steps(model, opt, [b])
            train.append(time.perf_counter() - t)
    return BATCH / statistics.median(ext), BATCH / statistics.median(train)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_feature_extraction(benchmark, family):
    model = build(family)
    bs = batches(examples())
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    train_steps(model, opt, bs[:2])  # gives Adafactor its state
    sites = block_linear_sites(model)
    # Largest d <= 4096 whose per-parameter share is a square (p_L = p_R).
    d = len(sites) * int(math.sqrt(D / len(sites))) ** 2
    v = second_moment_from_optimizer(model, opt, sites)
    extractor = FeatureExtractor(model, sites, Projector(sites, "gaussian", d, seed=0), v)

    def extract():
        for b in bs:
            extractor(b)

    model.eval()
    benchmark.pedantic(extract, rounds=1, iterations=1)
    rate, train_rate = interleaved_rates(model, opt, extractor, bs)
    naive = naive_rate(model, bs, d, [s.name for s in sites])
    info = {"d": d, "extract_per_s": rate, "train_step_per_s": train_rate, "naive_per_s": naive,
            "vs_training_step": rate / train_rate, "vs_naive": rate / naive}
    benchmark.extra_info.update(info)
    print(f"\n[{family}] d={d} extraction {rate:.1f} ex/s | training step {train_rate:.1f} ex/s "
          f"-> {rate / train_rate:.2f}x (target >= 1.3) | naive vmap+dense {naive:.2f} ex/s "
          f"-> {rate / naive:.1f}x (target >= 20)")


def floor_pass(model, batch) -> None:
    """The model's forward and backward as extraction runs them (frozen weights, the fused
    activations and loss, gradient from the embedding output on), with nothing hooked."""
    from trackstar.attribution.fused import fused_activations
    from trackstar.attribution.gradients import eval_mode, frozen_parameters
    from trackstar.attribution.output import forward_objective

    with eval_mode(model), frozen_parameters(model), torch.enable_grad(), fused_activations(model):
        hook = model.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output.detach().requires_grad_(True).clone())
        try:
            value = forward_objective(model, batch)
        finally:
            hook.remove()
        value.backward()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_extraction_floor(benchmark, family):
    model = build(family)
    bs = batches(examples())
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-3)
    train_steps(model, opt, bs[:2])
    sites = block_linear_sites(model)
    d = len(sites) * int(math.sqrt(D / len(sites))) ** 2
    extractor = FeatureExtractor(model, sites, Projector(sites, "gaussian", d, seed=0),
                                 second_moment_from_optimizer(model, opt, sites))
    runs = {"extraction": extractor, "floor": lambda b: floor_pass(model, b),
            "training step": lambda b: train_steps(model, opt, [b])}
    times = {name: [] for name in runs}
    benchmark.pedantic(lambda: [extractor(b) for b in bs[:4]], rounds=1, iterations=1)
    for _ in range(2):  # batch for batch in turn, so all three see the same load
        for b in bs:
            for name, run in runs.items():
                t = time.perf_counter()
                run(b)
                times[name].append(time.perf_counter() - t)
    rate = {name: BATCH / statistics.median(ts) for name, ts in times.items()}
    info = {"extract_per_s": rate["extraction"], "floor_per_s": rate["floor"],
            "train_step_per_s": rate["training step"], "extraction_vs_floor": rate["extraction"] / rate["floor"],
            "floor_vs_training_step": rate["floor"] / rate["training step"]}
    benchmark.extra_info.update(info)
    print(f"\n[{family}] extraction {rate['extraction']:.1f} ex/s | floor {rate['floor']:.1f} | training step "
          f"{rate['training step']:.1f} -> extraction/floor {info['extraction_vs_floor']:.2f}, "
          f"floor/training step {info['floor_vs_training_step']:.2f}, "
          f"extraction/training step {rate['extraction'] / rate['training step']:.2f}")


@pytest.mark.parametrize("rows,width,p,sites", [(2048, 256, 12, 3), (2048, 256, 8, 2), (8192, 2048, 6, 3),
                                                (8192, 2048, 8, 2)])
def test_stacked_projections(benchmark, rows, width, p, sites):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=gen)
    mats = [torch.randn(p, width, generator=gen) for _ in range(sites)]
    stacked = torch.cat(mats)
    separate = timed(lambda: [a @ m.T for m in mats], repeat=20)
    benchmark.pedantic(lambda: a @ stacked.T, rounds=20, iterations=1)
    together = benchmark.stats.stats.min
    gap = max((x - y).abs().max().item() for x, y in zip([a @ m.T for m in mats], (a @ stacked.T).split(p, -1)))
    benchmark.extra_info.update({"separate_ms": separate * 1e3, "stacked_ms": together * 1e3,
                                 "speedup": separate / together, "max_abs_gap": gap})
    print(f"\n[A {rows}x{width}, {sites} sites x p_R={p}] separate {separate * 1e3:.2f} ms, stacked "
          f"{together * 1e3:.2f} ms -> x{separate / together:.2f}; max |difference| {gap:.2g}")


def _random_store(path, n_train: int, d: int, chunk: int, gen: torch.Generator) -> FeatureStore:
    """A finished float32 feature store of ``n_train`` Gaussian rows, written ``chunk`` rows at a time."""
    meta = {"row_ids": list(range(n_train)), "d": d, "dtype": "float32", "layout": []}
    store = FeatureStore.create(path, meta)
    for start in range(0, n_train, chunk):
        store.write(start, torch.randn(chunk, d, generator=gen))
    store.finish()
    return FeatureStore.open(path)


def test_scoring(benchmark, tmp_path):
    n_train, n_query, d, chunk = 8192, 256, D, 4096
    gen = torch.Generator().manual_seed(0)
    store = _random_store(tmp_path / "store", n_train, d, chunk, gen)
    queries = unit_normalize(torch.randn(n_query, d, generator=gen))
    train_mem = torch.randn(n_train, d, generator=gen)

    def score():
        top_k(queries, store.chunks(chunk), k=10, normalize_train=True)

    def matmul():
        queries @ train_mem.T

    score()  # warm the page cache, as a scoring job after extraction would find it
    benchmark.pedantic(score, rounds=3, iterations=1)
    seconds = benchmark.stats.stats.min
    flops = 2.0 * n_query * n_train * d
    mm = timed(matmul, repeat=3)
    ratio = (flops / seconds) / (flops / mm)
    benchmark.extra_info.update({"score_gflops": flops / seconds / 1e9,
                                 "matmul_gflops": flops / mm / 1e9, "ratio": ratio})
    print(f"\n[scoring] {flops / seconds / 1e9:.1f} GFLOP/s vs matmul {flops / mm / 1e9:.1f} "
          f"GFLOP/s -> {ratio:.2f} (target >= 0.5)")


def test_scoring_with_r(benchmark, tmp_path):
    """TrackStar's scoring: every training chunk through R^{-1/2} (d² per row), unit norm,
    then against the queries, against the same two matmuls on in-memory tensors. Target >= 0.8."""
    from trackstar.attribution.curvature import Whitening

    n_train, n_query, d, chunk = 4096, 256, D, 1024
    gen = torch.Generator().manual_seed(0)
    store = _random_store(tmp_path / "store", n_train, d, chunk, gen)
    r = torch.randn(d, d, generator=gen)
    whitening = Whitening([slice(0, d)], [(r @ r.T / d).float()])
    queries = unit_normalize(torch.randn(n_query, d, generator=gen))
    train_mem = torch.randn(n_train, d, generator=gen)
    m = whitening.matrices[0]

    def score():
        top_k(queries, store.chunks(chunk), k=10, transform=whitening.apply, normalize_train=True)

    def matmul():
        for start in range(0, n_train, chunk):
            queries @ (train_mem[start:start + chunk] @ m).T

    score()
    benchmark.pedantic(score, rounds=3, iterations=1)
    seconds = benchmark.stats.stats.min
    flops = 2.0 * n_train * d * d + 2.0 * n_query * n_train * d
    mm = timed(matmul, repeat=3)
    ratio = mm / seconds
    benchmark.extra_info.update({"score_gflops": flops / seconds / 1e9, "matmul_gflops": flops / mm / 1e9,
                                 "ratio": ratio})
    print(f"\n[scoring with R] {flops / seconds / 1e9:.1f} GFLOP/s vs matmul {flops / mm / 1e9:.1f} "
          f"GFLOP/s -> {ratio:.2f} (target >= 0.8)")


def _anon_kib() -> int:
    """Resident anonymous memory of this process (heap, not page cache of mapped stores)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def _peak_anon_during(fn) -> int:
    import threading

    base, peak, done = _anon_kib(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kib() - base)
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0]


def test_scoring_memory_is_flat_in_n(benchmark, tmp_path):
    """Peak extra heap while scoring N and 4N training rows, against the features' size."""
    d, chunk, n_query = 1024, 2048, 256
    gen = torch.Generator().manual_seed(0)
    queries = unit_normalize(torch.randn(n_query, d, generator=gen))
    peaks = {}
    for n_train in (8192, 32768):
        store = _random_store(tmp_path / f"store-{n_train}", n_train, d, chunk, gen)
        peaks[n_train] = _peak_anon_during(lambda s=store: top_k(queries, s.chunks(chunk), k=10, normalize_train=True))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    data = {n: n * d * 4 / 2**20 for n in peaks}
    benchmark.extra_info.update({"peak_kib": peaks, "features_mib": data})
    print(f"\n[scoring memory] peak extra heap {peaks[8192]} KiB scoring N=8192 ({data[8192]:.0f} MiB of "
          f"features), {peaks[32768]} KiB scoring N=32768 ({data[32768]:.0f} MiB): the heap does not "
          "follow N (flat); the store is read through the page cache")
