"""Every supported layer compiles and trains like eager PyTorch; refused ones fail early."""

from __future__ import annotations

import pytest

from gridfl import CompileError

from .eager import assert_close, eager_step

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gridfl.compiler import SGD, compile_training_plan  # noqa: E402

C, HW = 3, 12


def head(features: int) -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(features, 5)]


LAYERS = {
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(C * HW * HW, 16), nn.Linear(16, 5)),
    "conv_stride_padding": lambda: nn.Sequential(
        nn.Conv2d(C, 4, 3, stride=2, padding=1), *head(4 * 6 * 6)),
    "conv_8ch_stride2": lambda: nn.Sequential(
        nn.Conv2d(C, 8, 3, padding=1), nn.Conv2d(8, 6, 5, stride=2, padding=2), *head(6 * 6 * 6)),
    "conv_no_bias_dilation": lambda: nn.Sequential(
        nn.Conv2d(C, 8, 3, bias=False), nn.Conv2d(8, 4, 3, dilation=2), *head(4 * 6 * 6)),
    "maxpool": lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     *head(4 * 6 * 6)),
    "maxpool_2x3_windows": lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(),
                                                 nn.MaxPool2d((2, 3)), *head(4 * 6 * 4)),
    "maxpool_overlap_padding": lambda: nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1), *head(4 * 6 * 6)),
    "avgpool": lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.AvgPool2d(2),
                                     *head(4 * 6 * 6)),
    "avgpool_overlap": lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1),
                                             nn.AvgPool2d(3, stride=2, padding=1),
                                             *head(4 * 6 * 6)),
    "relu_tanh_sigmoid": lambda: nn.Sequential(
        nn.Flatten(), nn.Linear(C * HW * HW, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 5)),
    "dropout_eval": lambda: nn.Sequential(nn.Flatten(), nn.Linear(C * HW * HW, 16),
                                          nn.Dropout(0.5), nn.Linear(16, 5)).eval(),
    "batchnorm_eval": lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4),
                                            nn.ReLU(), *head(4 * HW * HW)).eval(),
}


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, HW, HW, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_trains_like_eager(name):
    torch.manual_seed(0)
    model = LAYERS[name]()
    if name == "batchnorm_eval":  # non-trivial running statistics
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    X, y = batch(6, 1)
    plan = compile_training_plan(model, optimizer=SGD(lr=0.1), example_data=X, example_target=y)
    for n, seed in ((6, 2), (3, 3)):
        X, y = batch(n, seed)
        params = [p.detach().numpy() for p in model.parameters()]
        loss, acc, *new = plan.execute(X, y, n, 0.1, *params)
        losses, ref = eager_step(model, X, y, 0.1)
        assert_close(loss, losses[0], rtol=1e-5, what=f"{name} loss")
        assert 0.0 <= float(acc) <= 1.0
        for i, (got, want) in enumerate(zip(new, ref, strict=True)):
            assert_close(got, want, rtol=1e-4, atol=1e-6, what=f"{name} param {i}")


