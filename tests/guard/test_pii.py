"""PII recognizers and the contact-details check: every entity found where it is and only where it is, with spans
that redact exactly the value, and none of the spec numbers a phone assistant's traffic is full of."""

from __future__ import annotations

import pytest

from keel.guard.base import Finding, GuardInput
from keel.guard.pii import DEFAULT_ENTITIES, ENTITIES, ContactDetailsCheck, PiiCheck, iban_ok, luhn_ok, scan
from keel.guard.runner import merge_spans, redact


def found(text: str, entities: tuple[str, ...] = ENTITIES) -> list[tuple[str, str]]:
    return [(m.entity, text[m.start : m.end]) for m in scan(text, entities)]


async def findings(check: PiiCheck | ContactDetailsCheck, text: str, **kw: str | None) -> list[Finding]:
    return await check.check(GuardInput(text, "output", **kw))  # type: ignore[arg-type]


# --- positives: (text, entity, the exact value the span must cover) ---------------------------------------------

POSITIVES = [
    ("Write to me at jane.doe+phones@example.co.uk please", "EMAIL_ADDRESS", "jane.doe+phones@example.co.uk"),
    ("Email: MilenaRossi@rhyta.com.", "EMAIL_ADDRESS", "MilenaRossi@rhyta.com"),
    ("Call me on +44 20 7946 0958 tomorrow", "PHONE_NUMBER", "+44 20 7946 0958"),
    ("my number is (415) 555-0132", "PHONE_NUMBER", "(415) 555-0132"),
    ("reach the shop at 415.555.0132 x204", "PHONE_NUMBER", "415.555.0132 x204"),
    ("Office line 020 7946 0958, ask for Sam", "PHONE_NUMBER", "020 7946 0958"),
    ("Mon portable : 06 12 34 56 78", "PHONE_NUMBER", "06 12 34 56 78"),
    ("+49 151 23456789 is my mobile", "PHONE_NUMBER", "+49 151 23456789"),
    ("They're not answering at 785 8949", "PHONE_NUMBER", "785 8949"),  # bare local number: only after a cue
    ("Phone: 9472 7916", "PHONE_NUMBER", "9472 7916"),
    ("Card 4111 1111 1111 1111 exp 12/27", "CREDIT_CARD", "4111 1111 1111 1111"),
    ("amex 3782-822463-10005", "CREDIT_CARD", "3782-822463-10005"),
    ("pay with 5555555555554444", "CREDIT_CARD", "5555555555554444"),
    ("IBAN GB82 WEST 1234 5698 7654 32.", "IBAN_CODE", "GB82 WEST 1234 5698 7654 32"),
    ("send it to DE89370400440532013000 today", "IBAN_CODE", "DE89370400440532013000"),
    ("lower case gb82west12345698765432 works too", "IBAN_CODE", "gb82west12345698765432"),
    ("my SSN is 536-22-1234", "US_SSN", "536-22-1234"),
    ("social security number: 536 22 1234", "US_SSN", "536 22 1234"),
    ("NI number JG 10 37 59 A", "UK_NINO", "JG 10 37 59 A"),
    ("DNI 12345678Z", "ES_NIF", "12345678Z"),
    ("NIE X1234567L", "ES_NIF", "X1234567L"),
    ("codice fiscale RSSMRA85T10A562S", "IT_FISCAL_CODE", "RSSMRA85T10A562S"),
    ("Aadhaar 2345 6789 0124", "IN_AADHAAR", "2345 6789 0124"),
    ("PAN ABCPE1234F", "IN_PAN", "ABCPE1234F"),
    ("connect to 192.168.1.20 from the laptop", "IP_ADDRESS", "192.168.1.20"),
    ("my router is 2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS", "2001:db8:85a3::8a2e:370:7334"),
    ("Hello, my name is Maria Gonzalez and I need help", "PERSON", "Maria Gonzalez"),
]


@pytest.mark.parametrize(("text", "entity", "value"), POSITIVES)
def test_each_entity_is_found_with_an_exact_span(text: str, entity: str, value: str) -> None:
    assert found(text) == [(entity, value)]


# --- negatives: checksum failures, near misses, and the numbers a phone assistant sees all day -----------------

