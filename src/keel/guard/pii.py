"""PII recognizers (precompiled regexes plus validators) and the two checks built on them.

Why not Presidio: it is a heavy dependency for what its offline mode does (regexes and checksums; names need a
spaCy model that is not on PyPI), and here every recognizer must fit in a fraction of the input rail's 15 ms. What
can be validated is: Luhn for cards, mod-97 for IBANs, check letters for Spanish and Italian ids, Verhoeff for
Aadhaar, octet ranges for IPs. Phone numbers cannot be validated, and a smartphone
assistant's traffic is full of numbers ("Galaxy S24", "5000 mAh", "6.1-inch", "$799", "1080 x 2400"), so a number
is a phone only in a phone-shaped format (``+44 20 7946 0958``, ``(415) 555-0132``, ``020 7946 0958``) or, when it
is merely a digit group, next to a cue ("call", "tel", "fax", "Phone:", "... office").

Recognized entities and how each is decided (scores are compared with ``threshold``, default 0.5):

=================  ==========================================================================================
EMAIL_ADDRESS      RFC-shaped address with a dotted domain and an alphabetic TLD (0.95)
PHONE_NUMBER       ``+``/``00`` international (0.9), North-American 3-3-4 (0.85), national trunk ``0...`` with
                   9-12 digits (0.75), French pairs (0.75); any other 7-15 digit group only next to a cue (0.7)
CREDIT_CARD        12-19 digits, issuer prefix (Visa, Mastercard, Amex, Discover, JCB, Diners, Maestro,
                   UnionPay) and Luhn (1.0)
IBAN_CODE          country code, the country's registered length, mod-97 == 1 (1.0)
US_SSN             ``AAA-GG-SSSS`` with valid area/group/serial (0.85); spaced or bare only after "SSN" (0.75)
UK_NINO            National Insurance number: allowed prefix letters, 6 digits, suffix A-D (0.85; no checksum)
ES_NIF             Spanish DNI/NIE with its mod-23 check letter (1.0)
IT_FISCAL_CODE     Italian codice fiscale with its check character (1.0)
IN_AADHAAR         12 digits grouped 4-4-4 with Verhoeff check (0.85); ungrouped only after "Aadhaar" (0.8)
IN_PAN             Indian PAN: 5 letters (4th a holder type), 4 digits, 1 letter (0.8; no checksum)
IP_ADDRESS         IPv4 (octets <= 255, not a version string) or IPv6, validated by :mod:`ipaddress` (0.9)
PERSON             only after an explicit cue ("my name is", "I'm", "Name:", "Mr."): low recall by design;
                   not in the default set (0.7)
=================  ==========================================================================================
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from keel.guard.base import Finding, GuardInput, Span, string_list

__all__ = [
    "DEFAULT_ENTITIES",
    "ENTITIES",
    "ContactDetailsCheck",
    "Match",
    "PiiCheck",
    "find_emails",
    "find_phones",
    "find_urls",
    "scan",
]


@dataclass(frozen=True, slots=True)
class Match:
    """One recognized entity: ``text[start:end]``, with the recognizer's confidence."""

    entity: str
    start: int
    end: int
    score: float

    @property
    def span(self) -> Span:
        return Span(self.start, self.end, self.entity)


def _words(text: str) -> list[str]:
    return text.split()


# --- emails and URLs ---------------------------------------------------------------------------------------------

_EMAIL: Final = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)


def find_emails(text: str) -> Iterator[Match]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        yield Match("EMAIL_ADDRESS", m.start(), m.end(), 0.95)


# Bare domains (no scheme, no www.) count only with a TLD people actually write, so "Node.js" or "e.g." do not.
_TLDS: Final = (
    "com|org|net|edu|gov|info|biz|io|co|ai|app|dev|me|tv|us|uk|de|fr|es|it|nl|be|ch|at|se|no|dk|fi|pl|cz|pt|ie|"
    "in|jp|cn|kr|au|nz|ca|br|mx|ru|za|sg|hk|tw"
)
_URL: Final = re.compile(
    r"(?i)(?<![\w@.-])(?:(?:https?://|www\.)[^\s<>\"'`]+"
    rf"|(?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?\.)+(?:{_TLDS})(?![\w-])(?:/[^\s<>\"'`]*)?)"
)
_URL_TRAILING: Final = ".,;:!?'\")]}*_"


