"""Prompt-injection detection: phrase heuristics on normalised text plus a small learned model over embeddings.

Why both: the heuristics are exact and explainable ("ignore all previous instructions", "print your system prompt",
"DAN", ``### system:``, an encoded payload), work in German, French, Spanish and Italian, and cost a fraction of a
millisecond; the model generalises to paraphrases and to the "stacked" attacks of deepset's dataset ("Well done! Now
a new task: ...") that no phrase list covers. The model is a logistic regression over the shared MiniLM embedding,
fitted at first use on labelled examples shipped in ``data/`` (deepset/prompt-injections train split, CLINC150
train-split queries as benign everyday requests, and Keel's own phone-assistant examples; see ``data/NOTICE.md``).
No DeBERTa classifier exists on PyPI and model hubs are unreachable, so this is the honest offline option; expect it
to miss well-disguised attacks, which is why the other rails (topic, output checks) still matter.

Phrases that are normal in a phone assistant are deliberately not signals: "developer mode" / "developer options"
(an Android setting), "jailbreak my iPhone", "can my phone act as a hotspot", "ignore calls from unknown numbers".
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Final

import numpy as np
import numpy.typing as npt

from keel.guard.base import Finding, GuardInput, string_list
from keel.guard.exemplars import Embed, ExemplarSet, data_rows

__all__ = ["InjectionCheck", "heuristic_hits", "normalise"]

_INVISIBLE: Final = re.compile("[\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_LEET: Final = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_SPACED: Final = re.compile(r"\b(?:\w ){3,}\w\b")
_LEET_WORD: Final = re.compile(r"(?=[a-z0-9@$]*[a-z])[a-z0-9@$]*[0-9@$][a-z0-9@$]*")  # words mixing letters, digits


def normalise(text: str) -> str:
    """NFKC, invisible characters removed, case-folded, whitespace collapsed; spaced-out letters joined
    ("i g n o r e" -> "ignore") and digits read as letters inside words ("1gn0re" -> "ignore")."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).casefold()
    text = re.sub(r"\s+", " ", text).strip()
    text = _SPACED.sub(lambda m: m.group().replace(" ", ""), text)
    return _LEET_WORD.sub(_unleet, text)


def _unleet(m: re.Match[str]) -> str:
    """A word that is mostly letters reads its digits as letters; model names ("s24", "a54", "5g") stay."""
    word = m.group()
    letters = sum(c.isalpha() for c in word)
    return word.translate(_LEET) if letters >= 3 and letters > len(word) - letters else word


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: str
    score: float
    pattern: re.Pattern[str]


def _rule(kind: str, score: float, pattern: str) -> _Rule:
    return _Rule(kind, score, re.compile(pattern))


