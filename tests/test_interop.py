"""Tests of tinyllama.interop: both directions of parity with Hugging Face transformers (fp32,
atol 1e-4; GQA, MQA and tied embeddings included), config mapping, atomic saves, and error cases;
and the folder as a complete model repository: tokenizer.json encodes exactly as the course's
Tokenizer, the chat template gives format_chat's ids, and pipeline("text-generation") gives
generate_text's greedy text. Every Hugging Face model and tokenizer is built locally from files
the tests write: nothing is downloaded."""
import json

import pytest
import torch

import os, sys
sys.path.insert(0, os.path.dirname(__file__))
from _models import randomize_, randomized  # noqa: E402
from tinyllama.model import LLM, LLMConfig
from tinyllama.interop import (from_hf_config, hf_name, load_hf, our_name, read_hf_weights, save_hf, to_hf_config,
                               to_hf_state_dict)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
ATOL = 1e-4


def hf_randomized(hf_config, seed=0):
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(hf_config), seed)


CONFIGS = {
    "gqa": LLMConfig(vocab_size=211, context_size=64, dim_emb=64, num_layers=2, num_heads=8, num_kv_heads=2,
                     ffd_hidden_dim=160, rope_theta=500000.0, norm_eps=1e-6),
    "mha_tied": LLMConfig(vocab_size=150, context_size=48, dim_emb=48, num_layers=3, num_heads=4, num_kv_heads=4,
                          ffd_hidden_dim=96, tie_embeddings=True),
    "mqa": LLMConfig(vocab_size=97, context_size=40, dim_emb=32, num_layers=2, num_heads=4, num_kv_heads=1,
                     ffd_hidden_dim=64),
}


# ---------------------------------------------------------------- ours -> transformers