def find_urls(text: str) -> Iterator[Match]:
    """Links with a scheme or ``www.``, and bare ``host.tld/path`` with a common TLD; trailing punctuation is
    left out (a sentence-ending period, a closing parenthesis that was not opened in the URL)."""
    if "." not in text:
        return
    for m in _URL.finditer(text):
        start, end = m.start(), m.end()
        while end > start and text[end - 1] in _URL_TRAILING:
            if text[end - 1] == ")" and text.count("(", start, end) >= text.count(")", start, end):
                break
            end -= 1
        if end - start > 4:
            yield Match("URL", start, end, 0.9)


# --- phone numbers -----------------------------------------------------------------------------------------------

# Digit groups joined by one separator each: a dash (maybe spaced), a dot or slash (never spaced, so a sentence
# end does not join two numbers), or a space; a group may start with a parenthesised area code or trunk "(0)".
_PHONE_CANDIDATE: Final = re.compile(
    r"(?<![\w+#$€£¥₹./:-])(?<!\d,)"  # not glued to a word, a price, a path, another number or a decimal
    r"(?:\+[ \t]?)?(?:\(\+?\d{1,5}\)[ \t]?)?\d{1,15}"
    r"(?:(?:[ \t]?-[ \t]?|[./]|[ \t])(?:\(\d{1,5}\)[ \t]?)?\d{1,15}){0,7}"
    r"(?:[ \t]?(?:x|ext\.?|extension)[ \t]?\d{1,6})?"  # extension
    r"(?![\w/]|-\d|[.,]\d)"
)
_EXTENSION: Final = re.compile(r"[ \t]?(?:x|ext\.?|extension)[ \t]?\d{1,6}$")
_NANP: Final = re.compile(r"(?:\+?1[ .-]?|001[ .-]?)?(?:\(\d{3}\)[ ]?|\d{3}([.-]))\d{3}[.-]\d{4}")
_NANP_SPACED: Final = re.compile(r"(?:\+?1[ ]?)?\(?\d{3}\)? \d{3} \d{4}")
_FRENCH_PAIRS: Final = re.compile(r"0\d([ .-])\d{2}(?:\1\d{2}){3}")
_SSN_SHAPE: Final = re.compile(r"\d{3}-\d{2}-\d{4}")
_DATE: Final = re.compile(
    r"(?:19|20)\d{2}([-./ ])(?:0?[1-9]|1[0-2])\1(?:0?[1-9]|[12]\d|3[01])"
    r"|(?:0?[1-9]|[12]\d|3[01])([-./ ])(?:0?[1-9]|1[0-2])\2(?:19|20)?\d{2}"
    r"|(?:0?[1-9]|1[0-2])([-./ ])(?:0?[1-9]|[12]\d|3[01])\3(?:19|20)\d{2}"
    r"|(?:19|20)\d{2} ?[-/] ?(?:19|20)\d{2}"
)
# A number is a phone number when one of these is close before it ("call", "Tel:", "reach me at") ...
_PHONE_CUE_BEFORE: Final = re.compile(
    r"(?i)(?:\b(?:call(?:ing|ed)?(?:\s+(?:me|us|them|him|her))?|ring|dial(?:ling)?|text\s+me|sms|whats\s?app|"
    r"contact\s+(?:me|us)|reach(?:\s+(?:me|us|them|him|her))?|answering|anrufen|erreichbar|"
    r"(?:my|our|your|his|her|their)\s+(?:new\s+)?number|"
    # a bare "phone" or "mobile" is everywhere in a phone assistant: as a cue it must be a label
    r"(?:phone|mobile|cell(?:phone)?|tel(?:ephone)?|fax|hotline|helpline|contact|landline|telefon|handy|"
    r"t[ée]l[ée]phone|portable)(?:\s*(?:number|no\.?|nr\.?|#))?\s*[:#]|"
    r"(?:phone|mobile|cell|contact|fax|telephone|whats\s?app|telefon|handy)\s*(?:number|no\.?|nr\.?|#)|"
    r"telefonnummer|rufnummer|handynummer)(?!\w)|\b(?:ph|tel|mob|fax)\.|[☎📞])[^\n\d]{0,24}$"
)
# ... or a label right after it, as in address blocks ("020 7946 0958 office").
_PHONE_CUE_AFTER: Final = re.compile(
    r"(?i)^[ \t]?[-(,]?[ \t]?(?:office|fax|mobile|cell|home|work|landline|direct|phone|tel)\b"
)
# Specs and prices: a number followed by a unit or preceded by a currency is never a phone number.
_UNIT_AFTER: Final = re.compile(
    r"(?i)^[ \t]?(?:mah|wh|hz|khz|mhz|ghz|gb|tb|mb|kb|mp|px|pixels?|nits|ppi|fps|mm|cm|inch(?:es)?|in\b|\"|w\b|"
    r"watts?|v\b|volts?|g\b|grams?|kg|%|x\s?\d|×|k\b|inr|usd|eur|gbp|rs\b|rupees|dollars|euros|pounds|yen|"  # noqa: RUF001
    r"cycles|years?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|units|reviews|ratings|downloads|users|times)"
)
_CURRENCY_BEFORE: Final = re.compile(r"(?i)(?:[$€£¥₹]|\b(?:rs\.?|inr|usd|eur|gbp|price|costs?|imei|serial|sn)\s*)$")


