"""
GRPO (Group Relative Policy Optimization, DeepSeekMath's and R1's RL) on the words task, from an SFT run:

    python rl.py config/grpo_tinystories.py                                        # train into out-grpo
    python rl.py config/grpo_tinystories.py --eval_only=True --init_from=out-sft   # its mean reward

The task is TinyStoriesInstruct's "write a story that uses these words": the prompt is
"Features: Dialogue\\nWords: quit, oak, gloomy\\nStory: " (the Features line only for stories with dialogue),
the completion a story ended by <|endoftext|>. `from rl import reward` scores one; prepare.py --instruct
builds the SFT data with the same definitions.
"""
import random
import re
import zlib

# function words and the commonest story words: never one of the 3 chosen words
STOP_WORDS = frozenset("""the and was were she he they them their her his him you your our we its it's
that this these those there then than with for from into onto upon out off over under but not all any
some one two had has have did does are too very can could would should will just what when where who why
how said says say see saw got get went go goes came come like liked time day once upon little big never
about after before again because every always also much many more most only even
""".split())


def prompt_of(words, features=()):
    return (f"Features: {', '.join(features)}\n" if features else "") + f"Words: {', '.join(words)}\nStory: "


def choose_words(story, k=3):
    """k distinct content words of the story (lowercase in it: no names), chosen with a seed taken from the
    story's text, so the same story gets the same words on any machine; None if it has fewer."""
    words = sorted({w for w in re.findall(r"\b[a-z]{3,}\b", story) if w not in STOP_WORDS})
    return random.Random(zlib.crc32(story.encode())).sample(words, k) if len(words) >= k else None


def to_example(text):
    """One record -> (prompt, story), or None where there is no task. A TinyStoriesInstruct record (lines
    'Features: ...', 'Words: ...', 'Summary: ...', then 'Story: ...') keeps its words and features; a plain
    story gets 3 of its words, and 'Features: Dialogue' when someone in it speaks."""
    head, *story = re.split(r"(?m)^Story:", text, maxsplit=1)
    if story:
        meta = dict(re.findall(r"(?m)^(Words|Features):(.*)$", head))
        words, features = split_list(meta.get("Words")), split_list(meta.get("Features"))
        story = story[0].strip()
        return (prompt_of(words, features), story) if words and story else None
    words = choose_words(text)
    return words and (prompt_of(words, ["Dialogue"] if re.search("[\"\u201c]", text) else []), text)


def split_list(line):
    return [s.strip() for s in (line or "").split(",") if s.strip()]


def words_of(prompt):
    """The words a prompt asks for."""
    return split_list((re.findall(r"(?m)^Words:(.*)$", prompt) or [""])[-1])


def uses(story, word):
    """Whether the story has the word, whole, in any case, or a simple inflection of it: -s, -es, -d, -ed,
    -ing, and for a final e or y: dance -> dancing, cry -> cries, cried."""
    w = word.lower()
    stem = re.escape(w[:-1]) if w[-1:] in ("e", "y") and len(w) > 2 else None
    forms = rf"{re.escape(w)}(?:s|es|d|ed|ing)?" + (rf"|{stem}(?:ing|ies|ied)" if stem else "")
    return re.search(rf"\b(?:{forms})\b", story.lower()) is not None


def reward(story: str, words: list, ended: bool = True) -> float:
    """The fraction of the words that the story uses (uses()), in [0, 1]; 0 for a story that never ended
    (no end-of-text within max_new_tokens). A plain function: a learned reward model can replace it."""
    if not ended or not words:
        return 0.0
    return sum(uses(story, w) for w in words) / len(words)
