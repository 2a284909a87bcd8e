"""Generator of the small English corpora shipped inside lmtune.

The story the corpora tell: a tiny word-level GPT is pre-trained on simple
"grade 1" sentences (``pretrain.txt``), then fine-tuned on questions,
instructions, chats and preferences written in the same words. Because the
tiny model's tokenizer is built from the unique words of ``pretrain.txt``,
every token of every other tiny corpus must occur there; :func:`generate_all`
checks this and refuses to write anything otherwise.

Everything is drawn from ``random.Random`` seeded per file, so the output is
byte-for-byte reproducible and a change to one corpus does not reshuffle the
others. Regenerate the shipped files with::

    PYTHONPATH=src python -m lmtune.assets.corpora
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Callable, Collection, Iterable
from importlib.resources import files
from pathlib import Path
from typing import TypeVar

from lmtune.assets import vocab as V

_T = TypeVar("_T")

POSITIVE_WORDS: tuple[str, ...] = V.POSITIVE_EVALUATIVE + V.POSITIVE_MOOD
NEGATIVE_WORDS: tuple[str, ...] = V.NEGATIVE_EVALUATIVE + V.NEGATIVE_MOOD
PUNCTUATION: tuple[str, ...] = (".", "?", ",")

# Files written by generate_all, in the order they are generated.
DATA_FILES: tuple[str, ...] = (
    "pretrain.txt", "retain.txt", "questions.txt", "questions_eval.txt",
    "instructions.jsonl", "instructions_eval.jsonl", "chat.jsonl",
    "preferences.jsonl", "ppo_prompts.txt", "sentiment_train.jsonl",
    "sentiment_test.jsonl",
)

_TOKEN_RE = re.compile(r"[.?,]|[^\s.?,]+")
_NOUN_KIND = {noun: kind for kind, nouns in V.NOUNS.items() for noun in nouns}
_ALL_KINDS = tuple(V.NOUNS)
_NOT_PEOPLE = ("animal", "thing", "food")
_NEUTRAL = tuple(a for pair in V.OPPOSITES for a in pair) + V.OTHER_ADJECTIVES
_THIRD_PERSON = tuple(p for p, (_, _, third) in V.PRONOUNS.items() if third)
_NOT_THIRD_PERSON = tuple(p for p in V.PRONOUNS if p not in _THIRD_PERSON)


def tokenize_words(text: str) -> list[str]:
    """Split text into lowercase word tokens the way the tiny tokenizer does.

    Words are separated by whitespace; ".", "?" and "," are tokens of their
    own even when glued to a word.

    Args:
        text: Any text.

    Returns:
        The tokens in order, e.g. ``"Can the cat run?"`` gives
        ``["can", "the", "cat", "run", "?"]``.
    """
    return _TOKEN_RE.findall(text.lower())


def sentiment_score(text: str) -> float:
    """Score the "sentiment" of a text by counting sentiment words.

    Args:
        text: Any text; punctuation tokens do not count as words.

    Returns:
        (positive words - negative words) / max(1, number of words).
    """
    words = [t for t in tokenize_words(text) if t not in PUNCTUATION]
    positive = sum(w in POSITIVE_WORDS for w in words)
    negative = sum(w in NEGATIVE_WORDS for w in words)
    return (positive - negative) / max(1, len(words))


def _adjectives(noun: str, polarity: str | None = None) -> tuple[str, ...]:
    """Adjectives that fit the noun, optionally of one sentiment polarity."""
    kind = _NOUN_KIND[noun]
    animate = kind in V.ANIMATE_KINDS
    pools = {
        "positive": V.POSITIVE_EVALUATIVE + (V.POSITIVE_MOOD if animate else ()),
        "negative": V.NEGATIVE_EVALUATIVE + (V.NEGATIVE_MOOD if animate else ()),
        # People are not coloured: "the red boy" reads oddly.
        "neutral": _NEUTRAL + (V.COLOURS if kind != "person" else ()),
    }
    if polarity is not None:
        return pools[polarity]
    return pools["positive"] + pools["negative"] + pools["neutral"]


def _with_article(det: str, rest: str) -> str:
    """Join a determiner to a phrase, turning "a" into "an" before vowels."""
    if det == "a" and rest[0] in "aeiou":
        det = "an"
    return f"{det} {rest}"


class _Speaker:
    """Draws grammatical phrases from the tables in :mod:`vocab` with one rng."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, options: Collection[_T]) -> _T:
        return self.rng.choice(tuple(options))

    def noun(self, kinds: Iterable[str] = _ALL_KINDS) -> str:
        return self.pick([n for k in kinds for n in V.NOUNS[k]])

    def np(self, kinds: Iterable[str] = _ALL_KINDS, *, noun: str | None = None,
           dets: tuple[str, ...] = V.DETERMINERS, adj_p: float = 0.4) -> str:
        """A noun phrase such as "the cat", "a big red ball", "my sad mom"."""
        noun = noun or self.noun(kinds)
        if self.rng.random() < adj_p:
            noun = f"{self.pick(_adjectives(noun))} {noun}"
        return _with_article(self.pick(dets), noun)

    def place(self, avoid: str = "", exclude: Collection[str] = ()) -> str:
        """A place phrase not naming the noun avoid and not in exclude."""
        return self.pick([p for p in V.PLACES
                          if not p.endswith(f" {avoid}") and p not in exclude])

    def vi(self, form: str = "base") -> str:
        """An intransitive verb in form "base", "3s", "past" or "ing"."""
        base = self.pick(V.INTRANSITIVE_VERBS)
        forms = dict(zip(("3s", "past", "ing"), V.INTRANSITIVE_VERBS[base]))
        return forms.get(form, base)

    def vp(self, form: str = "base") -> str:
        """A transitive verb with an object of a kind the verb accepts."""
        base = self.pick(V.TRANSITIVE_VERBS)
        third, past, kinds = V.TRANSITIVE_VERBS[base]
        verb = {"base": base, "3s": third, "past": past}[form]
        if "person" in kinds and self.rng.random() < 0.15:
            return f"{verb} {self.pick(V.OBJECT_PRONOUNS)}"
        return f"{verb} {self.np(kinds)}"

    def subject(self) -> tuple[str, bool]:
        """A subject and whether its verb takes the 3rd person singular."""
        if self.rng.random() < 0.5:
            return self.np(V.ANIMATE_KINDS), True
        pronoun = self.pick(V.PRONOUNS)
        return pronoun, V.PRONOUNS[pronoun][2]


