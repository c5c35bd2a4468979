"""Chapter 11's recipe, `tinyllama.ppo.run_copy_task`, and its preset, in the ci profile:
the run goes through `PPOTrainer.train`, the validation rule sets the learning rate and stops
the run, the result holds what the report and the notebook need, and everything the run makes
lives on the device it was given."""
import dataclasses

import pytest
import torch
from matplotlib.figure import Figure
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

import tinyllama.ppo as ppo
from tinyllama.model import LLM, LLMConfig
from tinyllama.ppo import (CopyTask, CopyTaskResult, PPOConfig, PPOPreset, PPOTrainer, ValueModel, copy_eval,
                           copy_task, ppo_preset, run_copy_task)
from tinyllama.reward import GoldenRewardModel, LetterTokenizer, copy_prompts


def tiny_preset(**kw) -> PPOPreset:
    "The ci preset, cut to a few steps on few words (seconds)."
    return dataclasses.replace(ppo_preset("ci"), **{**dict(max_steps=6, eval_every=3, n_train=100, n_eval=20), **kw})


@pytest.fixture(scope="module")
def result(one_thread) -> CopyTaskResult:
    return run_copy_task(tiny_preset(), device="cpu", seed=0, progress=False)


# -- the preset
@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_each_profile_has_a_frozen_preset(profile):
    p = ppo_preset(profile)
    assert isinstance(p, PPOPreset)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.max_steps = 1
    assert p.mini_batch_size <= p.batch_size and 0 < p.stop_at <= 1


def test_the_preset_follows_the_profile(monkeypatch):
    monkeypatch.setenv("TINYLLAMA_PROFILE", "ci")
    assert ppo_preset() == ppo_preset("ci")
    assert ppo_preset("ci").max_steps < ppo_preset("cpu").max_steps < ppo_preset("gpu").max_steps
    assert ppo_preset("cpu").alphabet == "abcdefghijklmnopqrstuvwxyz"  # the chapter's 30-id vocabulary


@pytest.mark.parametrize("field, value", [("max_steps", 0), ("eval_every", 1.5), ("dim_emb", None)])
def test_bad_preset_sizes_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=f"PPOPreset.{field} must be a positive integer"):
        tiny_preset(**{field: value})


def test_bad_arguments_of_run_copy_task_are_clear_errors():
    with pytest.raises(ValueError, match="seed must be an integer"):
        run_copy_task(tiny_preset(), device="cpu", seed="0", progress=False)
    with pytest.raises(ValueError, match="mini_batch_size"):  # checked by PPOConfig
        run_copy_task(tiny_preset(mini_batch_size=128), device="cpu", progress=False)
    with pytest.raises(ValueError, match="too many"):  # checked by copy_task_words
        run_copy_task(tiny_preset(n_train=10_000), device="cpu", progress=False)


# -- the run
def test_the_result_holds_what_the_report_needs(result):
    p, h = result.preset, result.history
    assert len(h) == p.max_steps == result.trainer.n_steps  # the stop rule did not fire
    assert [s for s, _ in result.checks] == [0, 3, 6]  # step 0 and every eval_every steps
    w = result.words
    assert (len(w["train"]), len(w["val"]), len(w["test"])) == (100, 20, 20)
    assert not (set(w["train"]) & set(w["val"]) or set(w["train"]) & set(w["test"]) or set(w["val"]) & set(w["test"]))
    for ev in (result.before, result.after):
        assert 0 <= ev.exact <= 1 and 0 <= ev.tokens <= p.max_len + 1
        assert len(ev.answers) == len(ev.correct) == 20
        assert ev.exact == sum(ev.correct) / 20
    assert result.perfect == sum(len(x) + 1 for x in w["test"]) / 20
    first, last = result.reward_change(2)
    assert first == sum(s["env/reward_mean"] for s in h[:2]) / 2 and last == sum(s["env/reward_mean"] for s in h[-2:]) / 2
    assert result.seconds > 0 and isinstance(result.tokenizer, LetterTokenizer)
    fig = result.plot("title")
    assert isinstance(fig, Figure) and len(fig.axes) == 4 and fig.axes[0].get_title() == "title"