NEGATIVES = [
    "Card 4111 1111 1111 1112 fails the Luhn check",
    "IBAN GB82 WEST 1234 5698 7654 33 has a wrong checksum",
    "GB82 WEST 1234 5698 7654 is too short for a British IBAN",
    "SSN 000-12-3456 and 666-12-3456 and 900-12-3456 are never issued",
    "DNI 12345678A has the wrong check letter",
    "999.10.10.1 and 300.1.1.1 are not addresses",
    "not an email: john@localhost or @handle or a@b",
    "The Galaxy S24 has a 4000 mAh battery and a 6.2-inch 120Hz screen.",
    "The iPhone 15 Pro Max costs $1,199 and the Pixel 8 Pro €1 099.",
    "Resolution 1080 x 2400 pixels, 2400x1080, 1440 x 3120, 460 ppi",
    "Snapdragon 8 Gen 3, 12 GB + 256 GB, 50 MP + 12 MP + 10 MP, 25 W wired, 15 W wireless",
    "It was released on 2023-09-22 (22.09.2023, 09/22/2023) and supported 2023-2030.",
    "Model numbers A2848, SM-S928B/DS and GP4BC; 5G bands n1/n3/n5/n7/n28/n78",
    "iOS 17.4.1 and Android 14.0.1, build UQ1A.240205.004, version 1.2.3.4",
    "Prices in India: ₹79,999 for 8GB+128GB and ₹89 999 for 12GB+256GB",
    "The battery keeps 80% after 1,000 cycles; charge at 65 W to 240 W",
    "IMEI 356938035643809 is printed on the box",
    "Which is the best mobile in the range of 7000 - 12000?",
    "Galaxy S23 Ultra vs Pixel 8 Pro vs iPhone 15 Pro: 200 MP vs 50 MP vs 48 MP",
    "Dimensions 146.3 x 70.9 x 7.6 mm, weight 168 g, 2556 x 1179 pixels",
    "I'm Looking for a phone and I'm Not sure which one",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_near_misses_and_spec_numbers_are_not_pii(text: str) -> None:
    assert found(text) == []


def test_checksum_helpers() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    assert not iban_ok("GB82WEST1234569876543")  # right checksum scheme, wrong length for GB


def test_a_card_number_is_not_also_read_as_a_phone_number() -> None:
    text = "call me about card 4111 1111 1111 1111"
    assert found(text) == [("CREDIT_CARD", "4111 1111 1111 1111")]


async def test_findings_are_grouped_by_entity_with_spans_that_redact_exactly() -> None:
    text = "I'm at jane@example.com or +1 415-555-0132, backup bob@example.org, card 4111-1111-1111-1111."
    result = await findings(PiiCheck(), text)
    by_reason = {f.reason: f for f in result}
    assert set(by_reason) == {"pii.email", "pii.phone", "pii.credit_card"}
    assert len(by_reason["pii.email"].spans) == 2
    spans = merge_spans([s for f in result for s in f.spans], len(text))
    assert redact(text, spans) == (
        "I'm at <EMAIL_ADDRESS> or <PHONE_NUMBER>, backup <EMAIL_ADDRESS>, card <CREDIT_CARD>."
    )
    for f in result:  # the human-readable detail never repeats the values
        assert "example" not in f.detail and "4111" not in f.detail and "555" not in f.detail
        assert f.check == "pii" and f.score is not None and f.score >= 0.5


async def test_options_select_entities_threshold_and_allow_list() -> None:
    text = "mail support@keel.example or jane@example.com, call 785 8949 or +44 20 7946 0958"
    only_email = await findings(PiiCheck(entities=["EMAIL_ADDRESS"]), text)
    assert [f.reason for f in only_email] == ["pii.email"]
    allowed = await findings(PiiCheck(entities=["EMAIL_ADDRESS"], allow=["Support@Keel.example"]), text)
    assert [len(f.spans) for f in allowed] == [1]
    cue_only_dropped = await findings(PiiCheck(entities=["PHONE_NUMBER"], threshold=0.8), text)
    assert [len(f.spans) for f in cue_only_dropped] == [1]  # "785 8949" is a phone only because of "call"
    assert "PERSON" not in DEFAULT_ENTITIES
    assert await findings(PiiCheck(), "my name is Maria Gonzalez") == []


def test_constructor_rejects_bad_options_by_name() -> None:
    with pytest.raises(ValueError, match=r"entities: unknown PASSPORT; known: .*EMAIL_ADDRESS"):
        PiiCheck(entities=["EMAIL_ADDRESS", "PASSPORT"])
    with pytest.raises(TypeError, match="entities must be a list"):
        PiiCheck(entities="EMAIL_ADDRESS")
    with pytest.raises(ValueError, match="threshold"):
        PiiCheck(threshold=1.5)
    with pytest.raises(TypeError, match="allow"):
        PiiCheck(allow=[1, 2])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="kinds: unknown fax"):
        ContactDetailsCheck(kinds=["url", "fax"])
    with pytest.raises(TypeError, match="trust_system_prompt"):
        ContactDetailsCheck(trust_system_prompt="yes")  # type: ignore[arg-type]


