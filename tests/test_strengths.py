"""hnkit.strengths: an attachment's strengths, one per network or one per stack member."""

import pytest
import torch

import hnkit
from hnkit import HnkitError, Hypernetwork, HypernetworkConfig, Stack
from hnkit.strengths import MemberStrengths, NetworkStrengths, PerRow, strengths_for

CONFIG = HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu")


def networks(*names):
    return [Hypernetwork(CONFIG, [8], name=name) for name in names]


def plain(values: list) -> list:
    return [v.tolist() if isinstance(v, torch.Tensor) else v for v in values]


def test_one_strength_per_network_set_by_position_or_by_the_network():
    a, b, c = networks("a", "b", "c")
    strengths = strengths_for([(a, 0.5), (b, 0.0), (c, 0.0)])
    assert isinstance(strengths, NetworkStrengths) and strengths.labels == ["a", "b", "c"]
    assert strengths.values.nonzero == {0}  # what a kernel of many networks visits
    strengths.set(1.0, b)
    strengths.set(0.0, 0)
    strengths.set(-2.0, -1)
    assert strengths.as_list() == [0.0, 1.0, -2.0] and strengths.values.nonzero == {1, 2}
    with pytest.raises(HnkitError, match="several hypernetworks are attached: use strengths"):
        strengths.one()
    alone = NetworkStrengths(networks("solo"), [0.7])
    alone.set(0.3)  # one network: no index needed
    assert alone.one() == 0.3


def test_per_row_strengths_are_kept_with_their_active_rows():
    (a,) = networks("a")
    strengths = NetworkStrengths([a], [[1.0, 0.0, 0.5]])
    assert strengths.as_list()[0].tolist() == [1.0, 0.0, 0.5]
    assert strengths.values[0].rows.tolist() == [0, 2]  # row 1 is never computed
    strengths.set(torch.tensor([0.0, 0.0]))
    assert isinstance(strengths.values[0], PerRow) and strengths.values[0].empty
    assert strengths.values.nonzero == {0}  # per-row strengths are checked against the batch even at 0
    strengths.set(0.0)
    assert strengths.one() == 0.0 and not strengths.values.nonzero


def test_a_stack_has_one_strength_per_member_by_name_position_or_dict():
    stack = Stack(networks("a", "b", "c"))
    strengths = strengths_for([(stack, {"b": 1.0})])
    assert isinstance(strengths, MemberStrengths) and strengths.labels == ["a", "b", "c"]
    assert strengths.as_list() == [0.0, 1.0, 0.0]  # members not named are 0
    strengths.set(0.5, "c")  # the others keep theirs
    strengths.set({"a": 2.0, 1: 0.0})
    assert strengths.as_list() == [2.0, 0.0, 0.5]
    members = strengths.values[0]
    assert (members.lo, members.hi, members.members.tolist()) == (0, 3, [0, 2])  # b is not computed
    strengths.set([0.1, [1.0, 0.0], 0.0])
    assert plain(strengths.as_list()) == [pytest.approx(0.1), [1.0, 0.0], 0.0]
    strengths.set(0.2)  # one number: every member
    assert strengths.as_list() == [pytest.approx(0.2)] * 3
    with pytest.raises(HnkitError, match="a stack has a strength per member"):
        strengths.one()


BAD_NETWORK_SETS = {
    "not a number": ((lambda s, nets: s.set("high", 0)), "strength must be a number, got 'high'"),
    "nan": ((lambda s, nets: s.set(float("nan"), 0)), "strength must be a finite number"),
    "2-D rows": ((lambda s, nets: s.set([[1.0]], 0)), "one number per batch row"),
    "no index": ((lambda s, nets: s.set(1.0)), "several hypernetworks are attached: name which one"),
    "out of range": ((lambda s, nets: s.set(1.0, 2)), "index=2 is out of range: 2 hypernetworks attached"),
    "a bool": ((lambda s, nets: s.set(1.0, True)), "index=True is not attached"),
    "another network": ((lambda s, nets: s.set(1.0, nets[2])), "hypernetwork 'c' is not attached"),
}


@pytest.mark.parametrize("case", BAD_NETWORK_SETS)
def test_a_bad_network_strength_is_one_line_and_changes_nothing(case):
    call, words = BAD_NETWORK_SETS[case]
    nets = networks("a", "b", "c")
    strengths = NetworkStrengths(nets[:2], [0.5, [1.0, 0.0]])
    with pytest.raises(HnkitError, match=words) as err:
        call(strengths, nets)
    assert "\n" not in str(err.value)
    assert plain(strengths.as_list()) == [0.5, [1.0, 0.0]]


BAD_MEMBER_SETS = {
    "unknown member": ((lambda s: s.set({"a": 1.0, "zz": 2.0})), "the stack has no member 'zz'; members: a, b"),
    "member out of range": ((lambda s: s.set(1.0, 5)), "stack member 5 is out of range"),
    "a float": ((lambda s: s.set(1.0, 0.5)), "by its name or position, not a float"),
    "too few": ((lambda s: s.set([1.0])), "1 strengths for a stack of 2 members"),
    "rows differ": ((lambda s: s.set({"a": [1.0, 0.0, 1.0]})), "given for the same rows, got 2 and 3"),
    "inf": ((lambda s: s.set(float("inf"), "b")), "strength must be a finite number"),
}


@pytest.mark.parametrize("case", BAD_MEMBER_SETS)
def test_a_bad_member_strength_is_one_line_and_changes_nothing(case):
    call, words = BAD_MEMBER_SETS[case]
    strengths = MemberStrengths(Stack(networks("a", "b")), {"a": 0.5, "b": [1.0, 0.0]})
    with pytest.raises(HnkitError, match=words) as err:
        call(strengths)
    assert "\n" not in str(err.value)
    assert plain(strengths.as_list()) == [0.5, [1.0, 0.0]]


def test_an_attachment_refuses_a_network_it_does_not_hold(load_tiny, ids):
    """Naming a network that is not attached, or a position past the end, is one line; the
    strengths the model runs at are unchanged."""
    model = load_tiny("llama")
    torch.manual_seed(0)
    a, b, other = (Hypernetwork.for_model(model, CONFIG, name=n) for n in ("a", "b", "other"))
    with hnkit.attach(model, [(a, 0.5), (b, 0.0)]) as handle:
        for index, words in [(other, "hypernetwork 'other' is not attached"), (2, "index=2 is out of range")]:
            with pytest.raises(HnkitError, match=words):
                handle.set_strength(1.0, index)
        assert handle.strengths == [0.5, 0.0]
        handle.set_strength(0.25, b)
        assert handle.strengths == [0.5, 0.25] and "a@0.5, b@0.25" in repr(handle)
