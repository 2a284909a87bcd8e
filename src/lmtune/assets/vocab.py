"""Word tables for the shipped corpora (see :mod:`lmtune.assets.corpora`).

The tiny "grade 1" grammar lives here as plain data so that the generator
stays readable. Every word in these tables (except the movie-review tables
at the bottom) ends up in the pre-training corpus, so changing them changes
the tokenizer vocabulary of every example that uses the shipped data.
"""

from __future__ import annotations

# Nouns by kind. The kind decides which verbs and adjectives a noun may take,
# so that "the cup is angry" or "the boy eats the ball" are never generated.
NOUNS: dict[str, tuple[str, ...]] = {
    "animal": (
        "cat", "dog", "bird", "fish", "cow", "pig", "duck", "frog",
        "hen", "fox", "bear", "bee", "goat", "horse", "rabbit", "mouse",
        "owl", "lamb", "ant",
    ),
    "person": (
        "boy", "girl", "mom", "dad", "baby", "man", "woman", "friend",
        "teacher", "kid", "sister", "brother",
    ),
    "thing": (
        "ball", "hat", "cup", "box", "car", "bus", "book", "kite", "bag",
        "toy", "doll", "drum", "sock", "shoe", "boat", "bike", "pen",
        "flower", "tree", "bell", "pot",
    ),
    "food": ("cake", "apple", "egg", "cookie", "pie", "bun", "carrot", "pear"),
}
ANIMATE_KINDS = ("animal", "person")

# Where things can be. A place is never combined with the noun it names
# ("the box is in the box").
PLACES: tuple[str, ...] = (
    "in the park", "on the bed", "under the tree", "by the pond", "at school",
    "at home", "in the yard", "on the hill", "in the box", "on the table",
    "in the room", "near the lake", "in the garden", "on the farm",
    "in the house", "on the bus", "at the zoo", "on the road",
)

# Intransitive verbs: base -> (3rd person singular, past, -ing form).
INTRANSITIVE_VERBS: dict[str, tuple[str, str, str]] = {
    "run": ("runs", "ran", "running"), "jump": ("jumps", "jumped", "jumping"),
    "sit": ("sits", "sat", "sitting"), "swim": ("swims", "swam", "swimming"),
    "sleep": ("sleeps", "slept", "sleeping"),
    "walk": ("walks", "walked", "walking"),
    "play": ("plays", "played", "playing"),
    "sing": ("sings", "sang", "singing"), "hop": ("hops", "hopped", "hopping"),
    "nap": ("naps", "napped", "napping"),
    "dance": ("dances", "danced", "dancing"),
    "hide": ("hides", "hid", "hiding"), "rest": ("rests", "rested", "resting"),
}

# Transitive verbs: base -> (3rd person singular, past, noun kinds of object).
_ANY = ("animal", "person", "thing", "food")
TRANSITIVE_VERBS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "see": ("sees", "saw", _ANY),
    "like": ("likes", "liked", _ANY),
    "love": ("loves", "loved", _ANY),
    "want": ("wants", "wanted", ("animal", "thing", "food")),
    "have": ("has", "had", ("animal", "thing", "food")),
    "find": ("finds", "found", ("animal", "thing")),
    "get": ("gets", "got", ("thing", "food")),
    "hold": ("holds", "held", ("animal", "thing", "food")),
    "help": ("helps", "helped", ANIMATE_KINDS),
    "hug": ("hugs", "hugged", ANIMATE_KINDS),
    "eat": ("eats", "ate", ("food",)),
    "kick": ("kicks", "kicked", ("thing",)),
}

COLOURS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "pink", "black", "white", "brown",
    "purple", "gray",
)
# Mutually exclusive pairs: "is the big cat small ?" has a definite answer.
OPPOSITES: tuple[tuple[str, str], ...] = (
    ("big", "small"), ("hot", "cold"), ("fast", "slow"), ("old", "new"),
    ("wet", "dry"), ("clean", "dirty"), ("long", "short"),
)
OTHER_ADJECTIVES: tuple[str, ...] = ("little", "tall", "soft")

