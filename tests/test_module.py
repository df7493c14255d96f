"""HypernetworkModule: the web UI's child order (it decides .pt key names), options and init."""

import pytest
import torch
from torch import nn

from hnkit import HnkitError, HypernetworkConfig, HypernetworkModule
from hnkit.module import legacy_dropout_structure


def kinds(module):
    return [type(m).__name__ for m in module.linear]


def test_child_order_reproduces_the_key_names():
    m = HypernetworkModule(8, [1, 2, 1], "relu", layer_norm=True, dropout_structure=[0, 0.3, 0])
    assert kinds(m) == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear", "LayerNorm"]
    assert list(m.state_dict()) == [
        "linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
        "linear.4.weight", "linear.4.bias", "linear.5.weight", "linear.5.bias",
    ]
    m = HypernetworkModule(8, [1, 1.5, 2, 1], "tanh", activate_output=True, dropout_structure=[0, 0.1, 0.2, 0])
    assert kinds(m) == ["Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear", "Tanh"]
    assert [tuple(p.shape) for p in m.parameters()] == [(12, 8), (12,), (16, 12), (16,), (8, 16), (8,)]
    assert kinds(HypernetworkModule(8, [1, 2, 1], "linear")) == ["Linear", "Linear"]
    assert kinds(HypernetworkModule(8, [1, 2, 1], None, activate_output=True)) == ["Linear", "Linear"]


def test_activation_names():
    assert isinstance(HypernetworkModule(4, activation="swish").linear[1], nn.Hardswish)  # not SiLU
    for name, cls in [("relu", nn.ReLU), ("leakyrelu", nn.LeakyReLU), ("elu", nn.ELU), ("tanh", nn.Tanh),
                      ("sigmoid", nn.Sigmoid), ("gelu", nn.GELU), ("silu", nn.SiLU), ("mish", nn.Mish)]:
        assert isinstance(HypernetworkModule(4, activation=name).linear[1], cls)
    with pytest.raises(HnkitError, match="unknown activation 'swoosh'"):
        HypernetworkModule(4, activation="swoosh")
    with pytest.raises(HnkitError, match="unknown activation"):  # even where the last layer has none
        HypernetworkModule(4, [1, 1], activation="swoosh")


def test_legacy_dropout_rule():
    assert legacy_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]
    assert legacy_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert legacy_dropout_structure([1, 2, 1], True, True) == [0, 0.3, 0]
    assert legacy_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert legacy_dropout_structure([1, 2, 4, 2, 1], True, True) == [0, 0.3, 0.3, 0.3, 0]
    assert HypernetworkConfig([1, 2, 2, 1], use_dropout=True).dropout_structure == [0, 0.3, 0, 0]


def test_bad_structures():
    with pytest.raises(HnkitError, match="start and end with 1"):
        HypernetworkModule(4, [2, 1])
    with pytest.raises(HnkitError, match="dropout_structure"):
        HypernetworkModule(4, [1, 2, 1], dropout_structure=[0, 0.3])
    with pytest.raises(HnkitError, match="dropout_structure"):
        HypernetworkModule(4, [1, 2, 1], dropout_structure=[0, 1.5, 0])
    with pytest.raises(HnkitError, match="weight initialization"):
        HypernetworkModule(4, weight_init="Orthogonal")


def test_initializations():
    torch.manual_seed(0)
    m = HypernetworkModule(256, [1, 2, 1], "relu", layer_norm=True)
    lin, ln = m.linear[0], m.linear[2]
    assert abs(lin.weight.std().item() - 0.01) < 0.001 and torch.all(lin.bias == 0)
    assert abs(ln.weight.std().item() - 0.01) < 0.002 and torch.all(ln.bias == 0)  # LayerNorm N(0, 0.01) too
    bound = (6 / (256 + 512)) ** 0.5
    m = HypernetworkModule(256, weight_init="XavierUniform")
    assert m.linear[0].weight.abs().max() <= bound and m.linear[0].weight.abs().max() > 0.9 * bound
    m = HypernetworkModule(256, weight_init="XavierNormal")
    assert abs(m.linear[0].weight.std().item() - (2 / (256 + 512)) ** 0.5) < 0.003
    m = HypernetworkModule(256, weight_init="KaimingNormal")  # fan_in 256, gain sqrt(2)
    assert abs(m.linear[0].weight.std().item() - (2 / 256) ** 0.5) < 0.005
    m = HypernetworkModule(256, weight_init="KaimingUniform")
    assert m.linear[0].weight.abs().max() <= (6 / 256) ** 0.5
    for init in ("XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"):
        m = HypernetworkModule(16, weight_init=init)
        assert all(torch.all(m.linear[i].bias == 0) for i in (0, 1))


