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
- wh-word: the question's noun folded into its wh-word: "Which city do I live
  in?" -> "Where do I live?", "What car do I drive?" -> "What do I drive?",
  "What is my manager's name?" -> "Who is my manager?"
- nominal: a verb phrase as a noun phrase and back: "What car do I drive?" ->
  "What is my car?", "Where was I born?" -> "What is my birthplace?", "What is
  my favourite food?" -> "Which food do I like best?"
- short: the bare noun phrase, as people type it: "My locker code?"

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
_WH = r"(?P<wh>what|where|who|when|which \w+(?: \w+)?|what \w+(?: \w+)?)"
_BE = re.compile(rf"^{_WH} (?P<be>is|was|are) (?P<np>(?:my|the|your) [^?]+?|(?:I|you) born\b[^?]*)(?P<called> called)?\?$", re.I)
_DO = re.compile(
    rf"^{_WH} (?P<do>do|does|did) (?P<subj>I|you|he|she|they|we|my [\w']+(?: [\w']+)??) (?P<verb>\w+)(?P<rest>[^?]*)\?$", re.I
)
_PARTICIPLE = re.compile(
    r"^(?P<subj>(?:my|the|your) [\w']+|I|you) (?P<rest>(?:born|based|located|made|kept|parked|named)\b.*)$", re.I
)
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


def _subject(m: re.Match) -> str:
    """A match's `subj` as it stands mid-sentence: "I" kept, "My brother" -> "my brother"."""
    return m["subj"] if m["subj"] == "I" else m["subj"].lower()


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
        subject = _subject(m)
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


_PEOPLE = {
    "person", "friend", "manager", "boss", "doctor", "dentist", "teacher", "sister", "brother", "mother", "father",
    "mum", "mom", "dad", "wife", "husband", "partner", "son", "daughter", "neighbour", "colleague", "coach", "landlord",
    "aunt", "uncle", "cousin",
}  # fmt: skip
_GROUPS = {"team", "band", "club", "company", "firm", "employer"}
_PLACES = {"city", "town", "country", "place", "village", "street", "school", "university", "office", "company", "firm"}
_TRAILING_PREPOSITION = re.compile(r"\s+(?:in|at|to|for|from|on)$", re.I)
_POSSESSIVE_PRONOUNS = {"i": "my", "you": "your", "he": "his", "she": "her", "they": "their", "we": "our"}
_FAVOURITE = re.compile(r"^(?:What|Which) (?:is|are) (?P<owner>my|your) (?:favourite|favorite) (?P<x>[\w ]+?)\?$", re.I)
_BORN = re.compile(r"^(?P<wh>Where|Which \w+|What \w+) (?P<be>was|were) (?P<subj>I|you|(?:my|your) [\w']+) born(?: in)?\?$", re.I)


def _owner(subject: str) -> str:
    """The possessive of a question's subject: "I" -> "my", "my brother" -> "my brother's"."""
    return _POSSESSIVE_PRONOUNS.get(subject.lower(), f"{subject}'s")


def _do_parts(m: re.Match) -> tuple[str, str, str]:
    """(noun phrase folded into the wh-word, "do I live", rest) of a `_DO` match: "Which city do I live in?" ->
    ("city", "do I live", " in")."""
    subject = _subject(m)
    noun = m["wh"].split(maxsplit=1)[1] if " " in m["wh"] else ""
    return noun, f"{m['do'].lower()} {subject} {m['verb']}", m["rest"]


def _wh_words(q: str) -> list[str]:
    """The noun folded into the wh-word: "Which city do I live in?" -> "Where do I live?"; "What car do I drive?"
    -> "What do I drive?"; "What is my manager's name?" -> "Who is my manager?"."""
    out = []
    if (m := _DO.match(q)) and " " in m["wh"]:
        noun, head, rest = _do_parts(m)
        last = noun.split()[-1].lower()
        if last in _PLACES:
            out.append(f"Where {head}{_TRAILING_PREPOSITION.sub('', rest)}?")
        if last in _PEOPLE | _GROUPS and not re.search(r"\b(?:in|at|on)$", rest):  # not "Who does she play in?"
            out.append(f"Who {head}{rest}?")
        if last not in _PLACES | _PEOPLE | _GROUPS:
            out.append(f"What {head}{rest}?")
    elif (m := _BORN.match(q)) and " " in m["wh"]:  # a noun to fold: "Which city was ...", not "Where was ..."
        out.append(f"Where {m['be'].lower()} {_subject(m)} born?")
    for pattern in (_CALLED, _NAME_OF, _THE_NAME):
        if (m := pattern.match(q)) and m["x"].split()[-1].lower() in _PEOPLE:
            out.append(f"Who {m['be'].lower()} {m['owner'].lower()} {m['x']}?")
    return out


def _nominal(q: str) -> list[str]:
    """A verb phrase as a noun phrase and back: "What car do I drive?" -> "What is my car?"; "Where was I born?" ->
    "What is my birthplace?"; "What is my favourite food?" -> "Which food do I like best?"."""
    if m := _FAVOURITE.match(q):
        pronoun = "I" if m["owner"].lower() == "my" else "you"
        return [f"Which {m['x']} do {pronoun} like best?", f"What {m['x']} do {pronoun} prefer?"]
    if m := _BORN.match(q):
        owner = _owner(_subject(m))
        return [f"What is {owner} birthplace?", f"What is {owner} place of birth?"]
    if (m := _DO.match(q)) and " " in m["wh"]:
        noun, _, rest = _do_parts(m)
        return [f"What is {_owner(_subject(m))} {noun}{_TRAILING_PREPOSITION.sub('', rest)}?"]
    return []


def _short(q: str) -> list[str]:
    """The bare noun phrase: "What is my locker code?" -> "My locker code?"."""
    m = _BE.match(q)
    if m and m["wh"].lower() == "what" and not m["called"] and re.match(r"(my|your) ", m["np"], re.I):
        return [f"{_cap(m['np'])}?"]
    return []


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
    found += [("wh-word", t) for t in _wh_words(q)]
    found += [("nominal", t) for t in _nominal(q)]
    found += [("short", t) for t in _short(q)]
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