def _pretrain_statement(s: _Speaker) -> str:
    """One declarative sentence from a randomly chosen template."""
    anim = V.ANIMATE_KINDS
    pron = s.pick(V.PRONOUNS)
    be_now, be_past, third = V.PRONOUNS[pron]
    form = "3s" if third else "base"
    noun = s.noun()
    subj, subj_third = s.subject()
    templates: tuple[Callable[[], str], ...] = (
        lambda: f"{s.np(anim)} can {s.vi()} .",
        lambda: f"{s.np(anim)} can {s.vi()} {s.place()} .",
        lambda: f"{s.np(anim)} {s.vi(s.pick(('3s', 'past')))} {s.place()} .",
        lambda: f"{s.np(anim)} {s.vi(s.pick(('3s', 'past')))} .",
        lambda: f"{pron} {s.vi(s.pick((form, 'past')))} {s.place()} .",
        lambda: f"{s.np(noun=noun)} {s.pick(('is', 'was'))} {s.pick(_adjectives(noun))} .",
        lambda: f"{s.np(noun=noun)} is {s.place(avoid=noun)} .",
        lambda: f"{pron} {s.vp(s.pick((form, 'past')))} .",
        lambda: f"{s.np(anim)} {s.vp(s.pick(('3s', 'past')))} .",
        lambda: f"{s.np(anim)} can {s.vp()} .",
        lambda: f"{s.pick(('this', 'that', 'it'))} is {s.np(_NOT_PEOPLE, dets=('a',), adj_p=1)} .",
        lambda: f"{s.np(anim)} is {s.vi('ing')} {s.place()} .",
        lambda: f"{pron} {be_now} {s.vi('ing')} .",
        lambda: f"{s.np(anim)} and {s.np(anim)} {s.pick(('are', 'were'))} {s.place()} .",
        lambda: f"{s.np(anim)} and {s.np(anim)} {s.vi()} {s.place()} .",
        lambda: f"{pron} {s.pick(('likes' if third else 'like', 'liked'))} to {s.vi()} .",
        lambda: f"{s.np(anim)} has {s.np(_NOT_PEOPLE, dets=('a',), adj_p=1)} .",
        lambda: f"{pron} {s.pick((be_now, be_past))} {s.pick(('', 'very '))}"
                f"{s.pick(V.POSITIVE_MOOD + V.NEGATIVE_MOOD)} .",
        lambda: f"{s.pick(('it was', 'today is', 'today was'))} a "
                f"{s.pick([a for p in V.DAY_ADJECTIVES.values() for a in p])} day .",
        lambda: f"yes , {pron} can {s.vi()} .",
        lambda: f"no , {pron} can not {s.vi()} .",
        lambda: f"{s.np(noun=noun)} is not {s.pick(_adjectives(noun))} .",
        lambda: f"i like the color {s.pick(V.COLOURS)} .",
        lambda: f"the color of {s.np(_NOT_PEOPLE)} is {s.pick(V.COLOURS)} .",
        lambda: f"{s.np(anim)} {s.pick(('plays', 'played'))} with {s.np()} .",
        lambda: f"{s.np(anim)} {s.pick(('likes', 'loves', 'sees', 'helps', 'hugs'))} "
                f"{s.pick(V.OBJECT_PRONOUNS)} .",
        lambda: f"{subj} {'does' if subj_third else 'do'} not like {s.np()} .",
    )
    return s.pick(templates)()


