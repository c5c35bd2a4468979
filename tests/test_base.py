"""The shared base model: cache, then Hub, then train; never a stale or half-written model."""
import json
import threading
import time

import pytest
import torch

import tinyllama.base as base
from tinyllama.base import base_fingerprint, base_model, base_preset, load_base, save_base

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "One ci base model, trained once for the module, and its cache folder."
    cache = tmp_path_factory.mktemp("cache")
    return base_model("ci", cache=cache, hub=False, progress=False), cache


def test_the_first_call_trains_and_saves_a_complete_model_folder(trained):
    b, cache = trained
    assert b.source == "trained" and b.path.parent == cache
    names = {p.name for p in b.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer.json", "base.json"} <= names
    rec = json.loads((b.path / "base.json").read_text())
    assert rec["fingerprint"] == base_fingerprint(base_preset("ci"))
    assert rec["steps"] == base_preset("ci").train.steps and rec["losses"][-1] < rec["losses"][0]
    assert not list(cache.glob("*.tmp*"))  # the temporary folder was renamed away


def test_the_second_call_loads_the_same_weights_without_training(trained, monkeypatch):
    b, cache = trained
    monkeypatch.setattr(base, "_train_base", lambda *a: pytest.fail("trained again"))
    again = base_model("ci", cache=cache, hub=False)
    assert again.source == "cache"
    for (n, p), (_, q) in zip(b.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(p, q), n
    text = "Once upon a time, there was a cat named Mia."
    assert again.tokenizer.encode(text) == b.tokenizer.encode(text)
    assert [s.text for s in again.heldout_stories] == [s.text for s in b.heldout_stories]


def test_a_folder_made_by_another_recipe_is_refused(trained, tmp_path):
    b, _ = trained
    other = base_preset("ci")
    other = type(other)(**{**other.__dict__, "n_train_stories": 1499})
    with pytest.raises(ValueError, match="another|recipe"):
        load_base(b.path, other)
    with pytest.raises(ValueError, match="recipe"):
        load_base(b.path, base_preset("ci"), seed=1)


def test_the_hub_is_asked_for_the_fingerprint_revision_and_its_copy_is_cached(trained, tmp_path, monkeypatch):
    b, _ = trained
    upload = save_base(b, tmp_path / "hub-snapshot")  # what a maintainer uploaded
    calls = []

    def snapshot_download(repo, revision=None):
        calls.append((repo, revision))
        return str(upload)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(base, "_online", lambda: True)
    monkeypatch.setattr(base, "_train_base", lambda *a: pytest.fail("trained instead of downloading"))
    got = base_model("ci", cache=tmp_path / "cache")
    fp = base_fingerprint(base_preset("ci"))
    assert calls == [("tinyllama-course/tinyllama-base-ci", fp)]
    assert got.source == "hub" and (tmp_path / "cache" / f"ci-{fp}" / "base.json").is_file()
    assert torch.equal(got.model.embed_tokens.weight, b.model.embed_tokens.weight)


@pytest.mark.slow
def test_a_hub_without_the_model_falls_back_to_training(tmp_path, monkeypatch):
    import huggingface_hub

    def missing(repo, revision=None):
        raise huggingface_hub.errors.RepositoryNotFoundError("no such repo")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    monkeypatch.setattr(base, "_online", lambda: True)
    trained_calls = []
    real = base._train_base
    monkeypatch.setattr(base, "_train_base", lambda *a: trained_calls.append(1) or real(*a))
    got = base_model("ci", cache=tmp_path, progress=False)
    assert got.source == "trained" and trained_calls == [1]


def test_offline_never_opens_a_connection(monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("connected"))
    assert base._online() is False


@pytest.mark.slow
def test_two_callers_at_once_train_one_model(tmp_path, monkeypatch):
    real, calls = base._train_base, []

    def slow_train(*a):
        calls.append(1)
        time.sleep(0.5)  # the other caller arrives while this one trains
        return real(*a)

    monkeypatch.setattr(base, "_train_base", slow_train)
    out = []
    threads = [threading.Thread(target=lambda: out.append(base_model("ci", cache=tmp_path, hub=False, progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(b.source for b in out) == ["cache", "trained"]


def test_transformers_loads_the_base_folder_as_it_is(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    b, _ = trained
    text = "Once upon a time, there was a little cat named Mia."
    hf_tok = AutoTokenizer.from_pretrained(b.path)
    assert hf_tok(text)["input_ids"] == b.tokenizer.encode(text, bos=True)
    hf = AutoModelForCausalLM.from_pretrained(b.path).eval()
    ids = torch.tensor([b.tokenizer.encode(text, bos=True)])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, b.model(ids), atol=1e-4)