def _phone_score(raw: str, before: str, after: str) -> float:
    """How phone-like one candidate is, from its shape and its neighbours; 0 when it is not a phone number."""
    body = _EXTENSION.sub("", raw)
    digits = sum(c.isdigit() for c in body)
    if not 7 <= digits <= 15 or _UNIT_AFTER.match(after) or _CURRENCY_BEFORE.search(before):
        return 0.0
    if len(set(c for c in body if c.isdigit())) <= 2 or body.startswith("000") or _SSN_SHAPE.fullmatch(body):
        return 0.0  # placeholders (0000000000), no dialling prefix starts 000, and 3-2-4 is an SSN
    dotted = body.count(".") >= 3 and "(" not in body and body.replace(".", "").isdigit()  # a version or build
    if (_DATE.fullmatch(body) or dotted) and not (_NANP.fullmatch(body) or _FRENCH_PAIRS.fullmatch(body)):
        return 0.0
    cue = bool(_PHONE_CUE_BEFORE.search(before[-40:]) or _PHONE_CUE_AFTER.match(after))
    if body.startswith(("+", "(+")):
        return 0.9 if digits >= 8 else 0.0
    if body.startswith("00") and digits >= 10 and body[2] != "0":
        return 0.85
    if _NANP.fullmatch(body):
        return 0.85
    if _NANP_SPACED.fullmatch(body) or _FRENCH_PAIRS.fullmatch(body):
        return 0.75
    separated = any(c in body for c in " ().-")
    if body.lstrip("(").startswith("0") and 9 <= digits <= 12 and (separated or digits in (10, 11)):
        return 0.75
    return 0.7 if cue else 0.0


def find_phones(text: str) -> Iterator[Match]:
    for m in _PHONE_CANDIDATE.finditer(text):
        start, end = m.start(), m.end()
        raw = m.group()
        score = _phone_score(raw, text[max(0, start - 40) : start], text[end : end + 16])
        if score:
            yield Match("PHONE_NUMBER", start, end, score)


# --- payment and bank --------------------------------------------------------------------------------------------