def _pretrain_question(s: _Speaker) -> str:
    """A simple question, as everyday text has a few of.

    Half in the forms of questions.txt (never its lines), half wh-forms it avoids: a
    pre-trained model has seen now and then that a sentence can start with "can" or
    "what color" and end in "?", which is what gives fine-tuning its head start (the
    story's step-1 loss far below ln(V)); fine-tuning shifts the distribution from a few
    percent questions to all questions.
    """
    if s.rng.random() < 0.5:
        return _question(s)
    templates: tuple[Callable[[], str], ...] = (
        lambda: f"who is {s.place()} ?",
        lambda: f"what is {s.place()} ?",
        lambda: f"what do {s.pick(_NOT_THIRD_PERSON)} {s.pick(V.TRANSITIVE_VERBS)} ?",
        lambda: f"what does {s.np(V.ANIMATE_KINDS)} {s.pick(V.TRANSITIVE_VERBS)} ?",
        lambda: f"where did {s.np(V.ANIMATE_KINDS)} go ?",
        lambda: f"who has {s.np(dets=('a',), adj_p=1)} ?",
        lambda: f"who can {s.vi()} ?",
    )
    return s.pick(templates)()


def _question(s: _Speaker) -> str:
    """A question for questions.txt: yes/no, where, what color, do/does."""
    anim, dets = V.ANIMATE_KINDS, V.DEFINITE_DETERMINERS
    noun = s.noun()
    coloured = s.noun(_NOT_PEOPLE)
    templates: tuple[Callable[[], str], ...] = (
        lambda: f"can {s.np(anim, dets=dets)} {s.vi()} ?",
        lambda: f"can {s.np(anim, dets=dets)} {s.vi()} {s.place()} ?",
        lambda: f"where is {s.np(dets=dets)} ?",
        lambda: f"do you like {s.np()} ?",
        lambda: f"do {s.pick(_NOT_THIRD_PERSON)} {s.vp()} ?",
        lambda: f"is {s.np(noun=noun, dets=dets)} {s.pick(_adjectives(noun))} ?",
        lambda: f"does {s.np(anim, dets=dets)} {s.vp()} ?",
        lambda: f"what color is {s.pick(dets)} {s.pick(V.COLOURS)} {coloured} ?",
        lambda: f"is {s.np(noun=noun, dets=dets)} {s.place(avoid=noun)} ?",
        lambda: f"can you see {s.np()} ?",
        lambda: f"are {s.np(anim, dets=dets)} and {s.np(anim, dets=dets)} {s.place()} ?",
    )
    return s.pick(templates)()