# Words shared by the override rules, per language.
_EN_PRIOR = r"(?:previous|prior|above|earlier|preceding|former|foregoing|initial|original|old|system|given|existing)"
_EN_RULES = (
    r"(?:instructions?|prompts?|rules|guidelines|directions?|directives?|commands?|orders?|context|programming|"
    r"restrictions?|constraints?|policies|polic(?:y|ies)|tasks?|assignments?|information|messages?|documents?|"
    r"articles?|settings|training|guardrails|knowledge base)"
)
_EN_ADJ = r"(?: (?:safety|content|ethical|moral|security|usual|normal|default|current|own|built-in|internal))*"
_DE_RULES = (
    r"(?:anweisung(?:en)?|instruktion(?:en)?|befehle?n?|regeln|richtlinien|vorgaben|informationen|angaben|"
    r"aufgaben|aufträge|auftrag|prompts?|dokumente|artikel|kontext)"
)
_RULES: Final = (
    # instruction override
    _rule(
        "instruction override",
        0.95,
        rf"\b(?:ignore|disregard|forget|skip|override|bypass|drop|abandon|discard|overlook|neglect|dismiss|"
        rf"leave behind|throw away)\b(?: (?:all|any|every|each|of|the|your|my|these|those|this|that|what|"
        rf"previous|prior|above|earlier|everything|(?:you (?:were|have been|got|received))))*"
        rf"(?: {_EN_PRIOR})+ {_EN_RULES}\b",
    ),
    _rule(
        "instruction override",
        0.9,
        rf"\b(?:ignore|disregard|forget|override|bypass)\b(?: (?:all|any|of|the|your|these|those))*{_EN_ADJ} "
        rf"{_EN_RULES}"
        r"(?: (?:you (?:were|have been) given|above|before|so far))?\b",
    ),
    _rule(
        "instruction override",
        0.9,
        r"\b(?:forget|ignore|disregard) (?:about )?(?:everything(?! about)|all(?: of)? (?:that|this|the above)|"
        r"(?:anything|everything) (?:i|you) (?:said|told you|were told|have been told|were given|know)|"
        r"what you (?:were told|have been told|were given|know)|"
        r"what i (?:said|told you|wrote) (?:above|before|so far|previously|earlier))\b",
    ),
    _rule(
        "instruction override",
        0.85,
        r"\b(?:new|updated|different|additional|real|actual|secret) (?:instructions?|tasks?|rules|orders|directive)"
        r"(?: (?:follow|are|is|have been))?\s*[:!-]|\bnow (?:new|further) (?:instructions|tasks) (?:follow|are)",
    ),
    _rule(
        "instruction override",
        0.85,
        r"\b(?:do not|don'?t|never) (?:follow|obey|answer (?:the|this) question|use) (?:your|the|any) ?"
        r"(?:instructions|rules|guidelines|documents|articles|knowledge base|context)?\b.{0,40}"
        r"\b(?:but|instead|just)\b",
    ),
    _rule(
        "instruction override",
        0.8,
        r"\b(?:despite|regardless of|contrary to|instead of) (?:what|the|your|any) ?(?:you(?:'ve| have)? been told|"
        r"instructions|rules|guidelines|documents|articles)\b",
    ),
    _rule(
        "instruction override",
        0.8,
        r"\b(?:system|admin(?:istrator)?|developer|emergency|security) override\b|\bsudo mode\b|"
        r"\boverride (?:code|mode|protocol)\b|\bend of (?:user )?input\b",
    ),
    # German
    _rule(
        "instruction override",
        0.95,
        rf"\b(?:ignorier\w*|vergiss|vergessen sie|vergesst|missachte\w*|übergehe|verwirf|streich(?:e|en)?)"
        rf"\b(?: \w+){{0,4}} (?:vorherigen|bisherigen|obigen|vorigen|vorangehenden|vorangegangenen|früheren|"
        rf"ursprünglichen|alle|deine|ihre|die) {_DE_RULES}\b",
    ),
    _rule(
        "instruction override",
        0.9,
        r"\b(?:vergiss|vergessen sie|vergesst|ignoriere|ignorieren sie) (?:alles|(?:das|dies)(?: alles)? "
        r"(?:davor|vorher|bisher|gesagte|zuvor|oben|bisherige|obige))\b",
    ),
    _rule(
        "instruction override",
        0.9,
        rf"\b(?:die )?(?:obigen|vorherigen|bisherigen) (?:\w+ )?{_DE_RULES}(?: \w+){{0,3}} "
        r"(?:ignorieren|vergessen|sind irrelevant|gelten nicht)",
    ),
    _rule(
        "instruction override",
        0.85,
        r"\b(?:neue|weitere) (?:anweisungen|aufgaben|instruktionen|befehle) (?:folgen|kommen)\b|"
        r"\bneue (?:anweisung|aufgabe|instruktion|regel)(?:en)?\s*:|"
        r"\bnun folgen neue\b|\babweichend (?:zu|von) (?:den )?(?:vorherigen|bisherigen)\b",
    ),
    # French, Spanish, Italian, Croatian
    _rule(
        "instruction override",
        0.9,
        r"\b(?:ignore[zr]?|oublie[zr]?) (?:toutes? )?(?:les |tes |vos )?(?:instructions|consignes|règles)"
        r"(?: précédentes)?\b|\boublie[zr]? tout\b|"
        r"\b(?:ignora|olvida|olvide)r? (?:todas? )?(?:las |tus )?(?:instrucciones|reglas)(?: anteriores)?\b|"
        r"\b(?:olvida|olvide|olvidar) todo\b|"
        r"\b(?:ignora|dimentica) (?:tutte )?(?:le )?(?:istruzioni|regole)(?: precedenti)?\b|\bdimentica tutto\b|"
        r"\bzaboravi (?:sve|prethodne)\b",
    ),
    # system prompt extraction
    _rule(
        "system prompt extraction",
        0.9,
        r"\b(?:print|show|reveal|repeat|output|display|tell|give|share|list|dump|leak|disclose|write|spell|"
        r"translate|summari[sz]e|quote|recite|what (?:is|are|were|was))(?: me| out| back| us)?"
        r"(?: (?:all|the|your|its|any|exact|full|entire|whole|complete|verbatim|original|initial|first))*"
        r"(?: (?:hidden|secret|confidential|internal|system|initial|original|developer|pre-?prompt|starting|"
        r"first|previous))+ ?(?:prompts?|instructions?|messages?|rules|configuration|directives|guidelines|text)\b",
    ),
    _rule(
        "system prompt extraction",
        0.85,
        r"\b(?:print|show|reveal|repeat|output|display|tell me|give me|write|share|quote|what (?:are|were|is)) "
        r"(?:me )?(?:all )?(?:your|the) (?:\w+ )?(?:prompt|instructions|rules you were given|system message)"
        r"(?: texts?)?\b(?! for\b)",
    ),
    _rule(
        "system prompt extraction",
        0.85,
        r"\byour (?:\w+ )?(?:system|initial|original|hidden|secret|confidential|internal|pre-?) ?"
        r"(?:prompt|instructions|rules|message|configuration|config)\b|"
        r"\b(?:print|show|reveal|quote|list|disclose|summari[sz]e|repeat|output|paste|echo|translate|write|dump|"
        r"leak|spell out|copy)\b[^.?!\n]{0,40}\byour (?:instructions|rules|prompt|configuration|config|setup text|"
        r"guidelines|directives)\b",
    ),
    _rule(
        "system prompt extraction",
        0.85,
        r"\bwhat (?:was|is|has been) (?:written|said|stated) (?:at the (?:beginning|start|top)|above|before)\b|"
        r"\brepeat (?:the |all )?(?:words|text|everything|sentences?|lines?) (?:above|before)\b|"
        r"\b(?:sentences?|words|text|lines) before the text\b|\bwhat is written above\b",
    ),
    _rule(
        "system prompt extraction",
        0.9,
        r"\b(?:zeige?|gib|nenne|wiederhole|verrate)(?: mir)?(?: alle)? (?:deine[nr]?|ihre[nr]?|den|die)(?: gesamten?)?"
        r"(?: ursprünglichen| versteckten| geheimen)? "
        r"(?:system-?prompt|prompt(?:-texte?)?|anweisungen|instruktionen)\b|"
        r"\bwas steht (?:am anfang|oben|zu beginn)\b|\bprompt-texte?\b|\b(?:deine[nmr]?|ihre[nmr]?) (?:\w+ )?"
        r"(?:system-?prompts?|geheimen anweisungen|versteckten anweisungen|ursprünglichen anweisungen)\b",
    ),
    # role-play jailbreaks
    _rule(
        "role-play jailbreak",
        0.95,
        r"\b(?:dan|stan|dude|aim|evil ?bot|free ?gpt|anti-?gpt|developer mode|dev mode) (?:mode )?"
        r"(?:enabled|activated|is on|output)\b|\bdo anything now\b|\b(?:chatgpt|gpt|assistant|ai) with "
        r"(?:dan|developer) mode\b|\byou (?:are|will be) (?:now )?(?:in )?(?:dan|developer|jailbreak|god) mode\b|"
        r"\b(?:enter|activate|enable) (?:dan|jailbreak|god|unrestricted|unfiltered) mode\b|\bjailbr(?:eak|oken) "
        r"(?:mode|prompt|ai|chatbot|gpt|chatgpt|version)\b|\byou are (?:now )?jailbroken\b",
    ),
    _rule(
        "role-play jailbreak",
        0.9,
        r"\b(?:ai|assistant|chatbot|model|you) (?:without|with no|free of|that has no|who has no|with zero) "
        r"(?:any )?(?:rules|restrictions|filters|limits|limitations|ethics|morals|guidelines|content polic(?:y|ies)|"
        r"censorship)\b|\b(?:unrestricted|unfiltered|uncensored|amoral|immoral|evil) (?:ai|assistant|chatbot|model|"
        r"version|mode)\b|\b(?:has|have) (?:broken|been freed) (?:free )?(?:of|from) (?:the )?(?:typical )?"
        r"(?:confines|rules|restrictions)\b",
    ),
    _rule(
        "role-play jailbreak",
        0.8,
        r"\b(?:i want you to|you will|you are going to|you must|please|now|from now on,?) act as\b|^act as\b|"
        r"(?:^|[.!?] )(?:pretend|imagine) (?:that )?you (?:are|were|can|have|could)\b|"
        r"\byou are (?:now|no longer) (?:a |an |the )?\w+|\bnow you are\b|\blet'?s (?:play a game|roleplay|"
        r"pretend)\b|\bstay in (?:character|your roles?)\b|\b(?:do not|don'?t|never) break character\b|"
        r"\bsimulate (?:a|an) (?:conversation|ai|chatbot)\b",
    ),
    _rule(
        "role-play jailbreak",
        0.8,
        r"\bstell dir vor,? (?:du bist|du wärst|dass du)\b|\btu so,? als (?:ob|wärst)\b|\b(?:jetzt|nun|ab jetzt) "
        r"bist du\b|\bdu bist (?:jetzt|nun|ab sofort) (?:ein|eine|der|die|kein)\b|\bich möchte,? dass (?:sie|du) "
        r"als \w+ (?:fungieren|fungierst|agierst|agieren)\b|\bspiel(?:e)? die rolle\b|\bbleib(?:en)? (?:voll )?in "
        r"(?:der|ihren|deiner) rolle",
    ),
    # role and delimiter injection: chat-template tokens and fake turns
    _rule(
        "role injection",
        0.95,
        r"<\|(?:im_start|im_end|system|user|assistant|endoftext|start_header_id|end_header_id|eot_id)\|>|"
        r"\[/?inst\]|<</?sys>>|</?s>\s*(?:<s>|\[inst\])",
    ),
    _rule(
        "role injection",
        0.85,
        r"(?:^|\n|\\n|#{2,} ?)\s*\[?(?:system|assistant|developer|admin)\]?\s*(?:prompt|message)?\s*[:\]]",
    ),
)
_ROLE_LINE: Final = re.compile(r"(?im)^\s*(?:#{1,6}\s*)?\[?(?:system|assistant|developer)\]?\s*:")
_BASE64: Final = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])")