_CARD: Final = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){11,18}(?![\w-]|[.,]\d)")
_CARD_PREFIX: Final = re.compile(
    r"4\d{12}(?:\d{3}|\d{6})?"  # Visa 13/16/19
    r"|(?:5[1-5]\d{2}|222[1-9]|22[3-9]\d|2[3-6]\d{2}|27[01]\d|2720)\d{12}"  # Mastercard
    r"|3[47]\d{13}"  # American Express
    r"|3(?:0[0-5]|[68]\d)\d{11,16}"  # Diners Club
    r"|6(?:011|4[4-9]\d|5\d{2})\d{12,15}"  # Discover
    r"|35(?:2[89]|[3-8]\d)\d{12,15}|(?:2131|1800)\d{11}"  # JCB
    r"|62\d{14,17}"  # UnionPay
    r"|(?:5[06-9]|6\d)\d{10,17}"  # Maestro
)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def find_cards(text: str) -> Iterator[Match]:
    for m in _CARD.finditer(text):
        raw = m.group()
        groups = re.split(r"[ -]", raw)
        if len(groups) > 1 and (len({c for c in raw if c in " -"}) > 1 or min(len(g) for g in groups[:-1]) < 4):
            continue  # mixed separators or short groups: a list of numbers, not one card
        digits = "".join(groups)
        if _CARD_PREFIX.fullmatch(digits) and luhn_ok(digits) and len(set(digits)) > 1:
            yield Match("CREDIT_CARD", m.start(), m.end(), 1.0)


_IBAN_LENGTHS: Final = {  # the SWIFT IBAN registry: country code and total length
    code[:2]: int(code[2:])
    for code in _words(
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 "
        "EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HN28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 "
        "KW30 KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 "
        "PK24 PL28 PS29 PT25 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 "
        "UA29 VA22 VG24 XK20 YE30"
    )
}
_IBAN: Final = re.compile(r"(?i)(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")


def iban_ok(iban: str) -> bool:
    """Country length and ISO 7064 mod-97 on an upper-case IBAN without spaces."""
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def find_ibans(text: str) -> Iterator[Match]:
    for m in _IBAN.finditer(text):
        raw = m.group()
        length = _IBAN_LENGTHS.get(raw[:2].upper())
        if length is None:
            continue
        # The regex may run into the next word: keep exactly the country's length of characters.
        taken, end = 0, 0
        for end, ch in enumerate(raw, start=1):  # noqa: B007 - end is used after the loop
            taken += ch != " "
            if taken == length:
                break
        if taken != length or (m.start() + end < len(text) and text[m.start() + end].isalnum()):
            continue
        if iban_ok(raw[:end].replace(" ", "").upper()):
            yield Match("IBAN_CODE", m.start(), m.start() + end, 1.0)


# --- national identifiers ----------------------------------------------------------------------------------------

_SSN: Final = re.compile(r"(?<![\w.-])(\d{3})([- ]?)(\d{2})\2(\d{4})(?![\w-]|[.,]\d)")
_SSN_CUE: Final = re.compile(r"(?i)\b(?:ssn|ss#|social\s+security(?:\s+(?:number|no\.?|#))?)\W{0,12}$")


def find_us_ssn(text: str) -> Iterator[Match]:
    for m in _SSN.finditer(text):
        area, sep, group, serial = m.groups()
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        if len(set(area + group + serial)) == 1:
            continue
        if sep == "-":
            yield Match("US_SSN", m.start(), m.end(), 0.85)
        elif _SSN_CUE.search(text[max(0, m.start() - 40) : m.start()]):
            yield Match("US_SSN", m.start(), m.end(), 0.75)


_NINO: Final = re.compile(
    r"(?i)(?<![\w-])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![\w-])"
)


def find_uk_nino(text: str) -> Iterator[Match]:
    for m in _NINO.finditer(text):
        yield Match("UK_NINO", m.start(), m.end(), 0.85)


_NIF: Final = re.compile(r"(?i)(?<![\w-])(?:([XYZ])-?(\d{7})|(\d{8}))-?([A-Z])(?![\w-])")
_NIF_LETTERS: Final = "TRWAGMYFPDXBNJZSQVHLCKE"


def find_es_nif(text: str) -> Iterator[Match]:
    for m in _NIF.finditer(text):
        nie, nie_digits, dni, letter = m.groups()
        number = int(str("XYZ".index(nie.upper())) + nie_digits) if nie else int(dni)
        if _NIF_LETTERS[number % 23] == letter.upper():
            yield Match("ES_NIF", m.start(), m.end(), 1.0)


