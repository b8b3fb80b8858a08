"""cnnext.nn.Conv2d against torch.nn.Conv2d (every padding mode, 'same'/'valid', layouts,
state_dict both ways), algorithm selection (heuristic and autotuner), and a LeNet-5 built from
cnnext modules training on the emulated CUDA device."""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cnnext
from cnnext import _algo

from .reference import assert_close, make_input

ALGOS = ["auto", "direct", "im2col"]


@pytest.fixture(autouse=True)
def _autotune_off():
    """Every test starts and ends with the autotuner off and its cache empty."""
    cnnext.set_autotune(False)
    cnnext.clear_autotune_cache()
    yield
    cnnext.set_autotune(False)
    cnnext.clear_autotune_cache()


def make_pair(*args, algo: str = "auto", **kwargs) -> tuple[nn.Conv2d, cnnext.nn.Conv2d]:
    """A torch Conv2d and a cnnext Conv2d built with the same arguments and the same weights."""
    ref = nn.Conv2d(*args, **kwargs)
    ours = cnnext.nn.Conv2d(*args, **kwargs, algo=algo)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def check_against_torch(
    ref: nn.Conv2d, ours: nn.Conv2d, x: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Output, memory format and the gradients of input, weight and bias all match torch's."""
    xr = x.detach().clone().requires_grad_()
    xo = x.detach().clone().requires_grad_()
    expected, out = ref(xr), ours(xo)
    assert out.shape == expected.shape
    assert out.is_contiguous() == expected.is_contiguous()
    assert_close(out, expected, scale=scale)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    out.backward(grad)
    assert_close(xo.grad, xr.grad, scale=scale)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad, scale=scale * 8, msg=name)
    return out


# ---- padding: ints, 'same', 'valid' x padding_mode ----------------------------------------------

# (kernel_size, padding, dilation): 'same' with an even and with an odd total padding per axis.
PADDINGS = [
    ((3, 3), 0, 1),
    ((3, 3), 1, 1),
    ((3, 5), (1, 2), 1),
    ((3, 3), "valid", 1),
    ((3, 3), "same", 1),  # total 2 per axis: symmetric
    ((4, 4), "same", 1),  # total 3 per axis: one extra row and column at the bottom/right
    ((3, 4), "same", (2, 1)),  # total (4, 3): symmetric rows, asymmetric columns
    ((2, 3), "same", (3, 2)),  # total (3, 4)
]
PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("spec", PADDINGS, ids=str)
@pytest.mark.parametrize("algo", ALGOS)
def test_conv2d_matches_torch(algo: str, spec, padding_mode: str) -> None:
    kernel_size, padding, dilation = spec
    ref, ours = make_pair(
        4,
        6,
        kernel_size,
        padding=padding,
        dilation=dilation,
        groups=2,
        padding_mode=padding_mode,
        algo=algo,
    )
    check_against_torch(ref, ours, torch.randn(2, 4, 9, 11))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("algo", ["direct", "im2col"])
def test_conv2d_on_every_device(device: str, algo: str, padding_mode: str) -> None:
    """The module on cpu, the emulated CUDA device (every order) and cuda: asymmetric 'same',
    then a strided conv, channels_last."""
    ref, ours = make_pair(3, 5, 4, padding="same", padding_mode=padding_mode, algo=algo)
    check_against_torch(ref.to(device), ours.to(device), torch.randn(2, 3, 7, 6, device=device))
    ref, ours = make_pair(3, 4, 3, stride=2, padding=1, padding_mode=padding_mode, algo=algo)
    x = make_input((1, 3, 9, 7), device, layout="channels_last")
    ref, ours = ref.to(device), ours.to(device)
    out = check_against_torch(ref, ours, x)
    # torch's format, whatever it is: on cuda F.pad(mode='reflect') returns NCHW.
    expected_cl = ref(x).is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) == expected_cl
    if padding_mode == "zeros":
        assert expected_cl


