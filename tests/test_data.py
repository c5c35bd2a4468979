"""Tests of tinyllama.data: the story world (exact probabilities, unambiguity, entropy) and the TinyStories loader.

No test touches the network: downloads use file:// addresses of files the tests write, and the
offline error comes from http://127.0.0.1:9 (nothing listens there).
"""
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from tinyllama.data import (DEFAULT_TABLES, TINYSTORIES_FILES, TINYSTORIES_REPO, DownloadError, Estimate,
                            StoryWorld, default_world, entropy_estimate, load_tinystories, mean_ci,
                            parse_tinystories, ratio_ci, sample_story, sha256_of, story_corpus,
                            story_log_prob, tinystories_file, train_heldout,
                            verify_unambiguous)


@pytest.fixture(scope="module")
def world():
    return StoryWorld()


@pytest.fixture(scope="module")
def samples(world):
    return world.sample(3000, seed=2024)


def _table_for(story_fields, field, tables):
    "The table a field was drawn from, worked out from the story program's rules."
    if field == "ending": return tables["ending_" + story_fields["event"]]
    if field == "feeling": return tables["feeling_" + story_fields["ending"]]
    if field == "closing": return tables["closing_" + story_fields["ending"]]
    if field == "friend": return tuple((n, w) for n, w in tables["hero"] if n != story_fields["hero"])
    return tables[field]


# ---------------------------------------------------------------- sampling and probabilities

def test_same_seed_same_stories_and_different_seeds_differ(world):
    a, b, c = world.sample(100, seed=5), world.sample(100, seed=5), world.sample(100, seed=6)
    assert [s.text for s in a] == [s.text for s in b]
    assert [s.text for s in a] != [s.text for s in c]
    assert story_corpus(10, seed=5) == [s.text for s in a[:10]]


def test_step_probabilities_come_from_the_tables(world, samples):
    for s in samples[:500]:
        fields = s.fields
        total = 0.0
        for field, value, p in s.steps:
            table = _table_for(fields, field, world.tables)
            weights = dict(table)
            assert math.isclose(p, weights[value] / sum(weights.values()))
            total += math.log(p)
        assert math.isclose(s.log_prob, total)
        assert s.log_prob < 0


def test_every_value_printed_appears_in_text(samples):
    for s in samples[:300]:
        for field in ("hero", "animal", "colour", "object", "place", "feeling"):
            assert getattr(s, field) in s.text
        assert s.ending in ("happy", "sad") and s.event in ("lost", "friend", "rain", "broken")
        assert (s.friend is not None) == (s.event == "friend")
        if s.friend is not None: assert s.friend != s.hero


def test_probabilities_of_a_small_world_sum_to_one_and_match_frequencies():
    # A world small enough to see every story: the exact probabilities of all distinct texts must sum
    # to 1, and each text's frequency among samples must agree with its probability.
    one = lambda table: (table[0],)
    tables = {name: one(t) for name, t in DEFAULT_TABLES.items()}
    tables.update(hero=(("Mia", 3), ("Tom", 1)), colour=(("red", 1), ("orange", 2)),
                  event=(("lost", 1), ("rain", 2)), ending_lost=(("happy", 3), ("sad", 1)),
                  ending_rain=(("happy", 1), ("sad", 1)))
    small = StoryWorld(tables=tables)
    stories = small.sample(4000, seed=0)
    probs = {s.text: math.exp(s.log_prob) for s in stories}
    assert len(probs) == 2 * 2 * (2 + 2)  # hero x colour x (event, ending)
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-12)
    counts = Counter(s.text for s in stories)
    for text, p in probs.items():
        sd = math.sqrt(len(stories) * p * (1 - p))
        assert abs(counts[text] - len(stories) * p) < 5 * sd
    # the exact entropy, from the enumeration, is inside both estimators' intervals
    H = -sum(p * math.log(p) for p in probs.values())
    for method in ("sample", "chain"):
        est = entropy_estimate(4000, seed=1, world=small, method=method)
        assert est.lo < H < est.hi
    # and the chain-rule terms are exact per story shape: their mean over all stories is H
    assert math.isclose(sum(probs[s.text] * s.entropy_terms for s in {s.text: s for s in stories}.values()), H)


# ---------------------------------------------------------------- parsing and unambiguity

