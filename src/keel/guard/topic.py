"""The topical rail: is this message about what the app is for?

Decided by nearest examples in the shared embedding space, because a topic is easier to show than to define: the
app lists on-topic examples (``allowed``), optionally off-topic ones (``denied``), and Keel adds a default set of
off-topic requests (about 1,400 everyday requests from CLINC150's train split: banking, travel, cooking, small
jobs for a voice assistant; plus its own examples of politics, medicine, law, homework and the like) and a set of
small-talk turns that are always fine ("hi", "thanks!", "are you a bot?", "and its battery?").

A message is off-topic when it is closer to an off-topic example than to any allowed one by more than ``margin``,
or when nothing allowed is even loosely similar (``threshold``). Small talk wins when it is at least
``chitchat_threshold`` similar and closer than any off-topic example. The margin leans towards letting messages
through: a wrongly refused on-topic question costs more than an off-topic one answered (the system prompt still
steers the model). The defaults were tuned on the dev splits (CLINC150 validation, a fifth of the Quora phone
questions); see ``bench/guardrails.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import yaml

from keel.guard.base import Finding, GuardInput, string_list
from keel.guard.exemplars import Embed, ExemplarSet, data_rows

__all__ = ["CHITCHAT_INTENTS", "NEAR_DOMAIN_INTENTS", "TopicCheck", "TopicScores"]

DEFAULT_THRESHOLD: Final = 0.2
DEFAULT_MARGIN: Final = 0.1
DEFAULT_CHITCHAT_THRESHOLD: Final = 0.5
# CLINC150 intents that are small talk with an assistant, not a task for it: allowed with every app.
_CHITCHAT = (
    "greeting goodbye thank_you are_you_a_bot what_can_i_ask_you who_made_you what_is_your_name who_do_you_work_for "
    "how_old_are_you where_are_you_from do_you_have_pets what_are_your_hobbies yes no maybe cancel repeat "
    "change_language"
)
CHITCHAT_INTENTS: Final = frozenset(_CHITCHAT.split())
# Intents about phones themselves ("find my phone", "text mom"): on-topic for some apps, so in neither set.
NEAR_DOMAIN_INTENTS: Final = frozenset(("find_phone", "make_call", "text", "sync_device", "share_location"))


_Vectors = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], list[str], npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class _Bank:
    texts: tuple[str, ...]
    labels: tuple[str, ...]  # what each example stands for, for the finding's detail


@cache
def _default_off_topic() -> tuple[_Bank, ExemplarSet]:
    rows = [r for r in data_rows("clinc_train") if r["intent"] not in CHITCHAT_INTENTS | NEAR_DOMAIN_INTENTS]
    own = [r for r in data_rows("topic_keel") if r["label"] == "off_topic"]
    bank = _Bank(
        tuple(r["text"] for r in own) + tuple(r["text"] for r in rows),
        ("off-topic example",) * len(own) + tuple(f"{r['domain']}/{r['intent']}" for r in rows),
    )
    return bank, ExemplarSet("topic-off", bank.texts)


@cache
def _chitchat() -> tuple[_Bank, ExemplarSet]:
    rows = [r for r in data_rows("clinc_train") if r["intent"] in CHITCHAT_INTENTS]
    own = [r for r in data_rows("topic_keel") if r["label"] == "chitchat"]
    bank = _Bank(tuple(r["text"] for r in own + rows), ("small talk",) * (len(own) + len(rows)))
    return bank, ExemplarSet("topic-chitchat", bank.texts)


@dataclass(frozen=True, slots=True)
class TopicScores:
    """Best cosine similarity to each example set (-1 where a set is empty) and the label of the closest
    off-topic example."""

    allowed: float
    denied: float
    chitchat: float
    closest_denied: str


def _examples_file(name: str, base_dir: str | Path | None) -> dict[str, list[str]]:
    """``allowed`` and ``denied`` lists from a YAML file (relative to keel.yaml), for lists too long to inline."""
    path = Path(name)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"examples_file: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"allowed", "denied"}:
        raise ValueError(f"examples_file: {path} must be a mapping with `allowed` and/or `denied` lists")
    return {key: string_list(f"examples_file {key}", data.get(key), non_empty=True) for key in ("allowed", "denied")}


def _check_similarity(option: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{option} must be a number between {low} and {high}, got {value!r}")
    return float(value)


def _best(vector: npt.NDArray[np.float32], matrix: npt.NDArray[np.float32]) -> tuple[float, int]:
    if len(matrix) == 0:
        return -1.0, -1
    sims = matrix @ vector
    i = int(np.argmax(sims))
    return float(sims[i]), i


class TopicCheck:
    """Flags messages that are not about the app's subject (``reason``: ``off_topic``).

    Options: ``allowed`` (required: example on-topic messages, 20-80 varied ones work best: specs, prices,
    comparisons, how-to questions), ``denied`` (extra off-topic examples), ``default_denied`` (add Keel's
    off-topic set; default true), ``chitchat`` (always allow small talk; default true), ``threshold`` (minimum
    similarity to some allowed example, default 0.2), ``margin`` (how much closer to an off-topic example a
    message must be, default 0.1), ``chitchat_threshold`` (default 0.5).
    """

    name = "topic"

    def __init__(
        self,
        *,
        allowed: Sequence[str] | None = None,
        denied: Sequence[str] | None = None,
        examples_file: str | None = None,
        base_dir: str | Path | None = None,
        default_denied: bool = True,
        chitchat: bool = True,
        threshold: float = DEFAULT_THRESHOLD,
        margin: float = DEFAULT_MARGIN,
        chitchat_threshold: float = DEFAULT_CHITCHAT_THRESHOLD,
    ) -> None:
        from_file = _examples_file(examples_file, base_dir) if examples_file is not None else {}
        self.allowed = [*from_file.get("allowed", []), *string_list("allowed", allowed, non_empty=True)]
        if not self.allowed:
            raise ValueError("allowed (or examples_file) must list at least one example of an on-topic message")
        self.denied = [*from_file.get("denied", []), *string_list("denied", denied, non_empty=True)]
        for option, value in (("default_denied", default_denied), ("chitchat", chitchat)):
            if not isinstance(value, bool):
                raise TypeError(f"{option} must be true or false, got {value!r}")
        self.default_denied = default_denied
        self.chitchat = chitchat
        self.threshold = _check_similarity("threshold", threshold, -1.0, 1.0)
        self.margin = _check_similarity("margin", margin, -1.0, 1.0)
        self.chitchat_threshold = _check_similarity("chitchat_threshold", chitchat_threshold, -1.0, 1.0)
        self._own = ExemplarSet("topic-app", self.allowed + self.denied, persist=False)
        self._assembled: dict[str, _Vectors] = {}

    async def warm(self, embed: Embed) -> None:
        """Embed every example set now (at startup) instead of on the first message."""
        await self._vectors(embed)

    async def _vectors(self, embed: Embed | None) -> _Vectors:
        """Allowed vectors, denied vectors with their labels, small-talk vectors; assembled once per vector space
        (stacking the default set costs more than the lookup itself)."""
        space, own = await self._own.vectors(embed)
        ready = self._assembled.get(space)
        if ready is not None:
            return ready
        allowed, denied = own[: len(self.allowed)], own[len(self.allowed) :]
        labels = [f"denied example {i + 1}" for i in range(len(self.denied))]
        parts = [denied]
        if self.default_denied:
            bank, exemplars = _default_off_topic()
            parts.append((await exemplars.vectors(embed))[1])
            labels += bank.labels
        denied = np.vstack(parts)
        chitchat = np.zeros((0, allowed.shape[1]), np.float32)
        if self.chitchat:
            chitchat = (await _chitchat()[1].vectors(embed))[1]
        ready = self._assembled[space] = (allowed, denied, labels, chitchat)
        return ready

    async def scores(self, inp: GuardInput) -> TopicScores:
        allowed, denied, labels, chitchat = await self._vectors(inp.embed)
        vector = await inp.embedding()
        best_allowed, _ = _best(vector, allowed)
        best_denied, i = _best(vector, denied)
        best_chitchat, _ = _best(vector, chitchat)
        return TopicScores(best_allowed, best_denied, best_chitchat, labels[i] if i >= 0 else "")

    def off_topic(self, s: TopicScores) -> bool:
        if self.chitchat and s.chitchat >= self.chitchat_threshold and s.chitchat >= s.denied:
            return False
        return s.denied - s.allowed > self.margin or s.allowed < self.threshold

    async def check(self, inp: GuardInput) -> list[Finding]:
        s = await self.scores(inp)
        if not self.off_topic(s):
            return []
        if s.denied - s.allowed > self.margin:
            detail = (
                f"closer to off-topic examples ({s.closest_denied}, similarity {s.denied:.2f}) than to the app's "
                f"topics ({s.allowed:.2f})"
            )
        else:
            detail = f"not similar to any of the app's topics (best similarity {s.allowed:.2f})"
        return [Finding(check=self.name, reason="off_topic", detail=detail, score=round(1.0 - max(s.allowed, 0.0), 3))]
