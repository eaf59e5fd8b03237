"""Rewordings of a taught question: the words a person may use next time, by rule.

    rewordings("What is my cat called?")
    -> [("contraction", "What's my cat called?"), ("name", "What is my cat's name?"),
        ("name", "What is the name of my cat?"), ("indirect", "Tell me what my cat is called."), ...]

A fact taught as "What is my favourite colour?" is asked next time as "Which
colour do I like most?". Templates around the question ("Quick question:
...") leave its words as they were; these rules change them, each rule a
kind of rewording, so the held-out check can hold out a kind that was not
trained on (schemas/dataset.py) and measure generalization, not the
templates:

- contraction: "What is" <-> "What's", "do not" <-> "don't", ...
- which-what: "Which city ...?" <-> "What city ...?"
- indirect: "What is my X?" -> "Tell me what my X is." /
  "Do you know what my X is?"; "Which bus do I take?" -> "Tell me which bus I take."
- name: "What is my X called?" <-> "What is my X's name?" <-> "What is the
  name of my X?"; "What did I name my X?" -> "What is my X called?"
- possessive: "my X's Y" <-> "the Y of my X"
- synonym: the key noun or adjective for a synonym (favourite -> preferred,
  city -> town, mother -> mum, ...)

`reworded_answers` varies an answer a little, keeping its key words (the
part after "is"/"called"/...). Pure functions: the same question always
gives the same rewordings.
"""

from __future__ import annotations

import re

_CONTRACTIONS = [
    ("What is", "What's"),
    ("Where is", "Where's"),
    ("Who is", "Who's"),
    ("How is", "How's"),
    ("do not", "don't"),
    ("does not", "doesn't"),
    ("I am", "I'm"),
    ("it is", "it's"),
]
_SYNONYMS = {
    "favourite": ["preferred", "favorite"],
    "favorite": ["favourite", "preferred"],
    "colour": ["color"],
    "city": ["town"],
    "town": ["city"],
    "company": ["firm", "employer"],
    "manager": ["boss"],
    "boss": ["manager"],
    "mother": ["mum", "mom"],
    "father": ["dad"],
    "car": ["vehicle"],
    "job": ["work"],
    "code": ["combination", "PIN"],
    "house": ["home"],
    "support": ["cheer for", "follow"],
    "live": ["stay"],
    "drive": ["own"],
}
_IRREGULAR_PAST = {
    "take": "took",
    "drive": "drove",
    "buy": "bought",
    "go": "went",
    "get": "got",
    "make": "made",
    "meet": "met",
    "have": "had",
    "see": "saw",
    "give": "gave",
    "keep": "kept",
    "leave": "left",
}
_WH = r"(?P<wh>what|where|who|when|which \w+|what \w+)"
_BE = re.compile(rf"^{_WH} (?P<be>is|was|are) (?P<np>(?:my|the|your) [^?]+?)(?P<called> called)?\?$", re.I)
_DO = re.compile(
    rf"^{_WH} (?P<do>do|does|did) (?P<subj>I|you|he|she|they|we|my [\w']+(?: [\w']+)??) (?P<verb>\w+)(?P<rest>[^?]*)\?$", re.I
)
_PARTICIPLE = re.compile(r"^(?P<subj>(?:my|the|your) [\w']+) (?P<rest>(?:born|based|located|made|kept|parked|named)\b.*)$", re.I)
_CALLED = re.compile(r"^What (?P<be>is|was) (?P<owner>my|your) (?P<x>[\w ]+?) called\?$", re.I)
_NAME_OF = re.compile(r"^What (?P<be>is|was) (?P<owner>my|your) (?P<x>[\w ]+?)'s name\?$", re.I)
_THE_NAME = re.compile(r"^What (?P<be>is|was) the name of (?P<owner>my|your) (?P<x>[\w ]+?)\?$", re.I)
_DID_NAME = re.compile(r"^What did (?P<who>I|you) (?:name|call) (?P<owner>my|your) (?P<x>[\w ]+?)\?$", re.I)
_POSSESSIVE = re.compile(r"\b(?P<owner>my|your) (?P<x>\w+)'s (?P<y>\w+)\b", re.I)
_OF = re.compile(r"\bthe (?P<y>\w+) of (?P<owner>my|your) (?P<x>\w+)\b", re.I)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _low(text: str) -> str:
    return text if text.startswith("I ") else text[:1].lower() + text[1:]


def _contractions(q: str) -> list[str]:
    out = []
    for long, short in _CONTRACTIONS:
        for a, b in ((long, short), (short, long)):
            pattern = re.compile(rf"\b{re.escape(a)}\b", re.I)
            if pattern.search(q):
                out.append(pattern.sub(lambda m, b=b: _cap(b) if m.group(0)[0].isupper() else b, q, count=1))
    return out


