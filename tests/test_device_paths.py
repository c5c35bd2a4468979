"""The CUDA and MPS paths, tested without a GPU.

CI has no GPU, so each device-only behaviour is reproduced on the CPU: trainer state loaded
onto another device (the meta device), a tensor that claims to live on MPS and, like MPS,
refuses float64, the CUDA/MPS queries and the torch version mocked, host syncs counted as
`aten._local_scalar_dense` calls, and a training-panel error whose frames must be freed."""
import dataclasses
import gc
import os
import stat
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

import torch
from torch.utils._pytree import tree_map
from torch.overrides import TorchFunctionMode

import tinyllama.attention as attention
import tinyllama.device as device_mod
import importlib

train_mod = importlib.import_module("tinyllama.train")  # tinyllama.train is the function
from tinyllama import widgets
from tinyllama.checkpoint import load_checkpoint, save_checkpoint
from tinyllama.device import autocast_dtype, get_device, needs_grad_scaler, supports_bf16
from tinyllama.generate import generate, sample_next, top_p_filter
from tinyllama.model import LLM, LLMConfig
from tinyllama.ppo import PPOConfig, PPOTrainer, ValueModel
from tinyllama.reward import RewardModel

ROOT = Path(__file__).resolve().parents[1]
CFG = LLMConfig(vocab_size=64, context_size=32, dim_emb=32, num_layers=2, num_heads=4, num_kv_heads=2,
                ffd_hidden_dim=64)


# -- 1. resume: RNG states must reach torch as CPU byte tensors, wherever the state is loaded
def test_resume_restores_rng_when_the_state_is_loaded_onto_another_device(tmp_path):
    torch.manual_seed(0)
    model = LLM(CFG)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, opt, step=3)
    expected = torch.rand(5)  # what the generator gives right after the save
    torch.manual_seed(123)  # move the generator elsewhere
    # map_location="meta" stands in for a GPU: before the fix, torch.set_rng_state raised
    # "RNG state must be a torch.ByteTensor" on any non-CPU map_location.
    _, state = load_checkpoint(tmp_path, LLM(CFG), map_location="meta", restore_rng=True)
    assert torch.equal(torch.rand(5), expected)
    assert state["rng"]["torch"].device.type == "cpu"


# -- 2. sampling on MPS, which has no float64
def _mps(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "mps"


class FakeMPS(torch.Tensor):
    "A CPU tensor that reports device mps and, like MPS, refuses to hold float64."
    @staticmethod
    def of(t: torch.Tensor) -> "FakeMPS":
        if t.dtype == torch.float64:
            raise TypeError("MPS has no float64")
        return t.as_subclass(FakeMPS)

    @property
    def device(self):
        return torch.device("mps")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaving = func is torch.Tensor.to and any(
            isinstance(a, (str, torch.device)) and not _mps(a) for a in list(args[1:]) + [kwargs.get("device")])
        args = tuple(a for a in args if not _mps(a))  # the data stays on the CPU underneath
        kwargs = {k: v for k, v in kwargs.items() if not _mps(v)}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if leaving:
            return out.as_subclass(torch.Tensor)  # a copy to the CPU leaves MPS
        return tree_map(lambda t: FakeMPS.of(t) if isinstance(t, torch.Tensor) else t, out)


class ToFakeMPS(TorchFunctionMode):
    "`.to('mps')` of a CPU tensor gives a FakeMPS tensor (this torch has no MPS backend)."
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and not isinstance(args[0], FakeMPS) and any(
                _mps(a) for a in list(args[1:]) + [kwargs.get("device")]):
            rest = [a for a in args[1:] if not _mps(a)]
            return FakeMPS.of(args[0].to(*rest, **{k: v for k, v in kwargs.items() if k != "device"}))
        return func(*args, **kwargs)


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                dict(temperature=1.3, top_p=0.8), dict(temperature=0)])
def test_sampling_on_mps_never_makes_a_float64_tensor_there(kw):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    expected = sample_next(logits, generator=gens(), **kw)
    with ToFakeMPS():
        got = sample_next(FakeMPS.of(logits.clone()), generator=gens(), **kw)
    assert got.device.type == "mps"
    assert torch.equal(got.as_subclass(torch.Tensor), expected)  # the same tokens as on the CPU