_CF: Final = re.compile(r"(?i)(?<![\w-])[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z](?![\w-])")
_CF_ODD: Final = [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8, 12, 14, 16, 10, 22, 25, 24, 23]


def _cf_value(ch: str, odd: bool) -> int:
    index = int(ch) if ch.isdigit() else ord(ch) - 65
    return _CF_ODD[index] if odd else index


def find_it_fiscal_code(text: str) -> Iterator[Match]:
    for m in _CF.finditer(text):
        code = m.group().upper()
        total = sum(_cf_value(c, i % 2 == 0) for i, c in enumerate(code[:15]))
        if chr(65 + total % 26) == code[15]:
            yield Match("IT_FISCAL_CODE", m.start(), m.end(), 1.0)


_AADHAAR: Final = re.compile(r"(?<![\w.-])[2-9]\d{3}([ -]?)\d{4}\1\d{4}(?![\w-]|[.,]\d)")
_AADHAAR_CUE: Final = re.compile(r"(?i)\b(?:aadhaa?r|uidai|uid)\b[^\n\d]{0,20}$")
_VERHOEFF_D: Final = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_VERHOEFF_P: Final = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
]


def verhoeff_ok(digits: str) -> bool:
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VERHOEFF_D[c][_VERHOEFF_P[i % 8][ord(ch) - 48]]
    return c == 0


def find_in_aadhaar(text: str) -> Iterator[Match]:
    for m in _AADHAAR.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if not verhoeff_ok(digits):
            continue
        if m.group(1):
            yield Match("IN_AADHAAR", m.start(), m.end(), 0.85)
        elif _AADHAAR_CUE.search(text[max(0, m.start() - 40) : m.start()]):
            yield Match("IN_AADHAAR", m.start(), m.end(), 0.8)


_PAN: Final = re.compile(r"(?<![\w-])[A-Z]{3}[ABCFGHJLPT][A-Z]\d{4}[A-Z](?![\w-])")


def find_in_pan(text: str) -> Iterator[Match]:
    for m in _PAN.finditer(text):
        yield Match("IN_PAN", m.start(), m.end(), 0.8)


# --- network -----------------------------------------------------------------------------------------------------

_IPV4: Final = re.compile(r"(?<![\w.-])(?:\d{1,3}\.){3}\d{1,3}(?![\w-]|\.\d)")
_IPV6: Final = re.compile(
    r"(?i)(?<![\w:.-])(?:[0-9a-f]{0,4}:){2,7}(?:[0-9a-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:-])"
)
_VERSION_BEFORE: Final = re.compile(r"(?i)\b(?:version|ver|v|build|firmware|release|ios|android|os|update)\.?\s*$")


def find_ips(text: str) -> Iterator[Match]:
    if "." in text:
        for m in _IPV4.finditer(text):
            if _VERSION_BEFORE.search(text[max(0, m.start() - 20) : m.start()]):
                continue
            try:
                ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            yield Match("IP_ADDRESS", m.start(), m.end(), 0.9)
    if text.count(":") >= 2:
        for m in _IPV6.finditer(text):
            raw = m.group()
            if sum(1 for g in raw.split(":") if g) < 2 or not any(c.isdigit() for c in raw):
                continue
            try:
                ipaddress.IPv6Address(raw)
            except ValueError:
                continue
            yield Match("IP_ADDRESS", m.start(), m.end(), 0.9)


# --- names -------------------------------------------------------------------------------------------------------