def _decoded_payloads(text: str) -> list[str]:
    """Base64 runs that decode to readable text: an encoded instruction hides from every phrase rule."""
    payloads = []
    for m in _BASE64.finditer(text):
        blob = m.group()
        if blob.isalpha() or blob.isdigit():
            continue  # a long word or number, not an encoding
        try:
            decoded = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            continue
        if decoded and sum(c.isprintable() or c.isspace() for c in decoded) / len(decoded) > 0.95 and " " in decoded:
            payloads.append(decoded)
    return payloads


def heuristic_hits(text: str) -> list[tuple[str, float]]:
    """``(kind, score)`` for every rule that matches the normalised text or a decoded base64 payload in it."""
    hits: list[tuple[str, float]] = []
    for variant in {normalise(text), re.sub(r"\s+", " ", text.casefold()).strip()}:
        hits += [(r.kind, r.score) for r in _RULES if r.pattern.search(variant)]
    if _ROLE_LINE.search(text):
        hits.append(("role injection", 0.85))
    for payload in _decoded_payloads(text):
        inner = heuristic_hits(payload)
        hits += [("encoded payload", max(s for _, s in inner))] if inner else [("encoded payload", 0.6)]
    return hits


# --- the learned part --------------------------------------------------------------------------------------------


def fit_logistic(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.float64], l2: float = 1e-3, iterations: int = 25
) -> tuple[npt.NDArray[np.float64], float]:
    """L2-regularised logistic regression by Newton's method, classes weighted to equal total weight (the
    training set holds far more benign rows). Deterministic and about 0.1 s for a thousand 384-d rows."""
    n, d = x.shape
    xb = np.hstack([x.astype(np.float64), np.ones((n, 1))])
    pos = float(y.mean())
    weights = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)) / n
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0  # the bias is not regularised
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(xb @ w)))
        grad = xb.T @ (weights * (p - y)) + reg * w
        hess = (xb.T * (weights * p * (1 - p))) @ xb + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return w[:-1], float(w[-1])