@pytest.mark.parametrize("layout", ["channels_last", "noncontiguous"])
@pytest.mark.parametrize("padding", [1, "same"])
@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_conv2d_layouts(layout: str, padding, padding_mode: str) -> None:
    ref, ours = make_pair(4, 8, 4, padding=padding, padding_mode=padding_mode)
    x = make_input((2, 4, 10, 9), "cpu", layout=layout)
    out = check_against_torch(ref, ours, x)
    expected_cl = ref(x).is_contiguous(memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) == expected_cl


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
def test_conv2d_unbatched_and_empty(padding_mode: str) -> None:
    ref, ours = make_pair(3, 4, 3, padding="same", padding_mode=padding_mode)
    check_against_torch(ref, ours, torch.randn(3, 8, 7))
    if padding_mode == "zeros":  # torch's F.pad rejects empty batches for the other modes
        x = torch.randn(0, 3, 8, 7)
        assert ours(x).shape == ref(x).shape


def test_conv2d_float64_gradcheck() -> None:
    conv = cnnext.nn.Conv2d(
        2, 3, (2, 3), padding="same", padding_mode="reflect", dtype=torch.float64
    )
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv, (x,), eps=1e-6, atol=1e-7)


# ---- parameters, state_dict, from_torch ---------------------------------------------------------