# Instruction tasks: each returns (prompt, completion), the completion being
# a function of the prompt text alone so that exact match is a fair metric.
def _task_colour(s: _Speaker) -> tuple[str, str]:
    det, colour = s.pick(V.DEFINITE_DETERMINERS), s.pick(V.COLOURS)
    noun = s.noun(_NOT_PEOPLE)
    size = f"{s.pick(_NEUTRAL)} " if s.rng.random() < 0.5 else ""
    return (f"what color is {det} {size}{colour} {noun} ?",
            f"{det} {size}{noun} is {colour} .")


def _task_can(s: _Speaker) -> tuple[str, str]:
    np, verb = s.np(V.ANIMATE_KINDS, dets=V.DEFINITE_DETERMINERS), s.vi()
    where = f" {s.place()}" if s.rng.random() < 0.5 else ""
    return f"can {np} {verb}{where} ?", f"yes , {np} can {verb}{where} ."


def _task_is(s: _Speaker) -> tuple[str, str]:
    # Both adjectives come from one exclusive group, so "no" is certain.
    group = s.pick((V.COLOURS,) + V.OPPOSITES)
    noun = s.noun(_NOT_PEOPLE if group is V.COLOURS else _ALL_KINDS)
    det, actual = s.pick(V.DEFINITE_DETERMINERS), s.pick(group)
    asked = actual if s.rng.random() < 0.5 else s.pick([a for a in group if a != actual])
    answer = "yes" if asked == actual else "no"
    return (f"is {det} {actual} {noun} {asked} ?",
            f"{answer} , {det} {noun} is {actual} .")


def _task_where(s: _Speaker) -> tuple[str, str]:
    nouns = s.rng.sample([n for k in ("animal", "person", "thing") for n in V.NOUNS[k]], 2)
    first = s.place(avoid=nouns[0])
    places = [first, s.place(avoid=nouns[1], exclude=(first,))]
    facts = " ".join(f"the {n} is {p} ." for n, p in zip(nouns, places))
    k = s.rng.randrange(2)
    return f"{facts} where is the {nouns[k]} ?", f"the {nouns[k]} is {places[k]} ."


_TASKS = (_task_colour, _task_can, _task_is, _task_where)


def _instruction(s: _Speaker) -> tuple[str, str]:
    return s.pick(_TASKS)(s)


