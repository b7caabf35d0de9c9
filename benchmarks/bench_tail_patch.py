"""Tail-patch throughput: batched (torch.func) against one proponent at a time, in one run.

Run:  pytest benchmarks/bench_tail_patch.py --benchmark-enable -p no:cacheprovider -o addopts="" -s

Setting: the tiny world's GPT-2 shape (4 layers, width 128, vocab 2048, about
1.07M parameters) with Adafactor state from a few training steps; 120 queries
of 8-14 tokens, each with 10 proponents drawn from a pool of random passages of
8-60 tokens, so that a proponent serves about 1.5 queries (as in a sweep's
cells, where methods share few passages). Reports proponents per second of
both paths (best of two interleaved rounds) and their ratio (target >= 3), and
checks that they agree.
"""

from __future__ import annotations

import random
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers

from trackstar.evaluation.tail_patch import tail_patch
from trackstar.lm.checkpoint import Checkpoint
from trackstar.lm.data import lm_batch, lm_loss
from trackstar.lm.optim import build_optimizer

VOCAB, N_QUERIES, K, POOL = 2048, 120, 10, 800
ROUNDS = 2


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(rng.randint(lo, hi)))


def _setting():
    torch.manual_seed(0)
    rng = random.Random(0)
    tok = _tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                                       n_inner=512, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    opt = build_optimizer(model, "adafactor", 0.03)
    for _ in range(5):
        batch = [tok(_text(rng, 20, 60))["input_ids"] for _ in range(16)]
        opt.zero_grad()
        lm_loss(model, lm_batch(batch, 0)).backward()
        opt.step()
    ck = Checkpoint(model=model, tokenizer=tok, optimizer=opt, learning_rate=3e-3)
    queries = [{"example_id": f"q{i}", "prompt": _text(rng, 6, 11), "target": _text(rng, 1, 2)}
               for i in range(N_QUERIES)]
    pool = [(f"p{i}", _text(rng, 6, 58)) for i in range(POOL)]
    props = {q["example_id"]: rng.sample(pool, K) for q in queries}
    return ck, queries, props


def test_tail_patch_throughput(benchmark):
    ck, queries, props = _setting()
    n_props = len({pid for ranked in props.values() for pid, _ in ranked})

    times = {True: [], False: []}

    def run(batched: bool):
        t = time.perf_counter()
        out = tail_patch(ck, queries, props, progress=False, batched=batched)
        times[batched].append(time.perf_counter() - t)
        return out

    # Interleaved, best of ROUNDS each: this machine's load drifts by tens of percent.
    def rounds():
        for _ in range(ROUNDS):
            pair = run(False), run(True)
        return pair

    one, many = benchmark.pedantic(rounds, rounds=1, iterations=1)
    sequential_s, batched_s = min(times[False]), min(times[True])
    diff = float((one["delta_logprob"] - many["delta_logprob"]).abs().max())
    info = {"proponents": n_props, "pairs": len(one), "threads": torch.get_num_threads(),
            "sequential_per_s": n_props / sequential_s, "batched_per_s": n_props / batched_s,
            "ratio": sequential_s / batched_s, "max_abs_delta_logprob_diff": diff}
    benchmark.extra_info.update(info)
    print(f"\n[tail-patch] {n_props} proponents, {len(one)} pairs, {info['threads']} threads: one at a time "
          f"{info['sequential_per_s']:.1f}/s, batched {info['batched_per_s']:.1f}/s, ratio {info['ratio']:.2f} "
          f"(target >= 3); max |delta log p| difference {diff:.2e}")
    assert diff < 1e-4, "batched tail-patch disagrees with the one-at-a-time step"