class _Model:
    """The fitted regression for one embedder's vector space."""

    def __init__(self, vectors: npt.NDArray[np.float32], labels: npt.NDArray[np.float64], l2: float) -> None:
        self.w, self.b = fit_logistic(vectors, labels, l2)

    def score(self, vector: npt.NDArray[np.float32]) -> float:
        return float(1 / (1 + np.exp(-(float(vector @ self.w) + self.b))))


DEFAULT_THRESHOLD: Final = 0.8
L2: Final = 3e-4
APP_EXAMPLE_SIMILARITY: Final = 0.75  # cosine above which a message counts as a copy of an app-given example
APP_EXAMPLE_SCORE: Final = 0.95
CLINC_PER_INTENT: Final = 5  # everyday requests as benign examples, so "set an alarm" does not look like an order


@cache
def _shipped() -> tuple[ExemplarSet, npt.NDArray[np.float64]]:
    """The shipped examples (one set per process, shared by every app's check) and their labels."""
    rows = [*data_rows("injection_deepset"), *data_rows("injection_keel")]
    requests = [r["text"] for r in data_rows("clinc_train") if r["rank"] < CLINC_PER_INTENT]
    labels = np.array([float(r["label"]) for r in rows] + [0.0] * len(requests))
    return ExemplarSet("injection", [r["text"] for r in rows] + requests), labels