_NAME: Final = r"[A-Z][a-zà-öø-ÿ'’-]+(?: [A-Z]\.)?(?: (?:[A-Z][a-zà-öø-ÿ'’-]+|[A-Z]'[A-Z][a-z]+)){0,2}"  # noqa: RUF001
_PERSON: Final = re.compile(
    r"(?:\b(?i:my name is|my name's|name is|i am|i'm|i’m|this is|call me|signed|regards,|sincerely,|"  # noqa: RUF001
    r"name:|full name:|yours truly,)\s+|\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+)"
    rf"({_NAME})"
)
# "I'm Looking ..." and "This is Samsung's ..." are not introductions: capitalised words that are not names.
_NOT_NAMES: Final = frozenset(
    _words(
        "a an the not so very just really here there sure fine good great happy sorry glad new back done ok okay "
        "looking trying wondering going interested planning thinking curious confused using having getting buying "
        "unable able afraid also still from in on at with about for asking calling writing contacting "
        "apple samsung google pixel iphone galaxy android ios oneplus xiaomi huawei motorola nokia sony oppo vivo "
        "realme honor nothing asus lg windows mac macbook ipad airpods it this that what which my your"
    )
)


def find_persons(text: str) -> Iterator[Match]:
    for m in _PERSON.finditer(text):
        name = m.group(1)
        first = re.sub(r"['’]s$", "", name.split()[0].lower())  # noqa: RUF001 - "Samsung's" is "samsung"
        if first in _NOT_NAMES:
            continue
        yield Match("PERSON", m.start(1), m.end(1), 0.7)


# --- the registry and the checks ---------------------------------------------------------------------------------

_RECOGNIZERS: Final[dict[str, Callable[[str], Iterable[Match]]]] = {
    "CREDIT_CARD": find_cards,
    "IBAN_CODE": find_ibans,
    "EMAIL_ADDRESS": find_emails,
    "US_SSN": find_us_ssn,
    "UK_NINO": find_uk_nino,
    "ES_NIF": find_es_nif,
    "IT_FISCAL_CODE": find_it_fiscal_code,
    "IN_AADHAAR": find_in_aadhaar,
    "IN_PAN": find_in_pan,
    "IP_ADDRESS": find_ips,
    "PHONE_NUMBER": find_phones,
    "PERSON": find_persons,
}
ENTITIES: Final = tuple(_RECOGNIZERS)
DEFAULT_ENTITIES: Final = tuple(e for e in ENTITIES if e != "PERSON")
_REASONS: Final = {
    "EMAIL_ADDRESS": "pii.email",
    "PHONE_NUMBER": "pii.phone",
    "CREDIT_CARD": "pii.credit_card",
    "IBAN_CODE": "pii.iban",
    "US_SSN": "pii.us_ssn",
    "UK_NINO": "pii.uk_nino",
    "ES_NIF": "pii.es_nif",
    "IT_FISCAL_CODE": "pii.it_fiscal_code",
    "IN_AADHAAR": "pii.in_aadhaar",
    "IN_PAN": "pii.in_pan",
    "IP_ADDRESS": "pii.ip_address",
    "PERSON": "pii.person",
}
_LABELS: Final = {
    "EMAIL_ADDRESS": "email address",
    "PHONE_NUMBER": "phone number",
    "CREDIT_CARD": "payment card number",
    "IBAN_CODE": "IBAN",
    "US_SSN": "US social security number",
    "UK_NINO": "UK national insurance number",
    "ES_NIF": "Spanish DNI/NIE",
    "IT_FISCAL_CODE": "Italian fiscal code",
    "IN_AADHAAR": "Aadhaar number",
    "IN_PAN": "Indian PAN",
    "IP_ADDRESS": "IP address",
    "PERSON": "person name",
}


def scan(text: str, entities: Iterable[str] = DEFAULT_ENTITIES, threshold: float = 0.5) -> list[Match]:
    """Non-overlapping matches in text order. Where recognizers overlap, the higher score wins, then the longer
    match, then the entity listed first in :data:`ENTITIES` (a Luhn-valid card beats a phone-shaped reading)."""
    priority = {e: i for i, e in enumerate(ENTITIES)}
    found = [m for e in entities for m in _RECOGNIZERS[e](text) if m.score >= threshold]
    found.sort(key=lambda m: (-m.score, m.start - m.end, priority[m.entity]))
    kept: list[Match] = []
    for m in found:
        if all(m.end <= k.start or m.start >= k.end for k in kept):
            kept.append(m)
    return sorted(kept, key=lambda m: m.start)


