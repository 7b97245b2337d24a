"""convert() on every kind of model that holds RNNs, and TorchScript / tracing of fusedrnn modules,
with torch.nn as the oracle."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from tolerances import assert_close

BACKENDS = ["reference", "triton", "cpp"]
F64 = torch.float64


def _usable(backend):
    reason = fusedrnn.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def flat(out):
    items = out if isinstance(out, tuple) else (out,)
    result = []
    for item in items:
        if isinstance(item, nn.utils.rnn.PackedSequence):
            result.append(item.data)
        elif isinstance(item, tuple):
            result.extend(flat(item))
        else:
            result.append(item)
    return result


# --------------------------------------------------------------------------- user subclasses
class MaskedLSTM(nn.LSTM):
    """The pattern of forecasting libraries: a subclass whose forward handles zero-length
    sequences around ``super().forward`` (one class per RNN type, via a mixin)."""

    def forward(self, x, hx=None, lengths=None):
        if lengths is None:
            return super().forward(x, hx)
        safe = lengths.clamp(min=1)
        out, state = super().forward(pack_padded_sequence(x, safe, enforce_sorted=False), hx)
        empty = (lengths == 0).to(x.dtype).view(1, -1, 1)
        state = tuple(s * (1 - empty) for s in state)
        return out, state


class ScaledGRUCell(nn.GRUCell):
    def __init__(self, *args, scale=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x, h=None):
        return super().forward(x * self.scale, h)


class Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = MaskedLSTM(3, 4, num_layers=2)
        self.cell = ScaledGRUCell(4, 4)
        self.plain = nn.GRU(4, 2)
        self.normed = weight_norm(nn.LSTM(2, 2), name="weight_hh_l0")
        self.spectral = spectral_norm(nn.GRUCell(2, 2), name="weight_ih")

    def forward(self, x, lengths):
        y, (h, _) = self.encoder(x, lengths=lengths)  # y: PackedSequence
        h1 = self.cell(h[-1])
        z, _ = self.plain(y)
        z, _ = self.normed(z)
        return z, self.spectral(h1[:, :2])


def _forecaster():
    torch.manual_seed(0)
    return Forecaster().double().eval()  # eval: spectral_norm's power iteration stays fixed


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_subclasses_and_parametrized_modules(backend):
    """Subclasses keep their own forward first in the MRO (so super().forward reaches fusedrnn),
    parametrized modules keep their parametrizations, every RNN is converted, results equal
    torch.nn's, and gradients too."""
    _usable(backend)
    model = _forecaster()
    x = torch.randn(4, 3, 3, dtype=F64)
    lengths = torch.tensor([4, 0, 2])
    expected = flat(model(x, lengths))
    params_before = [id(p) for p in model.parameters()]
    fusedrnn.convert(model, backend=backend)
    rnns = [m for m in model.modules() if isinstance(m, (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell))]
    assert len(rnns) == 5 and all(isinstance(m, fusedrnn.modules._BackendMixin) for m in rnns)
    assert type(model.encoder).__mro__[1:3] == (MaskedLSTM, fusedrnn.LSTM)
    assert isinstance(model.cell, ScaledGRUCell) and model.cell.scale == 0.5
    assert parametrize.is_parametrized(model.normed, "weight_hh_l0")
    assert parametrize.type_before_parametrizations(model.normed) is fusedrnn.LSTM
    assert [id(p) for p in model.parameters()] == params_before
    got = flat(model(x, lengths))
    assert_close(got, expected, F64)
    # the converted subclass pickles and deep-copies (its class is rebuilt on load)
    enc = pickle.loads(pickle.dumps(model.encoder))
    assert type(enc) is type(model.encoder) and enc.backend == backend
    assert_close(flat(copy.deepcopy(model.encoder)(x, lengths=lengths)), flat(model.encoder(x, lengths=lengths)), F64)
    # removing the parametrization leaves a fusedrnn module
    parametrize.remove_parametrizations(model.normed, "weight_hh_l0")
    assert type(model.normed) is fusedrnn.LSTM


