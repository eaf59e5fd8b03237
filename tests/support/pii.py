"""Personal data for redaction tests: valid card numbers, IBANs, phone numbers, emails and IPs.

Each `make_*` draws from a `random.Random`, so hypothesis strategies
(`PII`, built on `st.randoms()`) and the worker test's seeded batch use the
same generators. Every value is valid by its own rules (Luhn, mod-97,
`phonenumbers.is_valid_number`), so a redactor that checks them must catch it.
"""

from __future__ import annotations

import ipaddress
import random
import string

import phonenumbers
from hypothesis import strategies as st

CARD_PREFIXES = {"4": (13, 16, 19), "51": (16,), "55": (16,), "2221": (16,), "34": (15,), "37": (15,), "6011": (16, 19)}
IBAN_COUNTRIES = {"DE": 22, "GB": 22, "FR": 27, "NL": 18, "ES": 24, "IT": 27, "NO": 15, "PL": 28, "CH": 21, "BE": 16}
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "AU")
WORDS = ("please", "remember", "my", "new", "details", "are", "use", "this", "for", "the", "account", "thanks")


def _luhn_digit(body: str) -> str:
    total = 0
    for index, char in enumerate(reversed(body)):
        n = int(char)
        if index % 2 == 0:  # the check digit is appended: its neighbour is doubled
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return str((10 - total % 10) % 10)


def _grouped(text: str, size: int, separator: str) -> str:
    return separator.join(text[i : i + size] for i in range(0, len(text), size))


def make_card(rng: random.Random) -> str:
    prefix = rng.choice(sorted(CARD_PREFIXES))
    length = rng.choice(CARD_PREFIXES[prefix])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    number = body + _luhn_digit(body)
    return rng.choice([number, _grouped(number, 4, " "), _grouped(number, 4, "-")])


def make_iban(rng: random.Random) -> str:
    country = rng.choice(sorted(IBAN_COUNTRIES))
    bban = "".join(rng.choice(string.digits + string.ascii_uppercase[:6]) for _ in range(IBAN_COUNTRIES[country] - 4))
    numeric = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    iban = f"{country}{98 - numeric % 97:02d}{bban}"
    return rng.choice([iban, _grouped(iban, 4, " ")])


def make_phone(rng: random.Random) -> str:
    region = rng.choice(PHONE_REGIONS)
    mobile = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
    example = rng.choice([mobile, phonenumbers.example_number(region)])
    for _ in range(20):
        digits = str(example.national_number)
        mutated = digits[:-4] + "".join(rng.choice(string.digits) for _ in range(4))
        number = phonenumbers.parse(f"+{example.country_code}{mutated}")
        if phonenumbers.is_valid_number(number):
            break
    else:
        number = example
    formats = [phonenumbers.PhoneNumberFormat.E164, phonenumbers.PhoneNumberFormat.INTERNATIONAL]
    if region == "US":  # the redactor's default region: its national format is recognised too
        formats.append(phonenumbers.PhoneNumberFormat.NATIONAL)
    return phonenumbers.format_number(number, rng.choice(formats))


def make_email(rng: random.Random) -> str:
    alphabet = string.ascii_lowercase + string.digits
    local = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
    if rng.random() < 0.4:
        local += rng.choice(".+_-") + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6)))
    labels = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10))) for _ in range(rng.randint(1, 3))]
    return f"{local}@{'.'.join(labels)}.{rng.choice(['com', 'org', 'de', 'io', 'co.uk', 'example'])}"


def make_ip(rng: random.Random) -> str:
    if rng.random() < 0.5:  # not 0.x or 127.x: unspecified and loopback addresses point at no one
        return str(ipaddress.IPv4Address((rng.choice([*range(1, 127), *range(128, 224)]) << 24) | rng.getrandbits(24)))
    return str(ipaddress.IPv6Address((1 << 125) | rng.getrandbits(125)))  # global unicast, 2000::/3


MAKERS = {"CARD": make_card, "IBAN": make_iban, "PHONE": make_phone, "EMAIL": make_email, "IP": make_ip}


def make_pii(rng: random.Random) -> tuple[str, str]:
    """(type, value) of one random kind."""
    kind = rng.choice(sorted(MAKERS))
    return kind, MAKERS[kind](rng)


def sentence(rng: random.Random, value: str) -> str:
    """`value` inside a few ordinary words (no digits of their own, so the value's edges stay its own)."""
    before = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))
    after = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))
    return f"{before} {value}{rng.choice(['', '.', ',', '!'])} {after}".strip()


PII = st.randoms(use_true_random=False).map(make_pii)
