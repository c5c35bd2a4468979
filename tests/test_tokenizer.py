"""Tests of tinyllama.tokenizer: exact round trips, special tokens, save/load, and plain errors."""
import string

import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from tinyllama.data import story_corpus
from tinyllama.tokenizer import CHAT_TOKENS, Tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return story_corpus(2000, seed=0)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus, vocab_size=512)


def _words(corpus):
    return sorted({w for t in corpus[:300] for w in t.split()})


def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == len(tok) == 512 == len(tok.pieces)
    ids = [tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id, tok.system_id, tok.user_id, tok.assistant_id, tok.end_id]
    assert len(set(ids)) == len(ids) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.pad_id != tok.eos_id
    assert [tok.id_to_piece(tok.special_ids[p]) for p in CHAT_TOKENS] == list(CHAT_TOKENS)
    assert sum(p.startswith("<0x") for p in tok.pieces) == 256  # byte fallback pieces


def test_round_trip_on_corpus(tok, corpus):
    for text in corpus:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & set(tok.special_ids.values()) and tok.unk_id not in ids


def test_bos_eos_framing(tok, corpus):
    body = tok.encode(corpus[0])
    assert tok.encode(corpus[0], bos=True, eos=True) == [tok.bos_id] + body + [tok.eos_id]
    assert tok.encode(corpus[0], eos=True) == body + [tok.eos_id]
    assert tok.decode([tok.bos_id] + body + [tok.eos_id, tok.pad_id, tok.pad_id]) == corpus[0]
    assert tok.encode_batch(corpus[:3], bos=True) == [tok.encode(t, bos=True) for t in corpus[:3]]
    assert tok.decode_batch(tok.encode_batch(corpus[:3])) == corpus[:3]


def test_the_corpus_compresses(tok, corpus):
    # BPE with 512 pieces must beat one token per character on the text it was trained on
    chars = sum(len(t) for t in corpus[:200])
    tokens = sum(len(tok.encode(t)) for t in corpus[:200])
    assert tokens < chars / 2


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_round_trip_on_texts_of_corpus_words(tok, corpus, data):
    words = _words(corpus)
    parts = data.draw(st.lists(st.one_of(st.sampled_from(words), st.sampled_from(list(".,!?\"' \n\t0123456789"))),
                               max_size=40))
    seps = data.draw(st.lists(st.sampled_from(["", " ", "  ", "\n"]), min_size=len(parts), max_size=len(parts)))
    text = "".join(p + s for p, s in zip(parts, seps))
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text().filter(lambda s: "\u2581" not in s))
def test_round_trip_on_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # byte fallback: nothing is unknown


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(list(CHAT_TOKENS) + ["<s>", "</s>", "<pad>"]),
                          st.text(alphabet=string.ascii_letters + " .,!\n", max_size=12)), max_size=8))
def test_special_markers_round_trip_with_allow_special(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text, allow_special=True)
    assert tok.decode(ids, skip_special=False) == text
    n_markers = sum(p in tok.special_ids for p in parts)
    assert sum(i in tok._id_to_special for i in ids) == n_markers


def test_chat_markers_are_text_unless_allowed(tok):
    chat = "<|system|>Be kind.<|end|><|user|>Who is Mia?<|end|><|assistant|>A fox.<|end|>"
    plain = tok.encode(chat)
    assert not set(plain) & set(tok.special_ids.values()) and tok.decode(plain) == chat
    ids = tok.encode(chat, allow_special=True)
    assert [i for i in ids if i in tok._id_to_special] == [tok.system_id, tok.end_id, tok.user_id, tok.end_id,
                                                           tok.assistant_id, tok.end_id]
    assert tok.decode(ids) == "Be kind.Who is Mia?A fox."


def test_save_load(tok, corpus, tmp_path):
    path = tok.save(tmp_path / "sub" / "tok.model")
    for loaded in (Tokenizer.load(path), Tokenizer.from_file(str(path))):
        assert loaded.vocab_size == tok.vocab_size and loaded.special_ids == tok.special_ids
        assert [loaded.encode(t) for t in corpus[:50]] == [tok.encode(t) for t in corpus[:50]]
    sp = spm.SentencePieceProcessor(model_file=str(path))  # a plain SentencePiece model
    assert sp.encode(corpus[0]) == tok.encode(corpus[0])


def test_train_with_path_and_determinism(corpus, tmp_path):
    a = train_tokenizer(corpus[:500], vocab_size=400, path=tmp_path / "a.model")
    b = train_tokenizer(corpus[:500], vocab_size=400)
    assert (tmp_path / "a.model").is_file() and a.pieces == b.pieces


def test_bigger_vocab_gives_fewer_tokens(corpus):
    small, big = train_tokenizer(corpus, vocab_size=320), train_tokenizer(corpus, vocab_size=700)
    n = lambda t: sum(len(t.encode(s)) for s in corpus[:200])
    assert n(big) < n(small)


def test_errors(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match="empty"): train_tokenizer([], 512)
    with pytest.raises(ValueError, match="empty"): train_tokenizer(["", ""], 512)
    with pytest.raises(ValueError, match="not one string"): train_tokenizer("a story", 512)
    with pytest.raises(ValueError, match="too small"): train_tokenizer(corpus[:100], 100)
    with pytest.raises(ValueError, match="more than this corpus can fill"): train_tokenizer(["a small corpus"], 3000)
    with pytest.raises(ValueError, match="no tokenizer file"): Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"): Tokenizer.load(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="outside the vocabulary"): tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"): tok.decode([-1])
    with pytest.raises(ValueError, match="string"): tok.encode(["a list"])
    with pytest.raises(ValueError, match="list of strings"): tok.encode_batch("one string")


def test_model_without_special_tokens_is_rejected(corpus):
    import io
    m = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus[:300]), model_writer=m, vocab_size=200,
                                   minloglevel=2)
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer(m.getvalue())