def test_forward_is_residual_with_strength():
    torch.manual_seed(0)
    m = HypernetworkModule(8, [1, 2, 1], "relu", weight_init="XavierNormal")
    x = torch.randn(3, 8)
    mlp = m.linear[2](torch.relu(m.linear[0](x)))
    torch.testing.assert_close(m(x, 0.7), x + 0.7 * mlp)
    assert torch.equal(m(x, 0.0), x)
    assert m(x.half(), 1.0).dtype == torch.float16  # cast at the edges, weights stay fp32
    assert m.linear[0].weight.dtype == torch.float32


def test_zero_init_last():
    m = HypernetworkModule(8, [1, 2, 1], "relu", layer_norm=True, zero_init_last=True)
    x = torch.randn(3, 8)
    assert torch.equal(m(x), x)
    assert m.linear[0].weight.abs().sum() > 0  # the rest keeps its init


def test_forward_follows_the_registered_children_through_copies_and_moves():
    # forward() walks self.linear: the same objects after deepcopy, dtype moves and load_state_dict.
    import copy

    m = HypernetworkModule(8, [1, 2, 1], "relu")
    x = torch.randn(3, 8)
    c = copy.deepcopy(m)
    with torch.no_grad():
        c.linear[2].bias.fill_(1.0)
    assert torch.equal(m(x), x + m.linear[2](torch.relu(m.linear[0](x))))
    assert torch.equal(c(x), x + c.linear[2](torch.relu(c.linear[0](x))))
    d = HypernetworkModule(8, [1, 2, 1], "relu")
    d.load_state_dict(c.state_dict())
    assert torch.equal(d(x), c(x))
    d.double()
    assert d(x).dtype == torch.float32 and torch.allclose(d(x), c(x), atol=1e-6)


def layer_by_layer(module, x, strength):
    y = x
    for layer in module.linear:
        y = layer(y)
    return x + strength * y


@pytest.mark.parametrize("structure", [[1, 2, 1], [1, 2, 1.5, 1], [1, 0.5, 1]])
def test_affine_gives_the_values_and_gradients_of_a_linear_chain(structure):
    torch.manual_seed(0)
    m = HypernetworkModule(12, structure, None, dropout_structure=[0] + [0.2] * (len(structure) - 2) + [0],
                           weight_init="XavierNormal").eval()  # dropout is the identity: an affine map
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # biases too
    x = torch.randn(2, 5, 12)
    grads = []
    for run in (lambda: x + 0.7 * torch.nn.functional.linear(x, *m.affine()), lambda: layer_by_layer(m, x, 0.7)):
        out = run()
        out.pow(2).sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
        m.zero_grad()
    (out_a, dp_a), (out_b, dp_b) = grads
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-5)
    for a, b in zip(dp_a, dp_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert m.affine(torch.float64)[0].dtype == torch.float64


def test_only_chains_of_linear_layers_are_affine():
    assert HypernetworkModule(8, [1, 2, 1], None).is_affine
    assert HypernetworkModule(8, [1, 2, 1], None, dropout_structure=[0, 0.3, 0]).is_affine
    assert not HypernetworkModule(8, [1, 2, 1], "relu").is_affine
    assert not HypernetworkModule(8, [1, 2, 1], None, layer_norm=True).is_affine
    with pytest.raises(HnkitError, match="ReLU layer is not linear"):
        HypernetworkModule(8, [1, 2, 1], "relu").affine()


def test_the_module_keeps_nothing_between_calls():
    """No caches: what a module holds is its registered children and plain settings, and a weight
    written by hand (no optimizer, no version bump: ``.data``) shows in the very next call."""
    m = HypernetworkModule(8, [1, 2, 1], None)
    assert set(vars(m)) - set(vars(nn.Module())) == {"dim"}
    x = torch.randn(4, 8)
    before = m(x)
    m.linear[0].weight.data += 0.5
    assert not torch.equal(m(x), before)
    torch.testing.assert_close(m(x), layer_by_layer(m, x, 1.0))