def _normal(value: str) -> str:
    """Comparison form for allow lists: case-folded, without spaces and punctuation separators."""
    return re.sub(r"[\s().\-]", "", value).casefold()


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number between 0 and 1, got {threshold!r}")
    return float(threshold)


def _plural(n: int, label: str) -> str:
    return f"{n} {label}" + ("" if n == 1 else "s")


class PiiCheck:
    """Finds personal data in a message (input: redact before it reaches the model; output: a leak).

    Options: ``entities`` (default :data:`DEFAULT_ENTITIES`; ``PERSON`` is opt-in), ``threshold`` (default 0.5:
    0.7 and above drops cue-only phone numbers), ``allow`` (values never reported, such as the support line the
    app itself publishes; compared without case, spaces or separators). One finding per entity type, with every
    span, so the runner can redact them all.
    """

    name = "pii"

    def __init__(
        self, *, entities: Sequence[str] | None = None, threshold: float = 0.5, allow: Sequence[str] | None = None
    ) -> None:
        chosen = string_list("entities", entities) if entities is not None else list(DEFAULT_ENTITIES)
        unknown = [e for e in chosen if e not in _RECOGNIZERS]
        if unknown:
            raise ValueError(f"entities: unknown {', '.join(unknown)}; known: {', '.join(ENTITIES)}")
        if not chosen:
            raise ValueError("entities must name at least one entity")
        self.entities = tuple(dict.fromkeys(chosen))
        self.threshold = _check_threshold(threshold)
        self.allow = frozenset(_normal(v) for v in string_list("allow", allow))

    def find(self, text: str) -> list[Match]:
        matches = scan(text, self.entities, self.threshold)
        if self.allow:
            matches = [m for m in matches if _normal(text[m.start : m.end]) not in self.allow]
        return matches

    async def check(self, inp: GuardInput) -> list[Finding]:
        by_entity: dict[str, list[Match]] = {}
        for m in self.find(inp.text):
            by_entity.setdefault(m.entity, []).append(m)
        return [
            Finding(
                check=self.name,
                reason=_REASONS[entity],
                detail=f"{_plural(len(ms), _LABELS[entity])} in the {inp.direction}",
                score=max(m.score for m in ms),
                spans=tuple(m.span for m in ms),
            )
            for entity, ms in by_entity.items()
        ]


# --- contact details in answers ----------------------------------------------------------------------------------

KINDS: Final = ("url", "email", "phone")