def test_parser_recovers_every_derivation_exactly(world, samples):
    assert verify_unambiguous(samples, world) == len(samples)
    for s in samples[:200]:
        assert math.isclose(story_log_prob(s.text), s.log_prob)
        assert world.parse(s.text).steps == s.steps


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32))
def test_parse_inverts_sample_for_any_seed(seed):
    s = sample_story(random.Random(seed))
    found = default_world().derivations(s.text)
    assert len(found) == 1 and found[0].steps == s.steps and math.isclose(found[0].log_prob, s.log_prob)


def test_parser_rejects_text_the_world_cannot_write(world, samples):
    s = samples[0].text
    for bad in ["", "Hello.", s + " ", s + " The end.", s[:-1], s.replace(".", "!", 1),
                s.replace(samples[0].hero, "Zed", 1), s.lower()]:
        assert world.derivations(bad) == []
        with pytest.raises(ValueError, match="cannot produce"):
            world.log_prob(bad)
    with pytest.raises(ValueError, match="string"):
        world.parse(None)


def test_checker_catches_an_ambiguous_world():
    shaky = StoryWorld(tables={"trait": (("little", 1), ("little brown", 1)),
                               "animal": (("bear", 1), ("brown bear", 1))})
    with pytest.raises(AssertionError, match="2 derivations"):
        verify_unambiguous(shaky.sample(100, seed=0), shaky)
    s = next(s for s in shaky.sample(100, seed=0) if "little brown bear" in s.text)
    with pytest.raises(ValueError, match="ambiguous"):
        shaky.parse(s.text)


def test_later_mentions_disambiguate():
    light = StoryWorld(tables={"colour": (("light", 1), ("light blue", 1)), "object": (("ball", 1), ("blue ball", 1))})
    assert verify_unambiguous(light.sample(200, seed=0), light) == 200


# ---------------------------------------------------------------- fixed fields and validation

def test_fixed_fields(world):
    stories = world.sample(50, seed=3, hero="Mia", colour="red", object="kite", ending="happy")
    assert all((s.hero, s.colour, s.object, s.ending) == ("Mia", "red", "kite", "happy") for s in stories)
    assert all(math.isclose(world.log_prob(s.text), s.log_prob) for s in stories)
    assert all("Mia had" not in s.text and "She had a red kite." in s.text for s in stories)
    with pytest.raises(ValueError, match="not a possible hero"):
        world.sample(1, hero="Zed")
    with pytest.raises(ValueError, match="not choices"):
        world.sample(1, spaceship="red")


@pytest.mark.parametrize("kwargs, match", [
    (dict(tables={"colour": (("red", 1), ("red", 2))}), "twice"),
    (dict(tables={"colour": (("red", 0),)}), "positive"),
    (dict(tables={"colour": (("red", float("nan")),)}), "positive"),
    (dict(tables={"colour": ()}), "empty"),
    (dict(tables={"spaceship": (("red", 1),)}), "no table"),
    (dict(tables={"hero": (("Mia", 1), ("Zed", 1))}), "pronoun"),
    (dict(tables={"hero": (("Mia", 1),)}), "two names"),
    (dict(tables={"event": (("flood", 1),)}), "unknown event"),
    (dict(tables={"ending_rain": (("happy", 1), ("meh", 1))}), "endings"),
])
def test_world_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StoryWorld(**kwargs)


def test_new_hero_with_pronoun():
    w = StoryWorld(tables={"hero": (("Mia", 1), ("Zed", 1))}, pronouns={"Zed": "he"})
    zed = w.sample(20, seed=0, hero="Zed")
    assert all(" He lived" in s.text for s in zed)
    assert verify_unambiguous(w.sample(200, seed=1), w) == 200


def test_sample_rejects_bad_n(world):
    for n in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="non-negative integer"):
            world.sample(n)


# ---------------------------------------------------------------- estimates and splits

def test_mean_ci_and_ratio_ci():
    xs = [1.0, 2.0, 4.0, 7.0]
    m = sum(xs) / 4
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / 3)
    assert mean_ci(xs) == Estimate(m, m - 1.96 * sd / 2, m + 1.96 * sd / 2)
    with pytest.raises(ValueError): mean_ci([1.0])
    r = ratio_ci([3, 5, 8], [1, 2, 4])
    assert math.isclose(r.mean, 16 / 7) and r.lo < r.mean < r.hi
    assert ratio_ci([2, 4, 6], [1, 2, 3]) == Estimate(2.0, 2.0, 2.0)  # exact proportionality: no spread
    with pytest.raises(ValueError): ratio_ci([1, 2], [1])