def test_top_p_filter_on_mps_keeps_the_nucleus():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    with ToFakeMPS():
        got = top_p_filter(FakeMPS.of(logits.clone()), 0.7)
    assert got.device.type == "mps" and torch.equal(got.as_subclass(torch.Tensor), top_p_filter(logits, 0.7))


# -- 3. a Mac with default settings
@pytest.fixture
def a_mac(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: True)


@pytest.mark.parametrize("profile, expected", [("ci", "cpu"), ("cpu", "cpu"), ("gpu", "mps")])
def test_a_mac_uses_its_gpu_only_in_the_gpu_profile(a_mac, monkeypatch, profile, expected):
    monkeypatch.setenv("TINYLLAMA_PROFILE", profile)
    assert get_device().type == expected
    assert get_device("mps").type == "mps"  # asked for by name: always


def test_auto_precision_on_mps_is_fp32_without_a_scaler():
    assert autocast_dtype("mps") == torch.float32 and not needs_grad_scaler("mps")
    assert train_mod.resolve_precision("auto", torch.device("mps")) == torch.float32


@pytest.mark.parametrize("version, ok", [((2, 2), False), ((2, 6), False), ((2, 7), True)])
def test_reduced_precision_on_mps_needs_a_recent_torch(monkeypatch, version, ok):
    monkeypatch.setattr(train_mod, "_torch_version", lambda: version)
    if ok:
        assert train_mod.resolve_precision("fp16", "mps") == torch.float16
    else:
        with pytest.raises(ValueError, match="MPS needs torch 2.7"):
            train_mod.resolve_precision("fp16", "mps")
    assert train_mod.resolve_precision("fp16", "cpu") == torch.float16  # elsewhere: as asked


# -- 5. the T4 (compute capability 7.5) emulates bf16: fp16 with a scaler there
@pytest.mark.parametrize("capability, dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert supports_bf16("cuda") == (dtype == torch.bfloat16)
    assert autocast_dtype("cuda") == dtype and needs_grad_scaler("cuda") == (dtype == torch.float16)
    assert train_mod.resolve_precision("auto", "cuda") == dtype


# -- 7. grouped SDPA only where a fused kernel takes it
@pytest.mark.parametrize("device, dtype, masked, capability, expected", [
    ("cuda", torch.bfloat16, False, (8, 0), True),   # flash takes grouped heads
    ("cuda", torch.float16, False, (7, 5), False),   # T4: no flash for GQA -> expand, memory-efficient kernel
    ("cuda", torch.float32, False, (9, 0), False),   # fp32: no flash at all
    ("cuda", torch.bfloat16, True, (8, 0), False),   # a mask rules flash out
    ("cpu", torch.float32, False, None, True),       # the CPU flash kernel takes grouped heads
    ("cpu", torch.float32, True, None, False),
    ("mps", torch.float32, False, None, False),
])
def test_sdpa_groups_kv_heads_only_for_a_fused_kernel(monkeypatch, device, dtype, masked, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(attention, "_CAPABILITY", {})  # asked once per device: forget
    assert attention.sdpa_shares_kv_heads(torch.device(device), dtype, masked) == expected


def test_sdpa_never_groups_heads_before_torch_2_5(monkeypatch):
    monkeypatch.setattr(attention, "_SDPA_GQA", False)
    assert not attention.sdpa_shares_kv_heads(torch.device("cpu"), torch.float32, False)


def test_grouped_and_expanded_kv_heads_give_the_same_attention(monkeypatch):
    torch.manual_seed(0)
    attn, rope = LLM(CFG).layers[0].self_attn, LLM(CFG).rope
    x = torch.randn(2, 10, CFG.dim_emb)
    outs = []
    for grouped in (True, False):
        monkeypatch.setattr(attention, "sdpa_shares_kv_heads", lambda *a, g=grouped: g)
        outs.append(attn(x, rope))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)


# -- 8. host syncs in hot paths, counted
class CountSyncs(TorchFunctionMode):
    """Counts the calls that read a tensor's data on the host: on a GPU each waits for the
    device to finish its queue (a sync). Counted where the caller makes them, so a read that
    torch makes inside one of them counts once."""
    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
             torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
             torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        moves_to_host = func in (torch.Tensor.to, torch.Tensor.cpu) and args[0].device.type != "cpu" and (
            func is torch.Tensor.cpu or any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                                            for a in list(args[1:]) + [kwargs.get("device")]))
        if func in self.READS or moves_to_host or (
                func is torch.Tensor.__getitem__ and isinstance(args[1], torch.Tensor)
                and args[1].dtype == torch.bool):  # boolean indexing sizes its output on the host
            self.n += 1
        return func(*args, **kwargs)