REFUSED = {
    "dropout_train": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(C * HW * HW, 8),
                                            nn.Dropout(0.5), nn.Linear(8, 5)),
                      r"aten\.(native_dropout|bernoulli).*module\.eval\(\)"),
    "batchnorm_cumulative": (lambda: nn.Sequential(nn.Conv2d(C, 4, 3),
                                                   nn.BatchNorm2d(4, momentum=None),
                                                   *head(4 * 10 * 10)),
                             r"buffer '1\.num_batches_tracked'.*momentum=None"),
    "conv1d": (lambda: nn.Sequential(nn.Flatten(2), nn.Conv1d(C, 4, 3), *head(4 * 142)),
               r"aten\.convolution_backward: only 2-D convolutions"),
    "conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(C, 2, 2), *head(2 * 13 * 13)),
                       r"transposed convolutions"),
    "grouped_conv": (lambda: nn.Sequential(nn.Conv2d(C, 6, 3, groups=3), *head(6 * 10 * 10)),
                     r"grouped convolutions \(groups=3\)"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_layers(name):
    make, match = REFUSED[name]
    X, y = batch(4, 0)
    with pytest.raises(CompileError, match=match):
        compile_training_plan(make(), example_data=X, example_target=y)


WEIGHT_GRAD_CONVS = {
    "3x3 pad 1": lambda: nn.Conv2d(C, 4, 3, padding=1),
    "3x3 no pad": lambda: nn.Conv2d(C, 4, 3),
    "5x5 pad 2": lambda: nn.Conv2d(C, 4, 5, padding=2),
    "3x1 pad (1, 0)": lambda: nn.Conv2d(C, 4, (3, 1), padding=(1, 0)),
}


@pytest.mark.parametrize("method", ["per_offset", "shift", "conv", "auto"])
@pytest.mark.parametrize("conv", list(WEIGHT_GRAD_CONVS))
def test_every_conv_weight_gradient_formulation_trains_like_eager(conv, method):
    """Each way of writing a convolution's weight gradient gives eager PyTorch's step, on
    a non-square input (unverified at compile time: this test is the check)."""
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(5, C, 7, 9, generator=g), torch.randint(0, 5, (5,), generator=g)
    torch.manual_seed(0)
    layer = WEIGHT_GRAD_CONVS[conv]()
    with torch.no_grad():
        features = layer(X[:1]).numel()
    model = nn.Sequential(layer, nn.ReLU(), *head(features))
    plan = compile_training_plan(model, optimizer=SGD(lr=0.1), example_data=X,
                                 example_target=y, conv_weight_grad=method, verify=False)
    params = [p.detach().numpy() for p in model.parameters()]
    loss, _, *new = plan.execute(X, y, 5, 0.1, *params)
    losses, ref = eager_step(model, X, y, 0.1)
    assert_close(loss, losses[0], rtol=1e-5, what=f"{conv} {method} loss")
    for i, (got, want) in enumerate(zip(new, ref, strict=True)):
        assert_close(got, want, rtol=1e-4, atol=1e-6, what=f"{conv} {method} param {i}")


def test_the_shift_weight_gradient_refuses_a_strided_convolution():
    X, y = batch(4, 0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, stride=2, padding=1), *head(4 * 6 * 6))
    with pytest.raises(CompileError, match=r"'shift' needs stride 1.*stride=\[2, 2\]"):
        compile_training_plan(model, example_data=X, example_target=y, conv_weight_grad="shift")


def test_tiling_max_pool_breaks_ties_as_torch_without_onnxruntimes_indices():
    """Windows that tile the map take their maximum and its first position over the
    window laid out on one axis; onnxruntime's ``MaxPool`` with indices (a scalar loop)
    is left to windows that overlap. A filter of ones over columns repeating 1, 2, 3
    gives every window four equal maxima from different patches: the gradient must go
    to the first, as torch's does, or the filter's gradient differs."""
    import onnx
    from onnx import helper

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1),
                          *head(4 * 3 * 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    X, y = batch(5, 7)
    X[:] = torch.tensor([1.0, 2.0, 3.0]).repeat(HW // 3)  # every 3x3 patch sums to 18
    plan = compile_training_plan(model, optimizer=SGD(lr=0.1), example_data=X,
                                 example_target=y, verify=False)
    graph = onnx.load_from_string(plan.to_bytes()).graph
    pools = [len(n.output) for n in graph.node if n.op_type == "MaxPool"]
    assert pools == [2], pools  # only the overlapping pool keeps onnxruntime's indices
    axes = [{a.name: helper.get_attribute_value(a) for a in n.attribute}.get("axis")
            for n in graph.node if n.op_type == "ArgMax"]
    assert 4 in axes, axes  # the first maximum over the window's axis
    params = [p.detach().numpy() for p in model.parameters()]
    loss, _, *new = plan.execute(X, y, 5, 0.1, *params)
    losses, ref = eager_step(model, X, y, 0.1)
    assert_close(loss, losses[0], rtol=1e-5, what="loss")
    for i, (got, want) in enumerate(zip(new, ref, strict=True)):
        assert_close(got, want, rtol=1e-4, atol=1e-6, what=f"param {i}")