# Sentiment words, split by what they can describe: evaluative words fit any
# noun, mood words only people and animals.
POSITIVE_EVALUATIVE = ("good", "nice", "fun", "great", "cute")
NEGATIVE_EVALUATIVE = ("bad", "ugly", "scary")
POSITIVE_MOOD = ("happy", "glad", "kind")
NEGATIVE_MOOD = ("sad", "mad", "angry", "sick", "mean")

# Adjectives that read well before "day" after "a" (no vowel onset).
DAY_ADJECTIVES = {
    "positive": ("good", "nice", "fun", "great"),
    "negative": ("bad", "sad", "scary"),
    "neutral": ("hot", "cold", "wet", "dry", "new", "long", "short"),
}
# States something can be in after doing something ("... and was wet .").
STATE_ADJECTIVES: tuple[str, ...] = ("wet", "dry", "hot", "cold", "clean", "dirty")

# Subject pronouns: pronoun -> (form of "be" now, form of "be" past, whether
# verbs take the 3rd person singular form).
PRONOUNS: dict[str, tuple[str, str, bool]] = {
    "i": ("am", "was", False), "you": ("are", "were", False),
    "we": ("are", "were", False), "they": ("are", "were", False),
    "he": ("is", "was", True), "she": ("is", "was", True),
    "it": ("is", "was", True),
}
OBJECT_PRONOUNS: tuple[str, ...] = ("me", "you", "him", "her", "us", "them")
DETERMINERS: tuple[str, ...] = ("the", "a", "my", "your", "his", "her", "our")
# Determiners for definite reference: questions about "a ball" make no sense.
DEFINITE_DETERMINERS: tuple[str, ...] = ("the", "my", "your", "his", "her")

SYSTEM_PROMPTS: tuple[str, ...] = (
    "you are a kind friend .", "you are a good friend .", "you can help me .",
)

# --- Ordinary English movie/product reviews (not in the tiny vocabulary) ---
# The test words never occur in the training split, so a classifier can only
# score well on the test split through what its pre-trained encoder knows.
REVIEW_TEMPLATES: tuple[str, ...] = (
    "The film was {}.", "I thought the acting was {}.",
    "The food at this place was {}.", "Overall, the product felt {}.",
    "The ending of the story was {}.", "My stay at the hotel was {}.",
    "The new album sounds {}.", "The customer service was {}.",
    "This phone is {}.", "The book was {} from start to finish.",
    "Honestly, the show was {}.", "The plot of the movie was {}.",
    "The staff were {} during our visit.", "The game felt {} to play.",
    "The design of this chair is {}.",
)
REVIEW_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "positive": (
            "good", "great", "lovely", "wonderful", "excellent", "amazing",
            "fantastic", "enjoyable", "pleasant", "brilliant", "beautiful",
            "charming", "impressive", "perfect", "nice", "outstanding", "fun",
            "awesome", "sweet", "cool",
        ),
        "negative": (
            "bad", "awful", "terrible", "boring", "poor", "horrible",
            "disappointing", "annoying", "ugly", "weak", "dull", "messy",
            "painful", "useless", "unpleasant", "mediocre", "sloppy", "clumsy",
            "lousy", "bland",
        ),
    },
    "test": {
        "positive": (
            "superb", "delightful", "marvelous", "splendid", "terrific",
            "magnificent", "stunning", "exceptional", "fabulous", "remarkable",
            "phenomenal", "gorgeous", "exquisite", "sublime", "glorious",
            "heartwarming", "captivating", "flawless", "masterful",
            "refreshing",
        ),
        "negative": (
            "dreadful", "atrocious", "abysmal", "dismal", "appalling",
            "tedious", "lackluster", "pathetic", "miserable", "shoddy",
            "insufferable", "wretched", "inferior", "subpar", "tiresome",
            "frustrating", "awkward", "forgettable", "unbearable", "clunky",
        ),
    },
}
