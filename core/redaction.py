"""Personal data out of text before adaptloop stores it: typed placeholders for what is detected.

    redactor = Redactor.from_settings(settings)       # once, at the edge
    clean, found = redactor.redact("mail me at ana@example.org")
    # clean == "mail me at <EMAIL>", found == {"EMAIL": 1}

Detectors, in the order they run (an earlier one's placeholder holds no
digits or '@', so a later one never sees a half-replaced number):

    IBAN   a country code, two check digits and the account, mod-97 checked (ISO 13616)
    CARD   13-19 digits (spaces or dashes between them allowed) that pass the Luhn check
    EMAIL  local@domain.tld
    IP     IPv4 and IPv6 addresses that `ipaddress` accepts (not loopback or unspecified ones)
    PHONE  numbers the `phonenumbers` package finds valid (international
           format anywhere, national format for `privacy.phone_region`)
    custom `privacy.custom`: a placeholder name -> a regular expression

Everything runs offline: no model, no download. Checks keep false positives
rare: an order number that fails Luhn, or a version string that is no IP,
stays as written.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections import Counter
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import phonenumbers

if TYPE_CHECKING:
    from core.settings import Settings

BUILTIN_TYPES = ("CARD", "IBAN", "EMAIL", "IP", "PHONE")

_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN_START = re.compile(r"\b([A-Z]{2})\d{2} ?[A-Z0-9]")
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
_IPV4 = re.compile(r"(?<!\d)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Fa-f:])")
_DIGITS = re.compile(r"\d")
_ANY_HINT = re.compile(r"[\d@:]")  # every built-in kind holds a digit, an @ or a colon
_PHONE_HINT = re.compile(r"\d(?:[\s().\-/]{0,3}\d){6}")  # seven digits close together
_IPV4_HINT = re.compile(r"\d\.\d")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d{2}")  # what every IBAN start holds; a plain class first scans fast

# ISO 13616: each country's IBAN length (a plausible IBAN of another length is left alone).
_IBAN_LENGTHS = {
    entry[:2]: int(entry[2:])
    for entry in (
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DK18 DO28 EE20 EG29 ES24 "
        "FI18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 KZ20 LB28 LC32 "
        "LI21 LT20 LU20 LV21 MC27 MD24 ME22 MK19 MR27 MT31 MU30 NL18 NO15 PK24 PL28 PS29 PT25 QA29 RO24 RS22 SA24 "
        "SC31 SE24 SI19 SK24 SM27 ST25 SV28 TL23 TN24 TR26 UA29 VA22 VG24 XK20"
    ).split()
}

Span = tuple[int, int]


def luhn_valid(digits: str) -> bool:
    """The payment-card check digit (ISO/IEC 7812): every second digit from the right doubled."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        n = int(char)
        if index % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """Country length and the mod-97 check of an IBAN (spaces allowed)."""
    iban = text.replace(" ", "").upper()
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def _cards(text: str) -> list[Span]:
    spans = []
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group(0))
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            spans.append(m.span())
    return spans


def _ibans(text: str) -> list[Span]:
    """From each country-code start, exactly that country's length of characters (single spaces between)."""
    spans: list[Span] = []
    for m in _IBAN_START.finditer(text):
        length = _IBAN_LENGTHS.get(m.group(1))
        if length is None or (spans and m.start() < spans[-1][1]):
            continue
        end, count = m.start(), 0
        while end < len(text) and count < length:
            if text[end].isalnum() and text[end].isascii():
                count += 1
            elif not (text[end] == " " and count and end + 1 < len(text) and text[end + 1] != " "):
                break
            end += 1
        if count == length and iban_valid(text[m.start() : end]) and not text[end : end + 1].isalnum():
            spans.append((m.start(), end))
    return spans


def _matches(regex: re.Pattern[str], accept: Callable[[str], bool] | None = None) -> Callable[[str], list[Span]]:
    def find(text: str) -> list[Span]:
        return [m.span() for m in regex.finditer(text) if accept is None or accept(m.group(0))]

    return find


def _is_ip(match: str) -> bool:
    try:
        address = ipaddress.ip_address(match)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_unspecified)  # 127.0.0.1 or 0.0.0.0 point at no one


def _is_ipv6(match: str) -> bool:
    # "::" alone or a clock time ("10:30:00" has no letters but is no address either) stay as written
    return sum(c.isalnum() for c in match) >= 3 and _is_ip(match)