def _url_key(url: str) -> str:
    """Host (lower case, no ``www.``, no default port) and path (no trailing slash); query and fragment dropped."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    host = (parts.hostname or "").removeprefix("www.")
    return host + parts.path.rstrip("/").lower()


def _phone_key(phone: str) -> str:
    """Digits without the extension, the ``+``/``00`` prefix or the trunk 0, so national and international writings
    of one number share a suffix."""
    return re.sub(r"\D", "", _EXTENSION.sub("", phone)).lstrip("0")


def _same_phone(a: str, b: str) -> bool:
    short, long = sorted((a, b), key=len)
    return len(short) >= 7 and long.endswith(short)


class ContactDetailsCheck:
    """Flags URLs, email addresses and phone numbers in an answer that the retrieved knowledge does not contain:
    a model that invents a support line or a product page sends customers somewhere real and wrong.

    Sources of truth: ``GuardInput.context`` and, by default, the system prompt (``trust_system_prompt``).
    Comparison: URLs by host and path (an answer URL may be less specific than a known one: ``apple.com`` is
    supported by ``https://www.apple.com/iphone``), emails without case, phone numbers by digits (``+44 20 7946
    0958`` equals ``020 7946 0958``). Options: ``kinds`` (``url``, ``email``, ``phone``; default all), ``allow``
    (domains, emails or numbers always acceptable, such as the app's own site), ``threshold`` (for phone
    numbers, as in :class:`PiiCheck`). Limitation: details the user typed in the question are not visible here,
    so an answer that repeats the user's own number is flagged unless the number is in the context.
    """

    name = "contact_details"

    def __init__(
        self,
        *,
        kinds: Sequence[str] | None = None,
        allow: Sequence[str] | None = None,
        threshold: float = 0.5,
        trust_system_prompt: bool = True,
    ) -> None:
        chosen = string_list("kinds", kinds) if kinds is not None else list(KINDS)
        unknown = [k for k in chosen if k not in KINDS]
        if unknown or not chosen:
            raise ValueError(f"kinds: unknown {', '.join(unknown) or '(empty list)'}; known: {', '.join(KINDS)}")
        if not isinstance(trust_system_prompt, bool):
            raise TypeError(f"trust_system_prompt must be true or false, got {trust_system_prompt!r}")
        self.kinds = tuple(dict.fromkeys(chosen))
        self.threshold = _check_threshold(threshold)
        self.trust_system_prompt = trust_system_prompt
        allowed = string_list("allow", allow)
        self._allow_emails = {a.casefold() for a in allowed if "@" in a}
        self._allow_urls = [_url_key(a) for a in allowed if "@" not in a and re.search(r"[a-z]", a, re.I)]
        self._allow_phones = [_phone_key(a) for a in allowed if not re.search(r"[a-z@]", a, re.I)]

    def _find(self, text: str) -> dict[str, list[Match]]:
        found: dict[str, list[Match]] = {k: [] for k in self.kinds}
        emails = list(find_emails(text))
        if "email" in self.kinds:
            found["email"] = emails
        if "url" in self.kinds:
            found["url"] = [u for u in find_urls(text) if all(u.end <= e.start or u.start >= e.end for e in emails)]
        if "phone" in self.kinds:
            found["phone"] = [p for p in find_phones(text) if p.score >= self.threshold]
        return found

    async def check(self, inp: GuardInput) -> list[Finding]:
        found = self._find(inp.text)
        if not any(found.values()):
            return []
        trusted = "\n".join(t for t in (inp.context, inp.system_prompt if self.trust_system_prompt else None) if t)
        known = self._find(trusted) if trusted else {k: [] for k in self.kinds}
        emails = self._allow_emails | {trusted[m.start : m.end].casefold() for m in known.get("email", [])}
        urls = [_url_key(trusted[m.start : m.end]) for m in known.get("url", [])]
        urls += [_url_key(e.split("@", 1)[1]) for e in emails]  # a domain the context names in an address
        phones = self._allow_phones + [_phone_key(trusted[m.start : m.end]) for m in known.get("phone", [])]

        def supported(kind: str, m: Match) -> bool:
            value = inp.text[m.start : m.end]
            # On a stream the check sees a window of the answer: a value at the window's end may be cut short (it
            # need only begin a known one), a value at its start may have lost its beginning (it need only end one).
            cut_end, cut_start = m.end == len(inp.text), m.start == 0
            if kind == "email":
                email = value.casefold()
                return email in emails or any(
                    (cut_end and e.startswith(email)) or (cut_start and e.endswith(email)) for e in emails
                )
            if kind == "phone":
                key = _phone_key(value)
                return any(_same_phone(key, p) or (cut_end and len(key) >= 7 and p.startswith(key)) for p in phones)
            key = _url_key(value)
            known = any(
                k == key or k.startswith(key + "/") or (cut_end and k.startswith(key)) or (cut_start and key in k)
                for k in urls
            )
            return known or any(
                key == a or key.startswith(a + "/") for a in self._allow_urls
            )  # a site covers its pages

        findings = []
        for kind, matches in found.items():
            unsupported = [m for m in matches if not supported(kind, m)]
            if unsupported:
                label = {"url": "link", "email": "email address", "phone": "phone number"}[kind]
                findings.append(
                    Finding(
                        check=self.name,
                        reason=f"hallucinated_contact.{kind}",
                        detail=f"{_plural(len(unsupported), label)} not found in the retrieved knowledge",
                        score=max(m.score for m in unsupported),
                        spans=tuple(m.span for m in unsupported),
                    )
                )
        return findings