def test_a_forward_on_a_gpu_like_device_never_syncs():
    # On the meta device any host read raises, so this forward proves the non-CPU path reads nothing.
    model = LLM(CFG).to("meta")
    ids = torch.randint(0, CFG.vocab_size, (2, 8)).to("meta")
    mask = torch.ones(2, 8, dtype=torch.long).to("meta")
    pos = torch.arange(8).expand(2, 8).to("meta")
    with CountSyncs() as c:
        model(ids)
        model(ids, attention_mask=mask, position_ids=pos)
    assert c.n == 0


def test_a_cpu_forward_reads_the_ids_once():
    model = LLM(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    with CountSyncs() as c:
        model(ids, position_ids=torch.arange(8).expand(2, 8))
    assert c.n == 2  # one range check of the ids, one of the positions (not one per layer)


def test_decoding_syncs_once_per_token_whatever_the_batch():
    model = LLM(CFG).eval()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    n_new = 12
    with CountSyncs() as c:
        out = generate(model, prompts, max_new_tokens=n_new, temperature=1.0, seed=0, eos_id=None)
    assert all(len(o) == n_new for o in out)
    assert c.n <= 4  # prefill range check + the two copies of the result (no per-row, per-token reads)
    with CountSyncs() as c:
        generate(model, prompts, max_new_tokens=n_new, temperature=1.0, seed=0, eos_id=63)
    assert c.n <= n_new + 4  # with an EOS: one "is any row still going?" per token


class CountRand(TorchFunctionMode):
    "Counts the calls to torch.rand (each draw on the host is one more copy to a GPU)."

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.rand
        return func(*args, **(kwargs or {}))


def test_decoding_draws_each_rows_uniforms_once_not_once_per_token():
    model = LLM(CFG).eval()
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    with CountRand() as c:
        generate(model, prompts, max_new_tokens=12, temperature=1.0, seed=0, eos_id=None)
    assert c.n == len(prompts)  # one draw of all 12 steps per row's generator


def test_a_reward_model_forward_off_the_cpu_never_syncs():
    rm = RewardModel(CFG, pad_id=0).to("meta")
    ids = torch.randint(1, CFG.vocab_size, (3, 7)).to("meta")
    with CountSyncs() as c:
        rm(ids, torch.ones(3, 7, dtype=torch.long).to("meta"))
    assert c.n == 0


def tiny_ppo_trainer():
    torch.manual_seed(0)
    policy = LLM(CFG)
    cfg = PPOConfig(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=5, lr=1e-3, seed=0)
    return PPOTrainer(policy, None, ValueModel.from_llm(policy), lambda p, r: (r == 5).float(), cfg,
                      eos_id=2, pad_id=3)


def test_a_ppo_minibatch_update_off_the_cpu_never_syncs():
    trainer = tiny_ppo_trainer()
    ro = trainer.rollout([[1, 4 + i % 7, 2] for i in range(8)])
    # The same update on the meta device, where any read of the data raises: a GPU stand-in.
    # (Adam's step counters stay CPU scalars, as they do when training on a GPU.)
    trainer.policy.to("meta"), trainer.value_model.to("meta")
    ro_meta = dataclasses.replace(ro, **{f.name: getattr(ro, f.name).to("meta") for f in dataclasses.fields(ro)})
    stats = trainer._update(ro_meta, torch.arange(4, device="meta"))
    assert {t.device.type for t in stats.values()} == {"meta"}  # read back once per step, not per minibatch


def test_ppo_statistics_reach_the_caller_as_floats():
    trainer = tiny_ppo_trainer()
    stats = trainer.step([[1, 4 + i % 7, 2] for i in range(8)])
    assert all(isinstance(v, (int, float)) for v in stats.values())
    assert len(trainer.minibatch_stats) == 4
    assert all(isinstance(v, float) for s in trainer.minibatch_stats for v in s.values())
    ro = trainer.last_rollout
    m = ro.response_mask.bool()
    assert stats["returns/var"] == pytest.approx(ro.returns[m].var().item(), rel=1e-5)
    assert stats["loss/policy"] == pytest.approx(sum(s["loss/policy"] for s in trainer.minibatch_stats) / 4)


# -- 6. the chapters' models go where get_device() says (a GPU when there is one)
def test_the_copy_task_puts_every_model_on_get_device(monkeypatch):
    import tinyllama.ppo as ppo

    # The meta device stands in for the GPU that get_device() would return.
    monkeypatch.setattr(ppo, "get_device", lambda *a, **k: torch.device("meta"))
    task = ppo.copy_task("ci", seed=0)
    models = (task.policy, task.ref_policy, task.value_model)
    assert {p.device.type for m in models for p in m.parameters()} == {"meta"}
    assert task.trainer().device.type == "meta"
    cpu = ppo.copy_task("ci", seed=0, device="cpu")  # asked for by name: there
    assert {p.device.type for p in cpu.policy.parameters()} == {"cpu"}


# -- 10. after an error (an out-of-memory one, say) the panel must not keep the run's memory alive
@pytest.mark.slow
def test_a_failed_run_frees_what_its_frames_held(tmp_path, monkeypatch):
    held = []

    def oom_train(*args, **kwargs):
        activations = torch.zeros(1000, 1000)  # stands for the logits and optimizer state of a real run
        held.append(weakref.ref(activations))
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(widgets, "train", oom_train)
    panel = widgets.TrainingPanel(profile="ci", out_dir=tmp_path / "run", n_stories=200).set(
        vocab_size=320, dim_emb=32, num_layers=1, num_heads=4, num_kv_heads=2, context_size=32, batch_size=8,
        steps=5)
    panel.start_button.click()
    panel.wait(timeout=60)
    assert "out of memory" in panel.message.value and isinstance(panel.error, RuntimeError)
    assert panel.error.__traceback__ is None
    gc.collect()
    assert held and held[0]() is None  # the tensor is gone: the next Start has the memory back


# -- 4. the GPU check runs every step even when one fails, and ends with its summary
def test_the_gpu_check_survives_a_failing_step(tmp_path):
    log = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in *"cli speedrun"*) exit 3;; esac