def test_the_validation_rule_sets_the_learning_rate(result):
    p, acc = result.preset, result.checks[-1][1]
    expected = p.lr * min(1.0, max(0.25, 2 * (1 - acc)))
    assert [g["lr"] for g in result.trainer.optimizer.param_groups] == [expected, expected]


def test_the_speedrun_preset_is_smaller_on_the_cpu_only():
    small, full = ppo_preset("cpu", speedrun=True), ppo_preset("cpu")
    assert small.alphabet == "abcdefghijkl" and small.max_len == 5 and small.max_steps == 300
    assert (small.batch_size, small.mini_batch_size, small.lr) == (128, 64, 1e-3)
    assert (small.eval_every, small.n_train, small.n_eval) == (10, 5000, 200)
    assert small.dim_emb == full.dim_emb and small.max_steps < full.max_steps
    assert ppo_preset("ci", speedrun=True) == ppo_preset("ci") and ppo_preset("gpu", speedrun=True) == ppo_preset("gpu")
    with pytest.raises(ValueError, match="speedrun must be True or False"):
        ppo_preset("cpu", speedrun="yes")


def test_copy_task_has_the_parts_a_trainer_needs(one_thread):
    pr = tiny_preset()
    task = copy_task(pr, seed=0, device="cpu")
    assert isinstance(task, CopyTask) and isinstance(task.config, PPOConfig)
    assert isinstance(task.tokenizer, LetterTokenizer) and isinstance(task.reward_fn, GoldenRewardModel)
    assert (task.eos_id, task.pad_id) == (task.tokenizer.eos_id, task.tokenizer.pad_id)
    assert task.config.batch_size == pr.batch_size and task.max_new_tokens == pr.max_len + 1
    assert task.policy is not task.ref_policy and isinstance(task.value_model, ValueModel)
    for a, b in zip(task.policy.parameters(), task.ref_policy.parameters()):
        assert torch.equal(a, b)  # the policy starts as its reference
    batch = task.prompts(0)
    assert len(batch) == pr.batch_size and all(p[0] == task.tokenizer.bos_id for p in batch)
    assert batch != task.prompts(1)  # a fresh draw per step
    stats = task.trainer().step(batch)
    assert stats["objective/kl"] == 0.0 and stats["policy/approxkl_first"] < 1e-6
    with pytest.raises(ValueError, match="seed must be an integer"):
        copy_task(pr, seed=1.5)


def test_run_copy_task_builds_on_copy_task(monkeypatch, one_thread):
    calls, real = [], ppo.copy_task
    monkeypatch.setattr(ppo, "copy_task", lambda *a, **k: calls.append(a) or real(*a, **k))
    run_copy_task(tiny_preset(max_steps=1, eval_every=1), device="cpu", progress=False)
    assert len(calls) == 1


def test_the_run_goes_through_ppo_trainer_train(monkeypatch):
    calls, train = [], PPOTrainer.train

    def spy(self, prompt_fn, steps, callback=None, progress=True):
        calls.append(steps)
        return train(self, prompt_fn, steps, callback, progress)

    monkeypatch.setattr(PPOTrainer, "train", spy)
    res = run_copy_task(tiny_preset(max_steps=2, eval_every=1), device="cpu", progress=False)
    assert calls == [2] and len(res.history) == 2


def test_the_run_stops_once_the_validation_words_are_copied():
    res = run_copy_task(tiny_preset(max_steps=9, eval_every=2, stop_at=0.0), device="cpu", progress=False)
    assert len(res.history) == 2 and [s for s, _ in res.checks] == [0, 2]  # stopped at the first check


@pytest.mark.slow
def test_the_run_is_reproducible_whatever_the_global_rng():
    torch.manual_seed(1)
    a = run_copy_task(tiny_preset(max_steps=2), device="cpu", seed=5, progress=False)
    torch.manual_seed(2)
    b = run_copy_task(tiny_preset(max_steps=2), device="cpu", seed=5, progress=False)
    assert [s["env/reward_mean"] for s in a.history] == [s["env/reward_mean"] for s in b.history]
    assert a.words == b.words and a.after.answers == b.after.answers


