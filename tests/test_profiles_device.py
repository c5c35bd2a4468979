import pytest, torch
from tinyllama.profiles import get_profile, Profile, PROFILES
from tinyllama.device import get_device, autocast_dtype, needs_grad_scaler, device_report


def test_profile_from_environment(monkeypatch):
    for name in PROFILES:
        monkeypatch.setenv("TINYLLAMA_PROFILE", name)
        assert get_profile().name == name
    monkeypatch.setenv("TINYLLAMA_PROFILE", " CPU ")
    assert get_profile().name == "cpu"


def test_default_profile_follows_the_machine(monkeypatch):
    monkeypatch.delenv("TINYLLAMA_PROFILE", raising=False)
    for cuda, name in ((True, "gpu"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert get_profile().name == name


def test_unknown_profile_is_refused_with_the_valid_names(monkeypatch):
    monkeypatch.setenv("TINYLLAMA_PROFILE", "laptop")
    with pytest.raises(ValueError, match="ci, cpu, gpu"):
        get_profile()


def test_pick_returns_the_value_of_the_profile():
    assert [Profile(n).pick(ci="a", cpu="b", gpu="c") for n in PROFILES] == ["a", "b", "c"]


def test_device_choice_and_precision(monkeypatch):
    import tinyllama.device as device_mod
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cuda")  # a CUDA GPU wins in every profile
    assert autocast_dtype("cpu") == torch.float32 and not needs_grad_scaler("cpu")
    assert device_report("cpu")["dtype"] == "float32"


def test_bad_device_requests():
    with pytest.raises(ValueError, match="not one of"):
        get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            get_device("cuda")