cat > /dev/null 2>&1 || true
exit 0
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "PATH": os.environ["PATH"]}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "5"], env=env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "07 pretraining, gpu profile" in summary and "FAILED (rc 3)" in summary
    for name in ("resume cycle", "train throughput", "decode on the GPU", "11 PPO, gpu profile"):
        line = next(l for l in summary.splitlines() if l.startswith(name))
        assert " passed " in line, line
    assert "--stages pretrain,samples" in log.read_text()  # the gpu-sized SFT/PPO stages are not run there


@pytest.mark.slow
def test_compiled_attention_never_asks_the_driver_while_tracing(monkeypatch):
    # torch.compile (gpu profile) once crashed here: tracing called into the CUDA driver.
    real = torch.cuda.get_device_capability

    def driver(*args, **kwargs):  # only our module's calls are refused: on a real GPU
        if sys._getframe(1).f_globals.get("__name__") == attention.__name__:
            raise AssertionError("get_device_capability called while tracing")
        return real(*args, **kwargs)  # torch's own (lazy init, dynamo) still get answers

    monkeypatch.setattr(torch.cuda, "get_device_capability", driver)
    monkeypatch.setattr(attention, "_CAPABILITY", {})
    cuda = torch.device("cuda", 0)

    @torch.compile(backend="eager", fullgraph=True)
    def shares(x):
        return x + 1 if attention.sdpa_shares_kv_heads(cuda, torch.bfloat16, False) else x

    x = torch.zeros(2)
    assert torch.equal(shares(x), x)  # unknown while tracing: expand the heads
    torch._dynamo.reset()
    attention._CAPABILITY[0] = (9, 0)  # asked once outside the trace (an H100)
    assert torch.equal(shares(x), x + 1)
    torch._dynamo.reset()
