"""An entailment judge for open-set passages without exact annotations (SPEC §2.5).

The paper labels a retrieved C4 passage correct when an AIS entailment model
says it entails the fact, thresholded at 0.5. :class:`NLIJudge` does the same
with any sequence-classification NLI model given by hub name or local path
(a transformers model, or a sentence-transformers CrossEncoder directory,
which is one): premise = the passage, hypothesis = the fact statement
(prompt and target), score = the softmax probability of the label whose
name contains "entail". Pairs are scored in batches, with a progress bar,
and cached per (passage, statement) on disk, so every method and job of a
sweep judges a passage once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from ..io import ArtifactError, atomic_write_json_checked, config_hash, read_json_checked

JUDGES = ("exact", "nli")


class JudgeError(ValueError):
    """An NLI model that cannot serve as a judge."""


def _pair_key(premise: str, hypothesis: str) -> str:
    return hashlib.sha256(f"{premise}\x00{hypothesis}".encode()).hexdigest()[:32]


class NLIJudge:
    """P(entailment) of (passage, statement) pairs under an NLI model; see the module doc."""

    def __init__(self, model: str, batch_size: int = 32, device=None, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True):
        # transformers and torch (in scores) only where a judge model is loaded: the module's
        # other users (JUDGES, read by config validation) need neither.
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForSequenceClassification.from_pretrained(model).eval()
        except (OSError, ValueError) as exc:
            raise JudgeError(f"eval.judge_model={model!r} cannot be loaded as a sequence-classification model "
                             f"({exc}).") from None
        labels = {int(i): str(name) for i, name in self.model.config.id2label.items()}
        entail = [i for i, name in labels.items() if "entail" in name.lower()]
        if len(entail) != 1:
            raise JudgeError(f"eval.judge_model={model!r} has labels {sorted(labels.values())}; a judge needs exactly "
                             "one whose name contains 'entail'. Give an NLI model (entailment / neutral / "
                             "contradiction).")
        self.entailment = entail[0]
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size
        self.progress = progress
        self.cache_path = (Path(cache_dir) / "judge" / config_hash({"model": model}) / "scores.json"
                           if cache_dir is not None else None)
        self.cache: dict[str, float] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            try:
                self.cache = read_json_checked(self.cache_path)
            except ArtifactError:
                self.cache = {}  # damaged: judge again

    def scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """P(entailment) of each (premise, hypothesis), in order."""
        import torch  # only with a judge model loaded: see __init__

        keys = [_pair_key(p, h) for p, h in pairs]
        todo = sorted({k: pair for k, pair in zip(keys, pairs) if k not in self.cache}.items())
        device = next(self.model.parameters()).device
        for start in tqdm(range(0, len(todo), self.batch_size), disable=not self.progress or not todo,
                          desc="nli judge", unit="batch"):
            batch = todo[start:start + self.batch_size]
            encoded = self.tokenizer([p for _, (p, _) in batch], [h for _, (_, h) in batch], truncation=True,
                                     padding=True, return_tensors="pt").to(device)
            with torch.no_grad():
                probs = self.model(**encoded).logits.float().softmax(dim=-1)[:, self.entailment]
            self.cache.update({k: float(s) for (k, _), s in zip(batch, probs.tolist(), strict=True)})
        if todo and self.cache_path is not None:
            self._save()
        return [self.cache[k] for k in keys]

    def _save(self) -> None:
        """Merge what other jobs wrote since this one read the cache, then write it (under a lock)."""
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.cache_path) + ".lock"):
            if self.cache_path.is_file():
                try:
                    self.cache = {**read_json_checked(self.cache_path), **self.cache}
                except ArtifactError:
                    pass  # damaged: ours replaces it
            atomic_write_json_checked(self.cache_path, self.cache)

    def label(self, records: Sequence[dict]) -> list[dict]:
        """Open-set retrieval records with ``proponent_ais_scores`` from this judge."""
        pairs = [(text, f"{r['inputs_plaintext']} {r['targets_plaintext']}") for r in records for text in r["proponents"]]
        scores = iter(self.scores(pairs))
        return [{**r, "proponent_ais_scores": [next(scores) for _ in r["proponents"]]} for r in records]
