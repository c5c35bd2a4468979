import torch
from tinyllama.exercises import check, compare

ref = lambda x: torch.softmax(x, -1)
inputs = lambda g: (torch.randn(3, 5, generator=g),)


def test_right_answer_passes(capsys):
    def mine(x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)
    assert check(mine, ref, inputs).passed
    assert "matches" in capsys.readouterr().out


def test_stub_is_reported_not_raised():
    def stub(x):
        raise NotImplementedError
    r = check(stub, ref, inputs, quiet=True)
    assert not r.passed and "not implemented" in r.message


def test_wrong_values_shape_and_exceptions_are_explained():
    r = check(lambda x: torch.exp(x), ref, inputs, quiet=True)
    assert not r.passed and "wrong values" in r.message and "index" in r.message
    r = check(lambda x: torch.softmax(x, 0).T, ref, inputs, quiet=True)
    assert not r.passed and "shape (5, 3)" in r.message
    r = check(lambda x: x @ x, ref, inputs, quiet=True)
    assert not r.passed and "raised RuntimeError" in r.message


def test_in_place_changes_are_caught():
    def inplace(x):
        x.mul_(2)
        return torch.softmax(x / 2, -1)
    r = check(inplace, ref, inputs, quiet=True)
    assert not r.passed and "in place" in r.message


def test_compare_nested_and_numbers():
    assert compare((1.0, [torch.ones(2)]), (1.0, [torch.ones(2)])) is None
    assert "item 0" in compare((1.5, [torch.ones(2)]), (1.0, [torch.ones(2)]))
    assert compare(torch.tensor([1, 2]), torch.tensor([1, 3])) is not None
    assert compare(float("nan") * torch.ones(1), torch.ones(1)) is not None


def test_infinities_must_match_exactly():
    inf = float("inf")
    assert compare(torch.tensor([0.0, -inf]), torch.tensor([0.0, -inf])) is None
    assert compare(torch.tensor([0.0, 3.0]), torch.tensor([0.0, -inf])) is not None
    assert compare(torch.tensor([0.0, -inf]), torch.tensor([0.0, 3.0])) is not None
    assert compare(torch.tensor([inf]), torch.tensor([-inf])) is not None