def test_entropy_estimates_agree(world):
    a = entropy_estimate(3000, seed=11, world=world)
    b = entropy_estimate(3000, seed=11, world=world, method="chain")
    assert a.lo < b.mean < a.hi and b.lo < a.mean < b.hi
    assert b.hi - b.lo < a.hi - a.lo
    c = entropy_estimate(3000, seed=11, world=world, per="char")
    stories = world.sample(3000, seed=11)
    assert math.isclose(c.mean, sum(-s.log_prob for s in stories) / sum(len(s.text) for s in stories))
    with pytest.raises(ValueError, match="method"): entropy_estimate(10, method="exact")
    with pytest.raises(ValueError, match="per"): entropy_estimate(10, per="word")


def test_train_heldout_independent_streams():
    tr, ho = train_heldout(300, 100, seed=1)
    tr2, ho2 = train_heldout(300, 100, seed=1)
    assert [s.text for s in tr] == [s.text for s in tr2] and [s.text for s in ho] == [s.text for s in ho2]
    assert [s.text for s in tr[:100]] != [s.text for s in ho]


# ---------------------------------------------------------------- TinyStories

def test_parse_tinystories_format():
    text = "First story.\nSecond line.\n<|endoftext|>\n\n  Second story.  \r\n<|endoftext|>\n<|endoftext|>\nLast"
    assert parse_tinystories(text) == ["First story.\nSecond line.", "Second story.", "Last"]
    assert parse_tinystories("") == []


def test_load_tinystories_from_a_local_file(tmp_path):
    src = tmp_path / "TinyStories-mini.txt"
    src.write_text("A cat sat.\n<|endoftext|>\nA dog ran.\nIt was fast.\n<|endoftext|>\nThe end.\n")
    got = load_tinystories(path=src)
    assert got == ["A cat sat.", "A dog ran.\nIt was fast.", "The end."]
    assert load_tinystories(path=src, max_stories=2) == got[:2]
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_tinystories(path=tmp_path / "missing.txt")


def test_tinystories_come_from_the_hub_dataset_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kw):  # what the Hub's client would return: a cached path
        calls.append((repo_id, filename, kw))
        f = tmp_path / filename
        f.write_text("One.\n<|endoftext|>\nTwo.\n")
        return str(f)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_tinystories("train", cache_dir=tmp_path / "hub", revision="abc") == ["One.", "Two."]
    repo, name, kw = calls[0]
    assert (repo, name) == (TINYSTORIES_REPO, TINYSTORIES_FILES["train"]) == ("roneneldan/TinyStories",
                                                                              "TinyStoriesV2-GPT4-train.txt")
    assert kw["repo_type"] == "dataset" and kw["revision"] == "abc" and kw["cache_dir"] == tmp_path / "hub"
    assert tinystories_file(progress=False).name == "TinyStoriesV2-GPT4-valid.txt"
    assert calls[-1][2]["tqdm_class"] is not None  # a bar that never shows


def test_offline_error_is_clear_and_fast(tmp_path):
    # The real client, with the network ruled out and an empty cache: what an offline reader meets.
    with pytest.raises(DownloadError) as e:
        tinystories_file("validation", cache_dir=tmp_path / "hub", local_only=True)
    msg = str(e.value)
    assert "TinyStoriesV2-GPT4-valid.txt" in msg and "offline" in msg and "StoryWorld" in msg
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.txt"))


def test_sha256_of_a_file(tmp_path):
    f = tmp_path / "f.txt"
    f.write_bytes(b"hello")
    assert sha256_of(f) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_load_tinystories_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_tinystories("test", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="max_stories"):
        load_tinystories(path=tmp_path / "x.txt", max_stories=0)


# ---------------------------------------------------------------- opt-in variants (appendix H)

# sha256 of the first 2000 stories of StoryWorld().sample(2000, seed=0) (text, log_prob,
# steps), computed with the generator as it was before the options were added.
DEFAULT_STORIES_SHA = "292cdc433f3b0f5a0442bd4868b1f3961e89695a4e513fe9e20105850bd8dc7e"
VARIANTS = [dict(attribute_after=True), dict(one_animal=True), dict(one_place=True),
            dict(attribute_after=True, one_animal=True, one_place=True)]


def _stories_sha(world, n=2000, seed=0):
    import hashlib
    h = hashlib.sha256()
    for s in world.sample(n, seed=seed):
        h.update((s.text + "|" + repr(round(s.log_prob, 9)) + "|" + repr(s.steps) + "\n").encode())
    return h.hexdigest()


def _words(text):
    import re
    return set(re.findall(r"[a-z]+", text.lower()))