def test_state_dict_loads_both_ways() -> None:
    ref = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    ours = cnnext.nn.Conv2d(4, 6, 3, padding=1, groups=2, algo="im2col")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    # torch checkpoint -> cnnext, through a real save/load
    buffer = io.BytesIO()
    torch.save(ref.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(2, 4, 7, 7)
    assert_close(ours(x), ref(x))
    # cnnext checkpoint -> torch
    with torch.no_grad():
        ours.weight.mul_(2)
    back = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    back.load_state_dict(ours.state_dict(), strict=True)
    assert_close(back(x), ours(x))
    # bias=False: no bias key either side
    assert list(cnnext.nn.Conv2d(2, 2, 1, bias=False).state_dict()) == ["weight"]


def test_from_torch_shares_parameters() -> None:
    ref = nn.Conv2d(3, 4, 3, stride=2, padding="valid", dilation=2, bias=False).double()
    ref.eval()
    ours = cnnext.nn.Conv2d.from_torch(ref, algo="direct")
    assert isinstance(ours, nn.Conv2d) and ours.algo == "direct"
    assert ours.weight is ref.weight and ours.bias is None and not ours.training
    for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"):
        assert getattr(ours, name) == getattr(ref, name)
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    assert_close(ours(x), ref(x))
    ours(x).sum().backward()  # a gradient through one is a gradient of both
    assert ref.weight.grad is not None
    plain = ours.to_torch()
    assert type(plain) is nn.Conv2d and plain.weight is ref.weight
    with pytest.raises(TypeError, match="expected a torch.nn.Conv2d"):
        cnnext.nn.Conv2d.from_torch(nn.Linear(2, 2))


def test_constructor_checks_and_repr() -> None:
    with pytest.raises(ValueError, match="algo must be one of"):
        cnnext.nn.Conv2d(3, 4, 3, algo="winograd")
    with pytest.raises(ValueError, match="not supported for strided"):
        cnnext.nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        cnnext.nn.Conv2d(3, 4, 3, padding_mode="mirror")
    conv = cnnext.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", algo="im2col")
    assert repr(conv) == (
        "Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), "
        "padding_mode=circular, algo='im2col')"
    )
    assert "algo" not in repr(cnnext.nn.Conv2d(3, 4, 3))


def test_pickle_and_deepcopy() -> None:
    conv = cnnext.nn.Conv2d(3, 4, 3, padding="same", algo="direct")
    clone = pickle.loads(pickle.dumps(conv))
    assert type(clone) is cnnext.nn.Conv2d and clone.algo == "direct"
    x = torch.randn(1, 3, 6, 6)
    assert_close(clone(x), conv(x))


# ---- algorithm selection: the heuristic ---------------------------------------------------------

# (input shape, weight shape, stride, padding, dilation, groups)
SHAPES = [
    ((2, 3, 32, 32), (16, 3, 3, 3), 1, 1, 1, 1),  # first layer: tiny reduction
    ((2, 64, 14, 14), (64, 64, 3, 3), 1, 1, 1, 1),  # small plane (196 pixels)
    ((2, 32, 16, 16), (32, 1, 3, 3), 1, 1, 1, 32),  # depthwise
    ((2, 32, 8, 8), (64, 32, 1, 1), 1, 0, 1, 1),  # pointwise
    ((1, 256, 2, 2), (256, 256, 3, 3), 1, 1, 1, 1),  # tiny plane, huge reduction
    ((4, 9, 8), (6, 2, 3, 3), 2, 1, 2, 2),  # unbatched, grouped, strided, dilated
]


def _args(shape, device: str = "cpu", dtype: torch.dtype = torch.float32):
    xs, ws, s, p, d, g = shape
    x = torch.randn(xs, device=device, dtype=dtype)
    w = torch.randn(ws, device=device, dtype=dtype) / (ws[1] * ws[2] * ws[3]) ** 0.5
    return x, w, (s, s), (p, p), (d, d), g


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_heuristic_gives_valid_choice(shape) -> None:
    x, w, *conf = _args(shape)
    algo, variant = _algo.choose(x, w, *conf)
    assert algo in cnnext.ops.ALGOS and variant == "auto"
    scale = max(1.0, w[0].numel() / 16)  # as tests/test_conv2d.py: long reductions
    got = cnnext.ops.conv2d(x, w, None, *conf, algo=algo)
    assert_close(got, F.conv2d(x, w, None, *conf), scale=scale)
    with cnnext.emulate_cuda():  # emulated CUDA tensors get the CUDA rule
        algo, variant = _algo.choose(x, w, *conf)
        assert algo in cnnext.ops.ALGOS and variant in cnnext.ops.VARIANTS


def test_heuristic_documented_decisions() -> None:
    """The cases the rule in cnnext/_algo.py is written for."""
    first, small_plane, depthwise, pointwise = (_args(SHAPES[i]) for i in (0, 1, 2, 3))
    large_plane = _args(((2, 16, 28, 28), (16, 16, 3, 3), 1, 1, 1, 1))
    assert _algo.choose(*depthwise) == ("direct", "auto")
    assert _algo.choose(*large_plane) == ("direct", "auto")
    assert _algo.choose(*small_plane, grads=True) == ("im2col", "auto")
    assert _algo.choose(*pointwise) == ("im2col", "auto")
    assert _algo.choose(*first) == ("im2col", "auto")
    big = _args(((8, 64, 32, 32), (128, 64, 3, 3), 1, 1, 1, 1))
    with cnnext.emulate_cuda():
        # CUDA: im2col only where it is a plain GEMM (1x1, stride 1, no padding, ungrouped,
        # C_in and C_out >= 32); the direct kernel's "auto" variant everywhere else.
        assert _algo.choose(*pointwise) == ("im2col", "auto")  # 32 -> 64 channels
        assert _algo.choose(*depthwise) == ("direct", "auto")
        assert _algo.choose(*first) == ("direct", "auto")
        assert _algo.choose(*large_plane) == ("direct", "auto")
        assert _algo.choose(*big) == ("direct", "auto")  # 3x3: implicit GEMM, no columns
        narrow = _args(((2, 16, 8, 8), (64, 16, 1, 1), 1, 0, 1, 1))
        assert _algo.choose(*narrow) == ("direct", "auto")  # C_in 16
        strided = _args(((2, 32, 8, 8), (64, 32, 1, 1), 2, 0, 1, 1))
        assert _algo.choose(*strided) == ("direct", "auto")  # a strided 1x1 gathers
        for dtype in (torch.float32, torch.float16):
            wide = _args(((1, 512, 4, 4), (512, 512, 1, 1), 1, 0, 1, 1), dtype=dtype)
            assert _algo.choose(*wide) == ("im2col", "auto")


# ---- algorithm selection: the autotuner ---------------------------------------------------------


@pytest.fixture
def tune_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Counts the autotuner's timing runs (each key should be timed once)."""
    calls: list = []
    real = _algo._tune

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_algo, "_tune", counting)
    return calls