# --- contact details in answers ----------------------------------------------------------------------------------

CONTEXT = """Samsung support: call 1-800-726-7864 or see https://www.samsung.com/us/support/contact/.
Apple: https://support.apple.com/en-us/HT201295, email press@apple.com. UK: +44 20 7946 0958."""


async def test_contact_details_from_the_context_pass_in_any_writing() -> None:
    answer = (
        "Call Samsung at (800) 726-7864 or visit samsung.com/us/support/contact, or Apple's page "
        "https://support.apple.com/en-us/HT201295/ and PRESS@apple.com; in London 020 7946 0958. "
        "Apple's site is support.apple.com."
    )
    assert await findings(ContactDetailsCheck(), answer, context=CONTEXT) == []


async def test_invented_contact_details_are_flagged_with_spans() -> None:
    answer = (
        "Call Samsung on 1-800-555-0199, write to help@samsung.com or open https://samsung-support.example/fix "
        "(or https://www.samsung.com/uk/offers)."
    )
    result = await findings(ContactDetailsCheck(), answer, context=CONTEXT)
    got = {f.reason: [answer[s.start : s.end] for s in f.spans] for f in result}
    assert got == {
        "hallucinated_contact.phone": ["1-800-555-0199"],
        "hallucinated_contact.email": ["help@samsung.com"],
        "hallucinated_contact.url": ["https://samsung-support.example/fix", "https://www.samsung.com/uk/offers"],
    }
    assert all("samsung" not in f.detail.lower() for f in result)


async def test_contact_details_trust_the_system_prompt_and_the_allow_list() -> None:
    answer = "Our hotline is 0800 123 4567 and our site is keelphones.com/help."
    assert len(await findings(ContactDetailsCheck(), answer)) == 2  # no context: nothing is supported
    system = "You are the assistant of Keel Phones. Hotline: +44 800 123 4567."
    result = await findings(ContactDetailsCheck(), answer, system_prompt=system)
    assert [f.reason for f in result] == ["hallucinated_contact.url"]
    assert await findings(ContactDetailsCheck(allow=["https://www.keelphones.com"]), answer, system_prompt=system) == []
    untrusting = ContactDetailsCheck(trust_system_prompt=False, kinds=["phone"])
    assert [f.reason for f in await findings(untrusting, answer, system_prompt=system)] == [
        "hallucinated_contact.phone"
    ]


async def test_answers_without_contact_details_and_spec_numbers_pass() -> None:
    answer = "The Pixel 8 has a 4575 mAh battery, 27 W charging and a 6.2-inch 120 Hz display; it costs $699."
    assert await findings(ContactDetailsCheck(), answer, context="") == []


async def test_contact_details_cut_by_a_stream_window_are_judged_by_what_is_visible() -> None:
    check = ContactDetailsCheck()
    assert await findings(check, "For help see https://www.samsung.com/us/supp", context=CONTEXT) == []
    assert await findings(check, "ung.com/us/support/contact/ is the page", context=CONTEXT) == []
    assert await findings(check, "or call them on 1-800-726-78", context=CONTEXT) == []
    cut_fake = await findings(check, "or see https://samsung-deals.example/fr", context=CONTEXT)
    assert [f.reason for f in cut_fake] == ["hallucinated_contact.url"]
    inside = await findings(check, "see https://www.samsung.com/us/supp now", context=CONTEXT)  # not at an edge
    assert [f.reason for f in inside] == ["hallucinated_contact.url"]