def test_convert_gradients_match_torch():
    model = _forecaster()
    ours = fusedrnn.convert(_forecaster(), backend="reference")
    x = torch.randn(4, 3, 3, dtype=F64)
    lengths = torch.tensor([4, 1, 2])
    grads = []
    for m in (model, ours):
        sum(o.sin().sum() for o in flat(m(x, lengths))).backward()
        grads.append([p.grad for p in m.parameters()])
    assert_close(grads[1], grads[0], F64)


def test_convert_again_sets_the_backend():
    model = fusedrnn.convert(nn.Sequential(nn.LSTM(3, 4), MaskedLSTM(4, 4)), backend="reference")
    classes = [type(m) for m in model]
    fusedrnn.convert(model, backend="torch")
    assert [m.backend for m in model] == ["torch", "torch"]
    assert [type(m) for m in model] == classes
    fusedrnn.convert(model[0], backend="cpp")
    assert model[0].backend == "cpp"
    with pytest.raises(ValueError, match="unknown backend"):
        fusedrnn.convert(model, backend="nope")


def test_convert_scripted_model_raises_and_warns_for_scripted_parts():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
        scripted = torch.jit.script(nn.Sequential(nn.LSTM(3, 4)))
    with pytest.raises(TypeError, match="TorchScript module"):
        fusedrnn.convert(scripted)
    model = nn.Sequential(scripted, nn.GRU(4, 4))
    with pytest.warns(RuntimeWarning, match=r"stay torch.nn's: 0\.0"):
        fusedrnn.convert(model)
    assert type(model[1]) is fusedrnn.GRU


def test_quantize_dynamic_and_convert():
    """torch.ao's quantize_dynamic matches exact module types (qconfig lookup, module mapping and
    from_float all check ``type(module)``), so it cannot quantize a converted module: it warns
    that the module stays float (tests/test_quantize.py: ``fusedrnn.quantize_dynamic`` does what
    torch does for the unconverted model).  Quantizing first works: convert then leaves the
    quantized modules (torch's) alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LSTM(3, 4))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.LSTM})
    assert type(quantized[0]) is torch.ao.nn.quantized.dynamic.LSTM
    fusedrnn.convert(quantized)
    assert type(quantized[0]) is torch.ao.nn.quantized.dynamic.LSTM
    converted = fusedrnn.convert(model)
    with pytest.warns(RuntimeWarning, match="fusedrnn.quantize_dynamic"):
        assert type(torch.ao.quantization.quantize_dynamic(converted, {nn.LSTM})[0]) is fusedrnn.LSTM
    assert type(fusedrnn.quantize_dynamic(converted, {nn.LSTM})[0]) is torch.ao.nn.quantized.dynamic.LSTM


# ---------------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_jit_script_refuses_clearly_and_changes_nothing(mode):
    module = getattr(fusedrnn, mode)(3, 4)
    model = nn.Sequential(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for target in (module, model):
            with pytest.raises(RuntimeError, match=f"fusedrnn.{mode} cannot be compiled by torch.jit.script.*torch.jit.trace"):
                torch.jit.script(target)
    assert model[0] is module and type(module) is getattr(fusedrnn, mode)


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_jit_trace_saves_and_loads(backend, mode):
    if backend != "auto":
        _usable(backend)
    torch.manual_seed(0)
    ref = getattr(nn, mode)(3, 4).double()
    ours = getattr(fusedrnn, mode)(3, 4, backend=backend).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64) if "Cell" not in mode else torch.randn(2, 3, dtype=F64)
    traced = torch.jit.trace(ours, (x,), check_trace=False)
    buf = io.BytesIO()
    torch.jit.save(traced, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    x2 = torch.randn_like(x)  # other values, same shapes
    for m in (traced, loaded):
        assert_close(flat(m(x2)), flat(ref(x2)), F64)