def test_autotune_switch() -> None:
    assert cnnext.get_autotune() is False
    cnnext.set_autotune(True)
    assert cnnext.get_autotune() is True
    cnnext.set_autotune(False)
    assert cnnext.get_autotune() is False


def test_autotune_fills_cache_once_per_key(device: str, tune_calls: list) -> None:
    cnnext.set_autotune(True)
    ref, ours = make_pair(4, 6, 3, padding=1)
    ref, ours = ref.to(device), ours.to(device)
    x = torch.randn(1, 4, 6, 7, device=device)
    with torch.no_grad():
        for _ in range(3):
            assert_close(ours(x), ref(x))
    assert len(tune_calls) == 1
    cache = _algo.autotune_cache()
    assert len(cache) == 1
    ((key, (algo, variant)),) = cache.items()
    assert key[0] == ("cuda" if device == "cuda" else "emu" if cnnext.emulating() else "cpu")
    assert (algo, variant) in _algo.candidates(key[0])
    # A new shape, a new layout and a backward pass are new keys; each is timed once.
    with torch.no_grad():
        ours(torch.randn(2, 4, 5, 5, device=device))
        ours(x.contiguous(memory_format=torch.channels_last))
    check_against_torch(ref, ours, x)
    check_against_torch(ref, ours, x)
    assert len(tune_calls) == len(_algo.autotune_cache()) == 4
    cnnext.clear_autotune_cache()
    assert _algo.autotune_cache() == {}


def test_autotune_off_never_times(tune_calls: list) -> None:
    _, ours = make_pair(4, 6, 3, padding=1)
    ours(torch.randn(1, 4, 6, 6))
    assert tune_calls == [] and _algo.autotune_cache() == {}


def test_explicit_algo_never_tunes(tune_calls: list) -> None:
    cnnext.set_autotune(True)
    _, ours = make_pair(4, 6, 3, padding=1, algo="direct")
    ours(torch.randn(1, 4, 6, 6))
    assert tune_calls == []


def _recording_backend(seen: list):
    """aot_eager that also records the forward graph's code (which op was chosen)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def compiler(gm: torch.fx.GraphModule, example_inputs):
        seen.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def test_autotune_under_compile_uses_cache_never_times(tune_calls: list) -> None:
    torch._dynamo.reset()
    cnnext.set_autotune(True)
    ref, ours = make_pair(64, 64, 3, padding=1)  # inference on CPU: the heuristic picks direct
    x = torch.randn(1, 64, 6, 6)
    seen: list = []
    with torch.no_grad():
        out = torch.compile(ours, fullgraph=True, backend=_recording_backend(seen))(x)
        assert_close(out, ref(x), scale=8)
    assert tune_calls == [] and _algo.autotune_cache() == {}
    assert "conv2d_direct" in seen[-1]
    # With the key cached (here: by hand), the traced call takes the cached choice.
    key = _algo._key(x, ours.weight, (1, 1), (1, 1), (1, 1), 1, (False, False))
    _algo._cache[key] = ("im2col", "auto")
    torch._dynamo.reset()
    seen.clear()
    with torch.no_grad():
        out = torch.compile(ours, fullgraph=True, backend=_recording_backend(seen))(x)
    assert_close(out, ref(x), scale=8)
    assert "conv2d_im2col" in seen[-1] and tune_calls == []


# ---- LeNet-5 from cnnext modules, trained on the emulated CUDA device ---------------------------


def lenet5(algo: str = "auto") -> nn.Sequential:
    """LeNet-5 (ReLU and max pooling, as it is usually written today) for 1x28x28 inputs."""
    return nn.Sequential(
        cnnext.nn.Conv2d(1, 6, 5, padding=2, algo=algo),
        nn.ReLU(),
        cnnext.nn.MaxPool2d(2),
        cnnext.nn.Conv2d(6, 16, 5, algo=algo),
        nn.ReLU(),
        cnnext.nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def test_lenet5_trains_on_emulated_cuda() -> None:
    model = lenet5()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3])
    losses = []
    with cnnext.emulate_cuda("random:3"):
        for _ in range(8):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.7 * losses[0], losses