def test_a_callback_that_returns_true_stops_train():
    torch.manual_seed(0)
    cfg = LLMConfig(vocab_size=16, context_size=16, dim_emb=16, num_layers=1, num_heads=2, num_kv_heads=2,
                    ffd_hidden_dim=32)
    policy = LLM(cfg)
    trainer = PPOTrainer(policy, None, ValueModel.from_llm(policy), lambda p, r: (r == 5).float(),
                         PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=3), eos_id=2, pad_id=3)
    seen = []
    out = trainer.train(lambda step: [[1, 4, 2]] * 4, 10, callback=lambda s: seen.append(s) or len(seen) == 3,
                        progress=False)
    assert len(out) == len(seen) == trainer.n_steps == 3


def test_copy_eval_scores_greedy_answers():
    tok = LetterTokenizer("abc")
    torch.manual_seed(0)
    model = LLM(LLMConfig(vocab_size=tok.vocab_size, context_size=16, dim_emb=16, num_layers=1, num_heads=2,
                          num_kv_heads=2, ffd_hidden_dim=32)).eval()
    golden = GoldenRewardModel(tok.eos_id, tok.pad_id, bos_id=tok.bos_id)
    prompts = copy_prompts(["ab", "cab"], tok, bos=True)
    ev = copy_eval(model, prompts, golden, 4)
    assert len(ev.answers) == 2 and all(1 <= len(a) <= 4 for a in ev.answers)
    scores = golden.score(prompts, ev.answers).tolist()  # the same scoring, done directly
    assert ev.tokens == pytest.approx(sum(scores) / 2)
    assert ev.correct == [s == len(p) - 1 for s, p in zip(scores, prompts)]


# -- the device: every model and every tensor of the run where it was asked to be.
# CI has no GPU, so a device is faked as tests/test_device_paths.py does for MPS, but strictly:
# an OnDevice tensor reports device "mps", refuses float64 (as MPS does) and, as a real device
# does, refuses to meet a CPU tensor in one operation. A model or a tensor left on the CPU is
# then either an error or seen in the final checks.
def _mps(d) -> bool:
    return isinstance(d, (str, torch.device)) and torch.device(d).type == "mps"


_MIXING_ALLOWED = {torch._has_compatible_shallow_copy_type, torch.Tensor.to, torch.Tensor.copy_,
                   torch.Tensor.__setitem__, torch.Tensor.__getitem__}  # as on CUDA and MPS


class OnDevice(torch.Tensor):
    "A CPU tensor that reports device mps, refuses float64 and refuses CPU operands."
    @staticmethod
    def of(t: torch.Tensor) -> "OnDevice":
        if t.dtype == torch.float64:
            raise TypeError("MPS has no float64")
        return t if isinstance(t, OnDevice) else t.as_subclass(OnDevice)

    @property
    def device(self):
        return torch.device("mps")

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            new = self.detach().clone().requires_grad_(self.requires_grad)
            if getattr(self, "_is_param", False):
                new._is_param = True
            memo[id(self)] = new
        return memo[id(self)]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        cpu = [t for t in tree_flatten((args, kwargs))[0]
               if type(t) in (torch.Tensor, torch.nn.Parameter) and t.dim() > 0]
        if cpu and func not in _MIXING_ALLOWED:
            raise RuntimeError(f"{getattr(func, '__name__', func)}: a CPU tensor of shape {tuple(cpu[0].shape)} "
                               "met a tensor on the device")
        leaving = func is torch.Tensor.to and any(
            isinstance(a, (str, torch.device)) and not _mps(a) for a in list(args[1:]) + [kwargs.get("device")])
        args = tuple(a for a in args if not _mps(a))
        kwargs = {k: v for k, v in kwargs.items() if not _mps(v)}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if leaving:
            return out.as_subclass(torch.Tensor)  # a copy to the CPU leaves the device
        return tree_map(lambda t: OnDevice.of(t) if isinstance(t, torch.Tensor) else t, out)