def _nothing_built_in(text: str, digits: int) -> bool:
    """True when no built-in detector is worth trying (their tests below, at once: most texts hold a short number)."""
    return digits < 4 and "@" not in text and text.count(":") < 2 and (digits < 2 or _IBAN_HINT.search(text) is None)


def _always(_text: str, _digits: int) -> bool:
    return True


@dataclass(eq=False)  # compared (and hashed) by identity: frozen configs hold one
class Redactor:
    """Replaces detected personal data by `<TYPE>` placeholders; `enabled=False` returns text unchanged."""

    types: frozenset[str] = frozenset(BUILTIN_TYPES)
    custom: dict[str, str] = field(default_factory=dict)
    phone_region: str | None = "US"
    enabled: bool = True

    def __post_init__(self) -> None:
        # (name, find spans, worth trying): the cheap test skips a detector on
        # the many texts that cannot hold its kind (most hold no long number).
        # The worth test gets the text and its number of digits (counted once).
        builtin: list[tuple[str, Callable[[str], list[Span]], Callable[[str, int], bool]]] = [
            ("IBAN", _ibans, lambda text, digits: digits >= 2 and _IBAN_HINT.search(text) is not None),
            ("CARD", _cards, lambda _text, digits: digits >= 13),
            ("EMAIL", _matches(_EMAIL), lambda text, _digits: "@" in text),
            ("IP", _matches(_IPV4, _is_ip), lambda text, digits: digits >= 4 and _IPV4_HINT.search(text) is not None),
            ("IP", _matches(_IPV6, _is_ipv6), lambda text, _digits: text.count(":") >= 2),
            ("PHONE", self._phones, lambda text, digits: digits >= 7 and _PHONE_HINT.search(text) is not None),
        ]
        self._detectors = [(name, find, worth) for name, find, worth in builtin if name in self.types]
        self._detectors += [(name, _matches(re.compile(regex)), _always) for name, regex in self.custom.items()]
        self._builtin_only = not self.custom

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        p = settings.privacy
        return cls(types=frozenset(p.detect), custom=dict(p.custom), phone_region=p.phone_region, enabled=p.redact)

    def redact(self, text: str) -> tuple[str, Counter[str]]:
        """`text` with each detected item replaced by its placeholder, and how many of each type."""
        found: Counter[str] = Counter()
        return self.redact_into(text, found), found

    def redact_into(self, text: str, found: MutableMapping[str, int]) -> str:
        """`redact`, counting into `found` (no counter per text: the worker redacts several texts per event).

        Hands back the very `text` object when it found nothing."""
        if not self.enabled or not text or (self._builtin_only and _ANY_HINT.search(text) is None):
            return text
        digits = len(_DIGITS.findall(text))
        if self._builtin_only and _nothing_built_in(text, digits):
            return text
        for name, find, worth in self._detectors:
            if worth(text, digits) and (spans := find(text)):
                for start, end in reversed(spans):
                    text = f"{text[:start]}<{name}>{text[end:]}"
                found[name] = found.get(name, 0) + len(spans)
        return text

    def clean(self, text: str) -> str:
        """Just the redacted text."""
        return self.redact(text)[0]

    def _phones(self, text: str) -> list[Span]:
        matcher = phonenumbers.PhoneNumberMatcher(text, self.phone_region, leniency=phonenumbers.Leniency.VALID)
        return [(m.start, m.end) for m in matcher]


DISABLED = Redactor(enabled=False)

_plain_record_factory = logging.getLogRecordFactory()


def _clean_arg(redactor: Redactor, arg: Any) -> Any:
    """A log argument redacted; numbers stay numbers (for %d), anything else that held data becomes its clean text."""
    if arg is None or isinstance(arg, int | float):
        return arg
    text = arg if isinstance(arg, str) else str(arg)
    clean = redactor.clean(text)
    return arg if clean == text and not isinstance(arg, str) else clean


def redact_logs(redactor: Redactor) -> None:
    """Every log record of this process made with its message redacted (a second call replaces the first).

    A record factory rather than a handler filter: it applies whatever
    handlers Faust, uvicorn or a test install later.
    """
    if not redactor.enabled:
        logging.setLogRecordFactory(_plain_record_factory)
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = _plain_record_factory(*args, **kwargs)
        # The message and each argument apart, so formatters that read
        # `record.args` themselves (uvicorn's access log) still find them.
        if isinstance(record.msg, str):
            record.msg = redactor.clean(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_clean_arg(redactor, a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean_arg(redactor, v) for k, v in record.args.items()}
        return record

    logging.setLogRecordFactory(make_record)