def _chat(s: _Speaker, exclude: Collection[str]) -> dict:
    """A chat record: optional system turn, then one or two task rounds."""
    messages = []
    if s.rng.random() < 0.3:
        messages.append({"role": "system", "content": s.pick(V.SYSTEM_PROMPTS)})
    for _ in range(1 if s.rng.random() < 0.6 else 2):
        prompt, completion = _instruction(s)
        while prompt in exclude:  # never train on an evaluation prompt
            prompt, completion = _instruction(s)
        messages += [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": completion}]
    return {"messages": messages}


def _preference_prompt(s: _Speaker) -> tuple[str, Callable[[str], str]]:
    """A sentence start and a function giving a continuation of a polarity."""
    kind = s.rng.randrange(4)
    det = s.pick(V.DEFINITE_DETERMINERS)
    if kind == 0:  # "the dog is" -> "happy ." / "very sad ." / "red and big ."
        noun = s.noun()

        def fill(pol: str) -> str:
            first, second = s.rng.sample(_adjectives(noun, pol), 2)
            return s.pick((f"{first} .", f"very {first} .", f"{first} and {second} ."))
        return f"{det} {noun} {s.pick(('is', 'was'))}", fill
    if kind == 1:  # "i like the" -> "nice cat ."
        pron = s.pick(V.PRONOUNS)
        verb = s.pick(("like", "see", "want", "have", "find", "hold"))
        third, past, kinds = V.TRANSITIVE_VERBS[verb]
        verb = s.pick((third if V.PRONOUNS[pron][2] else verb, past))
        noun = s.noun(kinds)
        return f"{pron} {verb} {det}", lambda pol: f"{s.pick(_adjectives(noun, pol))} {noun} ."
    if kind == 2:  # "today was a" -> "fun day ."
        return (s.pick(("it was a", "today is a", "today was a")),
                lambda pol: f"{s.pick(V.DAY_ADJECTIVES[pol])} day .")
    noun = s.noun(V.ANIMATE_KINDS)  # "the cat sat on the bed and was" -> "glad ."
    pools = {"neutral": V.STATE_ADJECTIVES, "positive": _adjectives(noun, "positive"),
             "negative": _adjectives(noun, "negative")}
    return (f"{det} {noun} {s.vi('past')} {s.place()} and was",
            lambda pol: f"{s.pick(('', 'very '))}{s.pick(pools[pol])} .")


# Chosen is never worse than neutral and rejected never better, with at
# least one of them non-neutral, so the score order is strict.
_POLARITY_PAIRS = (("positive", "negative"), ("positive", "negative"),
                   ("positive", "neutral"), ("neutral", "negative"))


def _preference(s: _Speaker) -> dict:
    prompt, fill = _preference_prompt(s)
    good, bad = s.pick(_POLARITY_PAIRS)
    return {"prompt": prompt, "chosen": fill(good), "rejected": fill(bad)}


def _reviews(rng: random.Random, split: str, per_label: int) -> list[dict]:
    """Balanced review sentences using only the split's sentiment words."""
    records = []
    for label, words in V.REVIEW_WORDS[split].items():
        pairs = [(t, w) for t in V.REVIEW_TEMPLATES for w in words]
        records += [{"text": t.format(w), "label": label}
                    for t, w in rng.sample(pairs, per_label)]
    rng.shuffle(records)
    return records


def _distinct(sample: Callable[[], object], n: int, exclude: Collection = (),
              key: Callable[[object], object] = lambda item: item) -> list:
    """Draw n items whose keys are pairwise distinct and not in exclude."""
    seen, items = set(exclude), []
    for _ in range(100 * n):
        item = sample()
        if key(item) not in seen:
            seen.add(key(item))
            items.append(item)
            if len(items) == n:
                return items
    raise RuntimeError(f"could only draw {len(items)} of {n} distinct items")


def _mixed(s: _Speaker, statements: int, questions: int, exclude: Collection[str]) -> list[str]:
    """Distinct statements and simple questions, shuffled together."""
    lines = _distinct(lambda: _pretrain_statement(s), statements, exclude)
    lines += _distinct(lambda: _pretrain_question(s), questions, exclude)
    s.rng.shuffle(lines)
    return lines


def check_in_vocabulary(vocabulary: Collection[str], texts: Iterable[str], corpus: str) -> None:
    """Raise if any token of texts is missing from the vocabulary.

    Args:
        vocabulary: The allowed tokens (the unique tokens of pretrain.txt).
        texts: The texts of one corpus.
        corpus: The corpus name, used in the error message.

    Raises:
        ValueError: Naming the corpus and the out-of-vocabulary tokens.
    """
    missing = sorted({t for text in texts for t in tokenize_words(text)} - set(vocabulary))
    if missing:
        raise ValueError(f"{corpus} uses tokens absent from pretrain.txt: {missing}")


def _corpus_texts(records: list) -> list[str]:
    """Every piece of text in a list of lines or JSON records."""
    texts = []
    for record in records:
        if isinstance(record, str):
            texts.append(record)
        elif "messages" in record:
            texts += [m["content"] for m in record["messages"]]
        else:
            texts += [v for v in record.values() if isinstance(v, str)]
    return texts


def build_corpora(seed: int = 0) -> dict[str, list]:
    """Build every corpus in memory and check the tiny ones' vocabulary.

    Args:
        seed: Base seed; each file gets its own generator derived from it.

    Returns:
        File name -> list of lines (str) or JSON records (dict).

    Raises:
        ValueError: If a tiny corpus uses a token absent from pretrain.txt.
    """
    def speaker(name: str) -> _Speaker:
        # String seeds are hashed with SHA-512, stable across processes.
        return _Speaker(random.Random(f"{seed}/{name}"))

    out: dict[str, list] = {}
    out["pretrain.txt"] = _mixed(speaker("pretrain"), 3720, 280, ())
    out["retain.txt"] = _mixed(speaker("retain"), 279, 21, set(out["pretrain.txt"]))
    s = speaker("questions")
    questions = _distinct(lambda: _question(s), 500, set(out["pretrain.txt"]))
    out["questions.txt"], out["questions_eval.txt"] = questions[:400], questions[400:]
    s = speaker("instructions")
    # Equal shares of each task in both splits, then shuffled.
    per_task = [_distinct(lambda t=t: t(s), 120, key=lambda pc: pc[0]) for t in _TASKS]
    train = [pc for items in per_task for pc in items[:100]]
    test = [pc for items in per_task for pc in items[100:]]
    s.rng.shuffle(train)
    s.rng.shuffle(test)
    out["instructions.jsonl"], out["instructions_eval.jsonl"] = (
        [{"prompt": p, "completion": c} for p, c in pairs] for pairs in (train, test))
    eval_prompts = {p for p, _ in test}
    s = speaker("chat")
    out["chat.jsonl"] = _distinct(lambda: _chat(s, eval_prompts), 100, key=json.dumps)
    s = speaker("preferences")
    out["preferences.jsonl"] = _distinct(lambda: _preference(s), 400, key=json.dumps)
    s = speaker("ppo")
    out["ppo_prompts.txt"] = _distinct(lambda: _preference_prompt(s)[0], 100)
    rng = random.Random(f"{seed}/sentiment")
    out["sentiment_train.jsonl"] = _reviews(rng, "train", 100)
    out["sentiment_test.jsonl"] = _reviews(rng, "test", 50)

    vocabulary = {t for line in out["pretrain.txt"] for t in tokenize_words(line)}
    for name, records in out.items():
        if name != "pretrain.txt" and not name.startswith("sentiment_"):
            check_in_vocabulary(vocabulary, _corpus_texts(records), name)
    return out


def generate_all(out_dir: Path, seed: int = 0) -> dict[str, int]:
    """Generate every shipped corpus and write it under out_dir.

    Args:
        out_dir: Destination folder, created if missing.
        seed: Base seed; the shipped files use 0.

    Returns:
        File name -> number of lines written.

    Raises:
        ValueError: If a tiny corpus uses a token absent from pretrain.txt
            (nothing is written then).
    """
    corpora = build_corpora(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in corpora.items():
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
        (out_dir / name).write_text("".join(f"{line}\n" for line in lines),
                                    encoding="utf-8", newline="\n")
    return {name: len(records) for name, records in corpora.items()}


def data_path(name: str) -> Path:
    """Path of a corpus shipped inside the installed package.

    Args:
        name: A file name from :data:`DATA_FILES`, e.g. ``"pretrain.txt"``.

    Returns:
        The file's path.

    Raises:
        FileNotFoundError: If no such file ships; the message lists those that do.
    """
    folder = files("lmtune.assets") / "data"
    resource = folder / name
    if not resource.is_file():
        available = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        raise FileNotFoundError(f"no shipped corpus named {name!r}; available: {', '.join(available)}")
    return Path(str(resource))


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m lmtune.assets.corpora [--out DIR] [--seed N]``."""
    parser = argparse.ArgumentParser(description="Regenerate lmtune's shipped corpora.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data",
                        help="output folder (default: the package's data folder)")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    args = parser.parse_args(argv)
    for name, count in generate_all(args.out, args.seed).items():
        print(f"{count:6d}  {args.out / name}")


if __name__ == "__main__":
    main()