def test_options_off_leave_the_default_stories_unchanged():
    off = dict(attribute_after=False, one_animal=False, one_place=False)
    assert _stories_sha(StoryWorld()) == DEFAULT_STORIES_SHA
    assert _stories_sha(StoryWorld(**off)) == DEFAULT_STORIES_SHA
    assert _stories_sha(default_world()) == DEFAULT_STORIES_SHA
    assert StoryWorld(**off).tables == DEFAULT_TABLES
    # any option changes the stories (the hash can tell)
    assert all(_stories_sha(StoryWorld(**kw), n=50) != _stories_sha(StoryWorld(), n=50) for kw in VARIANTS)


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "+".join(kw))
def test_variants_are_unambiguous_and_exact(kw):
    w = StoryWorld(**kw)
    stories = w.sample(400, seed=7)
    assert verify_unambiguous(stories, w) == 400
    assert all(math.isclose(w.log_prob(s.text), s.log_prob) for s in stories[:50])
    assert any(not default_world().derivations(s.text) for s in stories[:50])  # new texts


def test_attribute_after_puts_the_attribute_after_its_noun():
    from tinyllama.data import _an
    after, before = StoryWorld(attribute_after=True).sample(500, seed=3), StoryWorld().sample(500, seed=3)
    for s in after:
        assert f"there was {s.hero}, {_an(s.get('trait'))} {s.animal}." in s.text
        assert f"had {_an(s.object)} that was {s.colour}." in s.text
        assert f"{s.colour} {s.object}" not in s.text and f"{s.animal} named {s.hero}" not in s.text
    for s in before:  # the default: before the noun
        assert f"{_an(s.colour)} {s.object}." in s.text and f"{s.animal} named {s.hero}." in s.text
    # the same choices with the same probabilities: only the order of the words changed
    assert sorted(-s.log_prob for s in after)[250] == pytest.approx(sorted(-s.log_prob for s in before)[250], rel=0.1)


def _animals_named(s):
    names = {v for v, _ in DEFAULT_TABLES["animal"]} | {v for v, _ in DEFAULT_TABLES["friend_animal"]}
    return _words(s.text) & (names | {"bird", "owl"})


def _places_named(s):
    places = {v for v, _ in DEFAULT_TABLES["place"]} | {"house", "sea", "town"}
    return _words(s.text) & places


def test_one_animal_leaves_the_hero_the_only_animal():
    stories = StoryWorld(one_animal=True).sample(1500, seed=4)
    assert {"friend", "lost"} <= {s.event for s in stories}
    for s in stories:
        assert _animals_named(s) == {s.animal}, s.text
        assert s.get("friend_animal") is None and s.get("helper") not in ("a kind bird", "an old owl")
        if s.event == "friend":
            assert f"met a new friend named {s.friend}." in s.text
    # the test can fail: default stories name a second animal
    assert any(len(_animals_named(s)) > 1 for s in default_world().sample(200, seed=4))


def test_one_place_leaves_the_hero_one_place():
    stories = StoryWorld(one_place=True).sample(1500, seed=5)
    for s in stories:
        assert s.get("home") is None and " lived with " in s.text
        assert _places_named(s) == {s.place}, s.text
    assert any(len(_places_named(s)) > 1 for s in default_world().sample(200, seed=5))


@pytest.mark.parametrize("kw", [{}] + VARIANTS, ids=lambda kw: "+".join(kw) or "default")
def test_every_answer_is_in_the_story(kw):
    # the Q/A generator of chapter 09 reads answers off the derivation: they must be in the text
    from tinyllama.sft import QUESTION_KINDS, story_questions
    stories = StoryWorld(**kw).sample(600, seed=6)
    seen = set()
    for s in stories:
        for q in story_questions(s):
            seen.add(q.kind)
            if q.kind == "ending":  # inferred, not said: the feeling is from that ending's table
                assert s.get("feeling") in {v for v, _ in DEFAULT_TABLES["feeling_" + q.answer]}
            else:
                assert q.answer.lower() in _words(s.text), (q.kind, q.answer, s.text)
    assert seen == set(QUESTION_KINDS)


def test_bad_option_values():
    with pytest.raises(TypeError, match="attribute_after"):
        StoryWorld(attribute_after=1)
    with pytest.raises(TypeError, match="one_place"):
        StoryWorld(one_place="yes")
    with pytest.raises(ValueError, match="helper"):  # no helper left that is not an animal
        StoryWorld(tables={"helper": (("a kind bird", 1),)}, one_animal=True)
