"""Redaction: valid personal data becomes its placeholder, look-alikes and plain text stay as written."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.redaction import DISABLED, Redactor, iban_valid, luhn_valid, redact_logs
from tests.support.pii import MAKERS, PII, make_card, sentence

REDACTOR = Redactor()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pii=PII, seed=st.integers(0, 2**32))
def test_every_generated_item_is_replaced_by_its_placeholder(pii, seed):
    kind, value = pii
    text = sentence(random.Random(seed), value)
    clean, found = REDACTOR.redact(text)
    assert value not in clean
    # a 13+ digit phone number can pass Luhn too: then it is a <CARD>, still gone
    assert f"<{kind}>" in clean or (kind == "PHONE" and "<CARD>" in clean), (text, clean)
    assert sum(found.values()) == 1, (text, clean, found)


def test_each_type_and_several_in_one_text():
    text = "Mail ana.b+x@mail.example.org, card 4111-1111-1111-1111, IBAN GB82 WEST 1234 5698 7654 32, from 10.0.0.7"
    clean, found = REDACTOR.redact(text + " or 2001:db8::ff00:42:8329, call +44 20 7946 0958 or (650) 253-0000.")
    assert clean == "Mail <EMAIL>, card <CARD>, IBAN <IBAN>, from <IP> or <IP>, call <PHONE> or <PHONE>."
    assert found == {"EMAIL": 1, "CARD": 1, "IBAN": 1, "IP": 2, "PHONE": 2}


@pytest.mark.parametrize(
    "text",
    [
        "Order 4111 1111 1111 1112 shipped",  # fails Luhn
        "Build 1234567890123 of version 1.2.3.4.5",  # no card, no IP
        "Meet at 10:30:00 on 2026-12-01",  # a time and a date
        "GB82 WEST 1234 5698 7654 33 is a typo'd IBAN",  # fails mod 97
        "Room 404, 12 items, ratio 3:2, the year 1999",
        "Paris is the capital of France.",
        "a@b is no address and neither is @home",
        "listening on 127.0.0.1:8000 and 0.0.0.0, also ::1",  # loopback and unspecified point at no one
    ],
)
def test_look_alikes_and_ordinary_text_stay_as_written(text):
    assert REDACTOR.redact(text) == (text, {})


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Nd", "Cs"), blacklist_characters="@:"), max_size=200))
def test_text_without_digits_or_at_signs_is_untouched(text):
    assert REDACTOR.clean(text) == text


# With a custom type the quick rejections are off: every detector looks at every text.
EXHAUSTIVE = Redactor(custom={"NEVER": r"(?!x)x"})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(alphabet="0123456789 .:-@()+/GBDEFRwest", max_size=60),
        st.builds(lambda pii, seed: sentence(random.Random(seed), pii[1]), PII, st.integers(0, 2**32)),
    )
)
def test_the_quick_rejections_never_skip_what_a_detector_finds(text):
    assert REDACTOR.redact(text) == EXHAUSTIVE.redact(text)


def test_checks_agree_with_known_values():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89 3704 0044 0532 0130 00") and not iban_valid("DE89 3704 0044 0532 0130 01")
    assert not iban_valid("DE89370400440532013")  # Germany's length is 22


def test_types_can_be_switched_off_and_custom_patterns_added():
    only_email = Redactor(types=frozenset({"EMAIL"}), custom={"EMPLOYEE": r"EMP-\d{6}"})
    clean, found = only_email.redact("ana@example.org card 4111111111111111 id EMP-123456")
    assert clean == "<EMAIL> card 4111111111111111 id <EMPLOYEE>" and found == {"EMAIL": 1, "EMPLOYEE": 1}
    card = make_card(random.Random(1))
    assert DISABLED.redact(f"mail ana@example.org {card}") == (f"mail ana@example.org {card}", {})


def test_log_records_are_redacted_once_installed(caplog):
    log = logging.getLogger("adaptloop.test")
    try:
        redact_logs(REDACTOR)
        with caplog.at_level(logging.INFO):
            log.info("user wrote %s and %s", "ana@example.org", MAKERS["CARD"](random.Random(2)))
            log.info("%d failed: %s", 3, ValueError("bad input 'bo@example.org'"))
            log.info('%s - "%s %s" %d', "10.1.2.3:5000", "GET", "/x", 200)  # uvicorn's access log reads record.args
        assert caplog.messages[-3:] == [
            "user wrote <EMAIL> and <CARD>",
            "3 failed: bad input '<EMAIL>'",
            '<IP>:5000 - "GET /x" 200',
        ]
        assert caplog.records[-1].args == ("<IP>:5000", "GET", "/x", 200)
    finally:
        redact_logs(DISABLED)
    with caplog.at_level(logging.INFO):
        log.info("user wrote %s", "ana@example.org")
    assert caplog.messages[-1] == "user wrote ana@example.org"


def test_settings_name_a_bad_custom_pattern_or_region():
    from core.errors import ConfigError
    from core.settings import Settings

    with pytest.raises(Exception, match="EMP"):
        Settings.model_validate({"privacy": {"custom": {"EMP": "EMP-(\\d"}}})
    with pytest.raises(Exception, match="phone_region"):
        Settings.model_validate({"privacy": {"phone_region": "usa"}})
    assert ConfigError  # load_settings wraps these into a ConfigError naming the key (tests/core/test_settings.py)