class ToDevice(TorchFunctionMode):
    "`.to('mps')`, and factories called with device='mps', give OnDevice tensors."
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and not isinstance(args[0], OnDevice) and any(
                _mps(a) for a in list(args[1:]) + [kwargs.get("device")]):
            dtype = next((a for a in list(args[1:]) + [kwargs.get("dtype")] if isinstance(a, torch.dtype)), None)
            return OnDevice.of(args[0].to(dtype) if dtype is not None else args[0].clone())
        if _mps(kwargs.get("device")):
            out = func(*args, **{k: v for k, v in kwargs.items() if k != "device"})
            return tree_map(lambda t: OnDevice.of(t) if isinstance(t, torch.Tensor) else t, out)
        return func(*args, **kwargs)


@pytest.fixture
def fake_device(monkeypatch):
    "Modules moved to 'mps' hold OnDevice parameters while the test runs."
    parse_to = torch._C._nn._parse_to

    def parse_keeping_mps(*a, **k):  # this torch build has no MPS: it would drop the device
        dev = next((x for x in list(a) + [k.get("device")] if _mps(x)), None)
        out = parse_to(*[x for x in a if not _mps(x)], **{n: v for n, v in k.items() if not _mps(v)})
        return (torch.device("mps") if dev is not None else out[0], *out[1:])

    monkeypatch.setattr(torch._C._nn, "_parse_to", parse_keeping_mps)
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)  # parameters become OnDevice
    yield ToDevice()
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def _all_on_the_device(res: CopyTaskResult):
    tr = res.trainer
    for model in (tr.policy, tr.ref_policy, tr.value_model):
        assert {type(p) for p in model.parameters()} == {OnDevice}
        assert {p.device.type for p in model.parameters()} == {"mps"}
    ro = tr.last_rollout
    for f in dataclasses.fields(ro):
        assert isinstance(getattr(ro, f.name), OnDevice), f.name
    state = [v for s in tr.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert state and all(isinstance(v, OnDevice) for v in state)  # Adam's moments


@pytest.mark.slow
def test_run_copy_task_keeps_models_and_tensors_on_the_device_it_is_given(fake_device, one_thread):
    with fake_device:
        res = run_copy_task(tiny_preset(max_steps=2, eval_every=1), device="mps", progress=False)
    _all_on_the_device(res)
    assert res.trainer.device.type == "mps" and len(res.history) == 2


@pytest.mark.slow
def test_run_copy_task_uses_get_device_by_default(fake_device, one_thread, monkeypatch):
    monkeypatch.setattr(ppo, "get_device", lambda *a, **k: torch.device("mps"))
    with fake_device:
        res = run_copy_task(tiny_preset(max_steps=1, eval_every=1), progress=False)
    _all_on_the_device(res)


def test_the_fake_device_catches_a_model_left_on_the_cpu(fake_device, one_thread, monkeypatch):
    policy = ppo._copy_policy
    monkeypatch.setattr(ppo, "_copy_policy", lambda preset, v, seed, device: policy(preset, v, seed, "cpu"))
    with fake_device:
        res = run_copy_task(tiny_preset(max_steps=1, eval_every=1), device="mps", progress=False)
    with pytest.raises(AssertionError):
        _all_on_the_device(res)
    with fake_device, pytest.raises(RuntimeError, match="met a tensor on the device"):
        torch.ones(2, 3).to("mps") + torch.ones(2, 3)  # as on a real device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_copy_task_on_a_real_gpu():
    res = run_copy_task(tiny_preset(max_steps=2, eval_every=1), device="cuda", progress=False)
    tr = res.trainer
    for model in (tr.policy, tr.ref_policy, tr.value_model):
        assert {p.device.type for p in model.parameters()} == {"cuda"}
    ro = tr.last_rollout
    assert {getattr(ro, f.name).device.type for f in dataclasses.fields(ro)} == {"cuda"}
    assert len(res.history) == 2
