"""Query evaluation: target sequence probability and greedy correctness.

For a query (prompt, target) the model reads ``bos + prompt + " " + target``
(:func:`trackstar.lm.data.query_ids`, the ids attribution takes its gradient
on) and we report

- ``target_prob`` = p(target | prompt), the product of the target tokens'
  probabilities (SPEC 2.3, the quantity tail-patch moves), and its log;
- ``greedy_correct``: whether greedy decoding after the prompt reproduces the
  target tokens exactly (SPEC 2.4, Table A.7). Greedy decoding reproduces the
  target iff every target token is the argmax given the prompt and the
  preceding target tokens, so one teacher-forced pass decides it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from trackstar.io import write_jsonl
from trackstar.lm.data import context_length, pad, pad_token_id, query_ids

QUERY_EVAL_FILE = "query_eval.jsonl"


@torch.no_grad()
def score_targets(
    model, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64
) -> list[tuple[float, bool]]:
    """(log p(target | prompt), greedy_correct) for each pair, in order."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    max_length = context_length(model)
    encoded = [query_ids(tokenizer, p, t, max_length) for p, t in zip(prompts, targets, strict=True)]
    pad_id = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = []
    try:
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            # Right padding needs no position ids: a query's own tokens never see the pads after them.
            input_ids, attention_mask, _ = pad([ids for ids, _ in chunk], pad_id)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for row, (ids, n_target) in enumerate(chunk):
                # Logits at position i predict token i + 1.
                positions = torch.arange(len(ids) - n_target - 1, len(ids) - 1, device=device)
                tokens = input_ids[row, positions + 1].to(device)
                token_log_probs = log_probs[row, positions, tokens]
                correct = bool((logits[row, positions].argmax(dim=-1) == tokens).all())
                results.append((float(token_log_probs.double().sum()), correct))
    finally:
        model.train(was_training)
    return results


def evaluate_queries(model, tokenizer, queries: Sequence[dict], batch_size: int = 64) -> list[dict]:
    """One record per query: example_id, fact_id, target_prob, target_logprob,
    greedy_correct, c4_frequency_bucket."""
    scores = score_targets(
        model, tokenizer, [q["prompt"] for q in queries], [q["target"] for q in queries], batch_size
    )
    records = []
    for query, (log_prob, correct) in zip(queries, scores, strict=True):
        records.append({
            "example_id": query["example_id"],
            "fact_id": query.get("fact_id"),
            "target_prob": math.exp(log_prob),
            "target_logprob": log_prob,
            "greedy_correct": correct,
            "c4_frequency_bucket": query.get("c4_frequency_bucket"),
        })
    return records


def write_query_eval(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    path = Path(path)
    write_jsonl(path, records)
    return path


def accuracy_by_bucket(records: Sequence[dict]):
    """Per frequency bucket: number of queries, greedy accuracy, mean target probability.

    Returns a pandas DataFrame indexed by ``c4_frequency_bucket`` with an
    ``all`` row last.
    """
    if not records:
        warnings.warn("accuracy_by_bucket got no records", stacklevel=2)
    frame = pd.DataFrame.from_records(
        list(records), columns=["c4_frequency_bucket", "greedy_correct", "target_prob"]
    )
    frame["greedy_correct"] = frame["greedy_correct"].astype(float)
    table = frame.groupby("c4_frequency_bucket").agg(
        n=("greedy_correct", "size"),
        accuracy=("greedy_correct", "mean"),
        mean_target_prob=("target_prob", "mean"),
    )
    table.loc["all"] = [len(frame), frame["greedy_correct"].mean(), frame["target_prob"].mean()]
    table["n"] = table["n"].astype(int)
    return table
