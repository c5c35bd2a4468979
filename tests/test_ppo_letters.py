"""Tests of tinyllama.reward.LetterTokenizer (chapter 10) and of a short PPO run on the copy task with it (chapter 11's setup):
ids match the course tokenizer's special ids, copy prompts work with the golden reward, and the reward rises."""
import copy
import random

import pytest
import torch

from tinyllama.model import LLM, LLMConfig
from tinyllama.ppo import PPOConfig, PPOTrainer, ValueModel
from tinyllama.reward import GoldenRewardModel, LetterTokenizer, copy_prompts, copy_task_words

torch.set_num_threads(1)


def test_letter_tokenizer_ids_and_round_trip():
    tok = LetterTokenizer("abc")
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok) == 7
    assert tok.encode("cab") == [6, 4, 5]
    assert tok.encode("ab", bos=True, eos=True) == [1, 4, 5, 2]
    assert tok.encode("az") == [4, 0]  # outside the alphabet: <unk>
    assert tok.decode(tok.encode("bca", bos=True, eos=True)) == "bca"
    assert tok.decode([1, 4, 2], skip_special=False) == "<s>a</s>"
    assert [tok.id_to_piece(i) for i in range(7)] == ["<unk>", "<s>", "</s>", "<pad>", "a", "b", "c"]


@pytest.mark.parametrize("bad", ["", "aa", 5])
def test_letter_tokenizer_rejects_bad_alphabets(bad):
    with pytest.raises(ValueError, match="alphabet"):
        LetterTokenizer(bad)


def test_copy_prompts_and_golden_reward_with_letters():
    tok = LetterTokenizer("abcd")
    golden = GoldenRewardModel(tok.eos_id, tok.pad_id, bos_id=tok.bos_id)
    p = copy_prompts(["abd", "cc"], tok, bos=True)
    assert p == [[1, 4, 5, 7, 2], [1, 6, 6, 2]]
    r = golden.rewards(p, [[4, 5, 7, 2], [6, 4, 2, 3]])
    assert r.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.slow
def test_reward_rises_on_the_letter_copy_task_from_random_weights():
    tok = LetterTokenizer("abcd")
    words, _ = copy_task_words(40, seed=0, min_len=2, max_len=3, alphabet="abcd")
    torch.manual_seed(0)
    base = LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=16, dim_emb=32, num_layers=2, num_heads=4,
                         num_kv_heads=4, ffd_hidden_dim=64))
    cfg = PPOConfig(batch_size=64, mini_batch_size=32, ppo_epochs=2, lr=2e-3, max_new_tokens=4, init_kl_coef=0.05)
    golden = GoldenRewardModel(tok.eos_id, tok.pad_id, bos_id=tok.bos_id)
    tr = PPOTrainer(copy.deepcopy(base), copy.deepcopy(base), ValueModel.from_llm(base), golden, cfg,
                    eos_id=tok.eos_id, pad_id=tok.pad_id)
    rng = random.Random(0)
    rewards = [tr.step(copy_prompts(rng.choices(words, k=64), tok, bos=True))["env/reward_mean"] for _ in range(15)]
    assert sum(rewards[-3:]) / 3 > 2 * sum(rewards[:3]) / 3 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