def _which_what(q: str) -> list[str]:
    m = re.match(r"^(Which|What) (\w+)\b(.*)$", q)
    if not m or m.group(2).lower() in {"is", "was", "are", "do", "does", "did", "can", "will", "would"}:
        return []
    other = "What" if m.group(1) == "Which" else "Which"
    return [f"{other} {m.group(2)}{m.group(3)}"]


def _third_person(verb: str) -> str:
    if re.search(r"(s|sh|ch|x|z|o)$", verb):
        return verb + "es"
    if re.search(r"[^aeiou]y$", verb):
        return verb[:-1] + "ies"
    return verb + "s"


def _past(verb: str) -> str:
    if verb in _IRREGULAR_PAST:
        return _IRREGULAR_PAST[verb]
    return verb + "d" if verb.endswith("e") else verb + "ed"


def _indirect(q: str) -> list[tuple[str, str]]:
    """The question as an embedded clause: "Tell me what my X is." and "Do you know what my X is?"."""
    clause = None
    if m := _BE.match(q):
        np, be = _low(m["np"]), m["be"].lower()
        if p := _PARTICIPLE.match(np):  # "which city was my mother born in" -> "which city my mother was born in"
            clause = f"{m['wh'].lower()} {p['subj']} {be} {p['rest']}"
        else:
            clause = f"{m['wh'].lower()} {np} {be}{m['called'] or ''}"
    elif m := _DO.match(q):
        verb = m["verb"].lower()
        subject = m["subj"] if m["subj"] == "I" else m["subj"].lower()
        if m["do"].lower() == "does":
            verb = _third_person(verb)
        elif m["do"].lower() == "did":
            verb = _past(verb)
        clause = f"{m['wh'].lower()} {subject} {verb}{m['rest']}"
    if clause is None:
        return []
    return [("indirect", f"Tell me {clause}."), ("indirect", f"Do you know {clause}?")]


def _names(q: str) -> list[str]:
    for pattern in (_CALLED, _NAME_OF, _THE_NAME, _DID_NAME):
        if m := pattern.match(q):
            be = m.groupdict().get("be") or "is"
            owner, x = m["owner"].lower(), m["x"]
            forms = [f"What {be} {owner} {x} called?", f"What {be} {owner} {x}'s name?", f"What {be} the name of {owner} {x}?"]
            return [f for f in forms if f.casefold() != q.casefold()]
    return []


def _possessives(q: str) -> list[str]:
    out = []
    if _POSSESSIVE.search(q) and not _NAME_OF.match(q):
        out.append(_POSSESSIVE.sub(lambda m: f"the {m['y']} of {m['owner']} {m['x']}", q, count=1))
    if _OF.search(q) and not _THE_NAME.match(q):
        out.append(_OF.sub(lambda m: f"{m['owner']} {m['x']}'s {m['y']}", q, count=1))
    return out


def _synonyms(q: str) -> list[str]:
    out = []
    for word, alternatives in _SYNONYMS.items():
        pattern = re.compile(rf"\b{word}\b", re.I)
        if pattern.search(q):
            out += [pattern.sub(alternative, q, count=1) for alternative in alternatives]
    return out


def rewordings(question: str) -> list[tuple[str, str]]:
    """(kind, rewording) pairs of `question`, each different from it and from each other, in a fixed order."""
    q = " ".join(question.split())
    found = [("contraction", t) for t in _contractions(q)]
    found += [("which-what", t) for t in _which_what(q)]
    found += _indirect(q)
    found += [("name", t) for t in _names(q)]
    found += [("possessive", t) for t in _possessives(q)]
    found += [("synonym", t) for t in _synonyms(q)]
    seen = {q.casefold()}
    out = []
    for kind, text in found:
        if text.casefold() not in seen:
            seen.add(text.casefold())
            out.append((kind, text))
    return out


_TAIL = re.compile(r"^(?P<head>.*\b(?:is|are|called|named)) (?P<tail>[^.!?]+)[.!?]?$", re.I)


def reworded_answers(answer: str) -> list[str]:
    """A few wordings of `answer` that keep its key words: "Your cat is called Pixel." -> "It's Pixel.",
    "Pixel."; none when the answer has no "<...> is <what>" shape."""
    m = _TAIL.match(answer.strip())
    if not m or not re.match(r"^(your|you)\b", m["head"], re.I) or len(m["tail"].split()) > 6:
        return []  # only where the question names the subject ("your cat"): "Fact 6 is true." keeps "Fact 6"
    tail = m["tail"].strip()
    return [f"It's {tail}.", f"{_cap(tail)}."]