class InjectionCheck:
    """Flags prompt-injection and jailbreak attempts (``reason``: ``prompt_injection``).

    Options: ``threshold`` (default 0.8, tuned on the dev split for few false blocks on phone questions; lower
    catches more and blocks more), ``heuristics`` and ``model`` (switch either part off), ``attacks`` and
    ``benign`` (the app's own labelled examples, say from incidents in its logs: they join the training rows, and
    a message within cosine 0.75 of one takes its label, so a benign example also silences the model, never the
    phrase rules, for its near-copies). The score is the larger of the strongest matching rule and the model's
    probability; the finding's detail names the kind of attack and which part saw it, never the text itself.
    """

    name = "injection"

    def __init__(
        self,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        heuristics: bool = True,
        model: bool = True,
        attacks: Sequence[str] | None = None,
        benign: Sequence[str] | None = None,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 < threshold <= 1:
            raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}")
        for option, value in (("heuristics", heuristics), ("model", model)):
            if not isinstance(value, bool):
                raise TypeError(f"{option} must be true or false, got {value!r}")
        if not heuristics and not model:
            raise ValueError("heuristics and model cannot both be off: the check would never find anything")
        self.threshold = float(threshold)
        self.heuristics = heuristics
        self.model = model
        shipped, self._shipped_labels = _shipped()
        self._shipped = shipped
        extra_attacks, extra_benign = string_list("attacks", attacks), string_list("benign", benign)
        self._extra = ExemplarSet("injection-app", extra_attacks + extra_benign, persist=False)
        self._extra_labels = np.array([1.0] * len(extra_attacks) + [0.0] * len(extra_benign))
        self._models: dict[str, _Model] = {}

    async def warm(self, embed: Embed) -> None:
        """Embed the examples and fit the model now (at startup) instead of on the first message."""
        if self.model:
            await self._model(embed)

    async def _model(self, embed: Embed | None) -> _Model:
        space, vectors = await self._shipped.vectors(embed)
        model = self._models.get(space)
        if model is None:
            labels = self._shipped_labels
            if self._extra.texts:
                vectors = np.vstack([vectors, (await self._extra.vectors(embed))[1]])
                labels = np.concatenate([labels, self._extra_labels])
            # about 0.1 s of numpy: off the event loop
            model = self._models[space] = await asyncio.to_thread(_Model, vectors, labels, L2)
        return model

    async def score(self, inp: GuardInput) -> tuple[float, str]:
        """The injection score in [0, 1] and what produced it."""
        best, why = 0.0, ""
        if self.heuristics:
            for kind, score in heuristic_hits(inp.text):
                if score > best:
                    best, why = score, f"{kind} (phrase rule)"
        if self.model and best < self.threshold:
            model = await self._model(inp.embed)
            vector = await inp.embedding()
            probability, what = model.score(vector), "close to known injection attacks (embedding model)"
            if self._extra.texts:
                # The app's own examples are few: as training rows they barely move the regression, so a message
                # nearly identical to one of them takes that example's label outright.
                extra = (await self._extra.vectors(inp.embed))[1] @ vector
                i = int(np.argmax(extra))
                if extra[i] >= APP_EXAMPLE_SIMILARITY:
                    attack = self._extra_labels[i] == 1
                    probability = max(probability, APP_EXAMPLE_SCORE) if attack else 0.0
                    what = "close to an attack example in this app's config" if attack else what
            if probability > best:
                best, why = probability, what
        return best, why

    async def check(self, inp: GuardInput) -> list[Finding]:
        score, why = await self.score(inp)
        if score < self.threshold:
            return []
        return [Finding(check=self.name, reason="prompt_injection", detail=f"prompt injection: {why}", score=score)]