@pytest.mark.parametrize("which", list(CONFIGS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_loads_our_checkpoint_with_equal_logits(tmp_path, which, attn):
    cfg = CONFIGS[which]
    ours = randomized(cfg)
    save_hf(ours, tmp_path / "ckpt")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, attn_implementation=attn).eval()
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.num_key_value_heads == cfg.num_kv_heads and hf.config.tie_word_embeddings == cfg.tie_embeddings
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert a.std() > 0.3  # the logits are far from uniform: a wrong weight could not hide
    assert (a - b).abs().max().item() < ATOL


def test_padded_batch_matches_transformers_with_same_positions(tmp_path):
    cfg = CONFIGS["gqa"]
    ours = randomized(cfg)
    save_hf(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(1, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(ids, attention_mask=mask, position_ids=pos).logits
    assert (a[0, 4:] - b[0, 4:]).abs().max() < ATOL and (a[1] - b[1]).abs().max() < ATOL


def test_greedy_generation_gives_the_same_tokens(tmp_path):
    cfg = CONFIGS["gqa"]
    ours = randomized(cfg)
    save_hf(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    n = 20
    with torch.no_grad():
        caches = ours.new_kv_caches(1, 5 + n)
        out, logits = prompt, ours(prompt, kv_caches=caches)
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            logits = ours(nxt, kv_caches=caches, start_pos=out.shape[1])
            out = torch.cat([out, nxt], 1)
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(out, theirs)


def test_config_json_fields(tmp_path):
    cfg = CONFIGS["gqa"]
    save_hf(randomized(cfg), tmp_path, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert (d["hidden_size"], d["intermediate_size"], d["num_attention_heads"], d["num_key_value_heads"],
            d["num_hidden_layers"], d["max_position_embeddings"], d["vocab_size"]) == \
        (cfg.dim_emb, cfg.ffd_hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, cfg.context_size,
         cfg.vocab_size)
    assert d["rms_norm_eps"] == cfg.norm_eps and d["rope_theta"] == cfg.rope_theta
    assert d["tie_word_embeddings"] is False and d["torch_dtype"] == "float32"
    assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (1, 2, 0)
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf_cfg.bos_token_id == 1 and hf_cfg.eos_token_id == 2 and hf_cfg.pad_token_id == 0
    theta = getattr(hf_cfg, "rope_theta", None) or hf_cfg.rope_parameters["rope_theta"]
    assert theta == cfg.rope_theta


def test_tied_checkpoint_stores_the_embedding_once(tmp_path):
    from safetensors.torch import load_file
    save_hf(randomized(CONFIGS["mha_tied"]), tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_bfloat16_checkpoint(tmp_path):
    ours = randomized(CONFIGS["gqa"]).to(torch.bfloat16)
    save_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_hf(tmp_path)
    assert back.embed_tokens.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    assert load_hf(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32


# ---------------------------------------------------------------- transformers -> ours

HF_CONFIGS = {
    "gqa": dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0),
    "mqa_tied": dict(vocab_size=300, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-6,
                     tie_word_embeddings=True, rope_theta=500000.0),
}


@pytest.mark.parametrize("which", list(HF_CONFIGS))
@pytest.mark.parametrize("sharded", [False, True])
def test_load_hf_reads_transformers_checkpoints_with_equal_logits(tmp_path, which, sharded):
    hf_cfg = LlamaConfig(**HF_CONFIGS[which])
    theirs = hf_randomized(hf_cfg)
    theirs.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    mine = load_hf(tmp_path)
    c = mine.config
    assert (c.dim_emb, c.num_kv_heads, c.ffd_hidden_dim, c.norm_eps, c.tie_embeddings, c.context_size) == \
        (hf_cfg.hidden_size, hf_cfg.num_key_value_heads, hf_cfg.intermediate_size, hf_cfg.rms_norm_eps,
         hf_cfg.tie_word_embeddings, hf_cfg.max_position_embeddings)
    if c.tie_embeddings:
        assert mine.lm_head.weight is mine.embed_tokens.weight
    assert not mine.training
    assert not any(t.is_meta for t in [*mine.parameters(), *mine.buffers()])
    ids = torch.randint(0, hf_cfg.vocab_size, (3, hf_cfg.max_position_embeddings),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = mine(ids), theirs(ids).logits
    assert a.std() > 0.3
    assert (a - b).abs().max().item() < ATOL


def test_round_trip_is_exact_and_the_loaded_model_trains(tmp_path):
    ours = randomized(CONFIGS["mha_tied"])
    save_hf(ours, tmp_path)
    back = load_hf(tmp_path)
    assert back.config == ours.config
    assert back.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ours.state_dict().values()))
    back.train()
    back(torch.randint(0, 150, (1, 6))).sum().backward()
    assert all(p.grad is not None for p in back.parameters())


def test_name_mapping():
    names = LLM(CONFIGS["gqa"]).state_dict().keys()
    assert all(our_name(hf_name(n)) == n for n in names)
    for cfg in CONFIGS.values():
        hf = LlamaForCausalLM(LlamaConfig.from_dict(to_hf_config(cfg)))
        hf_state = hf.state_dict()
        if cfg.tie_embeddings:
            hf_state.pop("lm_head.weight")  # transformers does not save the tied copy either
        ours = to_hf_state_dict(randomized(cfg))
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in hf_state.items()}
    with pytest.raises(ValueError, match="not a LlamaForCausalLM weight name"):
        our_name("transformer.h.0.attn.weight")


def test_config_round_trip():
    for cfg in CONFIGS.values():
        assert from_hf_config(to_hf_config(cfg)) == cfg
    # transformers' own serialisation of a LlamaConfig reads back the same shape
    hf = LlamaConfig(**HF_CONFIGS["mqa_tied"]).to_dict()
    c = from_hf_config(hf)
    assert (c.num_kv_heads, c.rope_theta, c.tie_embeddings, c.norm_eps) == (1, 500000.0, True, 1e-6)


# ---------------------------------------------------------------- errors

def _write(path, config=None, weights_from=None):
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights_from is not None:
        save_hf(weights_from, path / "_w")
        (path / "_w" / "model.safetensors").rename(path / "model.safetensors")
    return path


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_hf(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(_write(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_hf(_write(tmp_path / "b", to_hf_config(CONFIGS["mqa"])))
    d = _write(tmp_path / "c", to_hf_config(CONFIGS["mqa"]))
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        load_hf(d)
    d = _write(tmp_path / "d", to_hf_config(CONFIGS["mqa"]))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "shard-1.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard-1"):
        read_hf_weights(d)
    d = _write(tmp_path / "e")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf(d)


@pytest.mark.parametrize("change, words", [
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(model_type="mistral"), "only Llama"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(rope_scaling=None, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "yarn"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=16), "head_dim"),
])
def test_unsupported_configs_are_named(tmp_path, change, words):
    cfg = {**to_hf_config(CONFIGS["mqa"]), **change}
    with pytest.raises(ValueError, match=words):
        from_hf_config(cfg)
    with pytest.raises(ValueError, match=words):
        load_hf(_write(tmp_path, cfg, weights_from=randomized(CONFIGS["mqa"])))


def test_missing_config_key_and_wrong_type():
    cfg = to_hf_config(CONFIGS["mqa"])
    del cfg["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        from_hf_config(cfg)
    with pytest.raises(ValueError, match="dict"):
        from_hf_config("config.json")


def test_weights_that_do_not_match_the_config(tmp_path):
    # config of one size, weights of another: a shape error named by tensor
    other = LLMConfig(**{**CONFIGS["mqa"].__dict__, "ffd_hidden_dim": 80})
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape \((80, 32|32, 80)\) but the config needs"):
        load_hf(_write(tmp_path / "a", to_hf_config(CONFIGS["mqa"]), weights_from=randomized(other)))
    # one layer too few in the weights: missing names listed
    fewer = LLMConfig(**{**CONFIGS["mqa"].__dict__, "num_layers": 1})
    with pytest.raises(ValueError, match=r"missing \['model.layers.1"):
        load_hf(_write(tmp_path / "b", to_hf_config(CONFIGS["mqa"]), weights_from=randomized(fewer)))
    # an untied config reading a tied checkpoint lacks lm_head
    tied = LLMConfig(**{**CONFIGS["mqa"].__dict__, "tie_embeddings": True})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_hf(_write(tmp_path / "c", to_hf_config(CONFIGS["mqa"]), weights_from=randomized(tied)))


def test_save_hf_argument_errors(tmp_path):
    m = randomized(CONFIGS["mqa"])
    with pytest.raises(ValueError, match="saves an LLM"):
        save_hf(torch.nn.Linear(2, 2), tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_hf(m, tmp_path / "file")
    with pytest.raises(ValueError, match="eos_token_id"):
        save_hf(m, tmp_path / "x", eos_token_id=10_000)


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch
    m = randomized(CONFIGS["mqa"])
    save_hf(m, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf(randomized(CONFIGS["mqa"], seed=1), tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # the old checkpoint is intact, no temporary file is left behind
    monkeypatch.undo()
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError):
        save_hf(m, fresh)
    assert list(fresh.iterdir()) == []  # a crash on a first save leaves no weights file at all



# ---------------------------------------------------------------- the tokenizer's files

from hypothesis import given, settings, strategies as st  # noqa: E402

from tinyllama.data import story_corpus  # noqa: E402
from tinyllama.generate import generate, generate_text  # noqa: E402
from tinyllama.interop import (HF_CHAT_TEMPLATE, _is_text_piece, bpe_merges, load_hf_tokenizer,  # noqa: E402
                               to_hf_tokenizer)
from tinyllama.sft import chat_reply, format_chat  # noqa: E402
from tinyllama.tokenizer import CHAT_TOKENS, train_tokenizer  # noqa: E402

# text that is not a story: nothing, spaces, control characters, characters the stories never use
# (byte fallback), digits, the visible-space character, and special tokens typed in the text
EDGES = ["", " ", "  ", "\n", "\t x", " leading", "trailing ", "two  spaces", "a\n\nb", "café ✓ 日本語 😀",
         "e\u0301", "123 4567.89", "\x00\x7f", "<0x41>", "\u2581", "a\u2581b", "<s>", "</s>", "<pad>", "<unk>",
         "<s>Hi</s><pad><pad>", "<|user|>Hi<|end|><|assistant|> Mia", "x<|system|>y", "<|end|>", "<|end|",
         "a . b , c ! d ? e 's f n't"]  # spaces that transformers' clean_up_tokenization_spaces would remove


@pytest.fixture(scope="module")
def stories():
    return story_corpus(2000, seed=0)


@pytest.fixture(scope="module")
def tok(stories):
    return train_tokenizer(stories, vocab_size=512)


def _silenced(tok, seed=0):
    "An untrained LLM of tok's vocabulary whose special and byte tokens get logit 0: greedy never picks them."
    cfg = LLMConfig(vocab_size=len(tok), context_size=64, dim_emb=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    ffd_hidden_dim=128)
    model = randomized(cfg, seed)
    with torch.no_grad():
        model.lm_head.weight[[i for i in range(len(tok)) if not _is_text_piece(tok.sp, i)]] = 0
    return model


@pytest.fixture(scope="module")
def chat_repo(tok, tmp_path_factory):
    "(model, folder): a chat model saved with its tokenizer and the chat template."
    model = _silenced(tok)
    return model, save_hf(model, tmp_path_factory.mktemp("chat") / "m", tokenizer=tok, chat_template=True)


@pytest.fixture(scope="module")
def hf_tok(chat_repo):
    return transformers.AutoTokenizer.from_pretrained(chat_repo[1])


@pytest.fixture(scope="module")
def pipe(chat_repo):
    return transformers.pipeline("text-generation", model=str(chat_repo[1]), dtype=torch.float32)


def test_save_hf_with_a_tokenizer_writes_a_complete_model_repository(tok, chat_repo):
    model, folder = chat_repo
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (tok.bos_id, tok.eos_id,
                                                                                        tok.pad_id)
    gen = transformers.GenerationConfig.from_pretrained(folder)
    assert gen.eos_token_id == [tok.end_id, tok.eos_id]  # a chat model stops at <|end|> too
    assert (gen.bos_token_id, gen.pad_token_id, gen.max_length) == (tok.bos_id, tok.pad_id, 64)
    assert gen.do_sample and gen.temperature == 1.0 and gen.top_k == 0 and gen.top_p == 1.0  # generate_text's
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == HF_CHAT_TEMPLATE
    assert (folder / "tokenizer.model").read_bytes() == tok.model_proto


def test_without_chat_template_and_without_tokenizer(tok, tmp_path):
    model = _silenced(tok)
    save_hf(model, tmp_path / "base", tokenizer=tok)
    assert "chat_template" not in json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    assert not hf.chat_template
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "base").eos_token_id == tok.eos_id
    save_hf(model, tmp_path / "ids", tok.bos_id, tok.eos_id, tok.pad_id)  # the call of older code
    names = {p.name for p in (tmp_path / "ids").iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors"}
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "ids")
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_special_token_ids(tok, hf_tok):
    assert len(hf_tok) == len(tok)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.unk_token_id) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id)
    assert hf_tok.convert_tokens_to_ids(list(CHAT_TOKENS)) == [tok.system_id, tok.user_id, tok.assistant_id,
                                                               tok.end_id]
    assert set(hf_tok.all_special_ids) == {tok.unk_id, *tok.special_ids.values()}
    assert hf_tok.convert_ids_to_tokens(list(range(len(tok)))) == tok.pieces


@pytest.mark.slow
def test_auto_tokenizer_encodes_exactly_as_the_course_tokenizer(tok, hf_tok, stories):
    for text in stories + EDGES:
        # markers typed in the text are plain text: the course's default, transformers' split_special_tokens
        assert hf_tok(text, add_special_tokens=False, split_special_tokens=True).input_ids == tok.encode(text)
        if text != "<unk>":  # the one difference: transformers matches "<unk>", allow_special does not
            assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text, allow_special=True)
            assert hf_tok(text).input_ids == tok.encode(text, bos=True, allow_special=True)  # <s> in front
    assert hf_tok("<unk>").input_ids == [tok.bos_id, tok.unk_id]
    assert tok.encode("<unk>", allow_special=True) == tok.encode("<unk>")


@pytest.mark.slow
def test_auto_tokenizer_decodes_as_the_course_tokenizer(tok, hf_tok, stories):
    for text in stories + EDGES:
        ids = tok.encode(text, bos=True, eos=True) + [tok.pad_id] * 2  # as the course frames a story
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids)
        if "\u2581" not in text:
            assert hf_tok.decode(ids, skip_special_tokens=True) == text


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_auto_tokenizer_encodes_any_text_as_the_course(tok, hf_tok, text):
    ids = tok.encode(text, bos=True)
    assert hf_tok(text, split_special_tokens=True).input_ids == ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_bpe_merges_rank_every_split_by_score(tok):
    merges = bpe_merges(tok)
    pieces = set(tok.pieces)
    assert all(a + b in pieces for a, b in merges) and len(set(merges)) == len(merges)
    made = [a + b for a, b in merges]
    score = {p: tok.sp.get_score(tok.sp.piece_to_id(p)) for p in made}
    assert [score[p] for p in made] == sorted((score[p] for p in made), reverse=True)
    # every multi-character piece that encoding can produce is reachable by some merge
    text_pieces = {p for i, p in enumerate(tok.pieces) if _is_text_piece(tok.sp, i)}
    assert {p for p in text_pieces if len(p) > 1} <= set(made)


def test_tokenizer_json_is_plain_json(tok, stories, monkeypatch):
    # writing needs no tokenizers library; the tokenizers library reads it and encodes as we do
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    data = json.loads(json.dumps(to_hf_tokenizer(tok)))
    monkeypatch.undo()
    from tokenizers import Tokenizer as FastTokenizer
    fast = FastTokenizer.from_str(json.dumps(data))
    assert all(fast.encode(s).ids == tok.encode(s, bos=True) for s in stories[:200])


@pytest.mark.slow
def test_pipeline_gives_the_greedy_text_of_generate_text(tok, chat_repo, pipe):
    model, _ = chat_repo
    for prompt in ["Once upon a time", "Mia saw a big dog. She", " two  spaces", "", "café ✓"]:
        ids = tok.encode(prompt, bos=True)
        new = generate(model, [ids], 24, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
        out = pipe(prompt, max_new_tokens=24, do_sample=False)
        assert pipe(prompt, max_new_tokens=24, do_sample=False, return_tensors=True)[0]["generated_token_ids"] == \
            ids + new
        cont = generate_text(model, tok, [prompt], 24, temperature=0.0)[0]
        # transformers 5 decodes the new tokens alone (a leading word's space is dropped, as tok.decode(new)
        # does); transformers 4 cut the decoded prompt off the decoded whole, as generate_text does
        assert out[0]["generated_text"] in (prompt + tok.decode(new), prompt + cont)
        assert cont.removeprefix(" ") == tok.decode(new)


@pytest.mark.slow
def test_pipeline_gives_the_greedy_ids_of_generate(tok, tmp_path):
    # an untrained model left as it is also writes special and byte tokens, and stops at </s>
    model = randomized(LLMConfig(vocab_size=len(tok), context_size=64, dim_emb=64, num_layers=2, num_heads=4,
                                 num_kv_heads=2, ffd_hidden_dim=128), seed=3)
    pipe = transformers.pipeline("text-generation", model=str(save_hf(model, tmp_path, tokenizer=tok)),
                                 dtype=torch.float32)
    for prompt in ["Once upon a time", "Tom", "日本"]:
        ids = tok.encode(prompt, bos=True)
        out = pipe(prompt, max_new_tokens=40, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        new = generate(model, [ids], 40, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
        assert list(out) == ids + new


CHATS = [
    [{"role": "user", "content": "Who is the hero of the story?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": " Where did Mia go?\n"}],
    [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time, café ✓."},
     {"role": "user", "content": "Another one, 42 words."}],
]


@pytest.mark.parametrize("gen_prompt", [True, False])
def test_apply_chat_template_gives_the_ids_of_format_chat(tok, hf_tok, gen_prompt):
    for chat in CHATS + [CHATS[2][:2]]:
        if gen_prompt and chat[-1]["role"] == "assistant":
            continue
        ids = hf_tok.apply_chat_template(chat, add_generation_prompt=gen_prompt, return_dict=True)["input_ids"]
        assert ids == format_chat(chat, tok, add_generation_prompt=gen_prompt)[0]
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        hf_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_pipeline_gives_the_reply_of_chat_reply(tok, chat_repo, pipe):
    model, _ = chat_repo
    for chat in CHATS:
        out = pipe(chat, max_new_tokens=12, do_sample=False)[0]["generated_text"]
        assert out[:-1] == chat and out[-1]["role"] == "assistant"
        assert out[-1]["content"].strip() == chat_reply(model, tok, chat, max_new_tokens=12)


def test_load_hf_tokenizer(tok, chat_repo, tmp_path):
    back = load_hf_tokenizer(chat_repo[1])
    assert back.pieces == tok.pieces and back.encode("Once upon a time") == tok.encode("Once upon a time")
    save_hf(randomized(CONFIGS["mqa"]), tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer=tok"):
        load_hf_tokenizer(tmp_path)


def test_save_hf_tokenizer_errors(tok, stories, tmp_path):
    model = _silenced(tok)
    with pytest.raises(ValueError, match="tinyllama Tokenizer"):
        save_hf(model, tmp_path, tokenizer="tokenizer.model")
    with pytest.raises(ValueError, match="model_type='unigram'"):
        save_hf(model, tmp_path, tokenizer=train_tokenizer(stories, vocab_size=480, model_type="unigram"))
    with pytest.raises(ValueError, match="chat_template=True needs the tokenizer"):
        save_hf(model, tmp_path, chat_template=True)
    with pytest.raises(ValueError, match="512 tokens but the model only 211"):
        save_hf(randomized(CONFIGS["gqa"]), tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="eos_token_id=5 but the tokenizer's is 2"):
        save_hf(model, tmp_path, eos_token_id=5, tokenizer=tok)
    assert not any(tmp_path.iterdir())  # nothing was written
    save_hf(model, tmp_path, tok.bos_id, tok.eos_id, tok.pad_id, tokenizer=tok)  # the same ids are fine
