"""Dynamic quantization of models holding fusedrnn modules, with torch.ao.quantization's
``quantize_dynamic`` on the unconverted torch.nn model as the oracle.

torch matches qconfigs and quantized classes by exact class, so it cannot see a fusedrnn module as
the torch.nn module it replaces: ``fusedrnn.quantize_dynamic`` does it (same arguments, same
result as torch's on the model before ``convert``), and torch's own pass over a fusedrnn module
warns (no qconfig) or raises (a qconfig given) instead of leaving it in float without a word.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import fusedrnn
from tolerances import assert_close

tq = pytest.importorskip("torch.ao.quantization")
nnqd = pytest.importorskip("torch.ao.nn.quantized.dynamic")

_ENGINES = set(torch.backends.quantized.supported_engines) - {"none"}
pytestmark = [
    pytest.mark.skipif(not _ENGINES, reason="no quantized engine in this torch build"),
    # torch.ao.quantization's own deprecation notices: not what these tests are about
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
]
_FP16 = pytest.mark.skipif(not _ENGINES & {"fbgemm", "x86"}, reason="float16 dynamic quantization needs fbgemm")

BACKENDS = ["reference", "triton", "cpp"]
RNNS = [nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell]
QUANTIZED = {nn.LSTM: nnqd.LSTM, nn.GRU: nnqd.GRU, nn.LSTMCell: nnqd.LSTMCell, nn.GRUCell: nnqd.GRUCell}


def _usable(backend):
    reason = fusedrnn.available_backends()[backend]
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


class Model(nn.Module):
    """One of each RNN class, two layers and both directions for the sequence modules, and a
    Linear (which quantize_dynamic's default quantizes too)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(5, 6, num_layers=2, batch_first=True)
        self.lstm_cell = nn.LSTMCell(5, 4)
        self.gru_cell = nn.GRUCell(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # x: (T, B, I)
        out_l, (h_l, c_l) = self.lstm(x)
        out_g, h_g = self.gru(x.transpose(0, 1))
        h_lc, c_lc = self.lstm_cell(x[0])
        h_gc = self.gru_cell(x[-1], self.gru_cell(x[0]))
        return out_l, h_l, c_l, out_g, h_g, h_lc, c_lc, h_gc, self.head(h_gc)


OUTPUT_NAMES = ["lstm out", "lstm h", "lstm c", "gru out", "gru h", "lstm_cell h", "lstm_cell c",
                "gru_cell h", "head"]
OUTPUT_OF = {"lstm": (0, 1, 2), "gru": (3, 4), "lstm_cell": (5, 6), "gru_cell": (7, 8), "head": (8,)}


def _pair(backend="reference"):
    """(torch.nn model, converted deep copy): the same weights."""
    torch.manual_seed(0)
    model = Model()
    return model, fusedrnn.convert(copy.deepcopy(model), backend=backend)


def _input():
    return torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(1))


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # fusedrnn's "left in float" must not fire
        return fn(*args, **kwargs)


def _assert_same_modules(quantized, expected, converted_names=()):
    """Every submodule of ``quantized`` has the class torch gave the unconverted model, except
    those named in ``converted_names``, which are fusedrnn's twin of torch's float module."""
    got, want = dict(quantized.named_modules()), dict(expected.named_modules())
    assert got.keys() == want.keys()
    for name, module in got.items():
        if name in converted_names:
            assert isinstance(module, fusedrnn.modules._BackendMixin), name
            assert isinstance(module, type(want[name])), (name, type(module), type(want[name]))
        else:
            assert type(module) is type(want[name]), (name, type(module), type(want[name]))
        assert not hasattr(module, "qconfig"), name


def _check(quantized, expected, float_names, x):
    """Quantized modules give exactly torch's outputs (they are torch's modules with the same
    quantized weights); modules left in float run fusedrnn and match torch within tolerance."""
    outs, refs = quantized(x), expected(x)
    for name, idx in OUTPUT_OF.items():
        if name in float_names:
            assert_close([outs[i] for i in idx], [refs[i] for i in idx], torch.float32,
                         [OUTPUT_NAMES[i] for i in idx])
        elif not set(idx) & {i for n in float_names for i in OUTPUT_OF[n]}:
            for i in idx:
                assert torch.equal(outs[i], refs[i]), OUTPUT_NAMES[i]


# ------------------------------------------------------------------- fusedrnn.quantize_dynamic
SPECS = {
    "set": lambda: {nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell},
    "dict": lambda: {nn.LSTM: tq.default_dynamic_qconfig, nn.GRU: tq.float16_dynamic_qconfig,
                     nn.LSTMCell: tq.float16_dynamic_qconfig, nn.GRUCell: tq.default_dynamic_qconfig},
    "default (None)": lambda: None,
    "names": lambda: {"lstm", "gru", "lstm_cell", "gru_cell"},
    "fusedrnn classes": lambda: {fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.LSTMCell, fusedrnn.GRUCell},
}


@pytest.mark.parametrize("dtype", [torch.qint8, pytest.param(torch.float16, marks=_FP16)])
@pytest.mark.parametrize("form", list(SPECS))
def test_quantize_dynamic_matches_torch(form, dtype):
    if form == "dict" and not _ENGINES & {"fbgemm", "x86"}:
        pytest.skip("float16 dynamic quantization needs fbgemm")
    model, converted = _pair()
    spec = SPECS[form]()
    # the spec torch gets for the unconverted model names torch.nn's classes
    torch_spec = SPECS["set"]() if form == "fusedrnn classes" else spec
    expected = tq.quantize_dynamic(model, torch_spec, dtype=dtype)
    quantized = _quiet(fusedrnn.quantize_dynamic, converted, spec, dtype=dtype)
    for name in ("lstm", "gru", "lstm_cell", "gru_cell"):
        assert type(getattr(quantized, name)) is QUANTIZED[type(getattr(model, name))], name
    _assert_same_modules(quantized, expected)
    _check(quantized, expected, (), _input())
    # the converted model itself is untouched (inplace=False)
    for name in ("lstm", "gru", "lstm_cell", "gru_cell"):
        module = getattr(converted, name)
        assert type(module) is getattr(fusedrnn, type(getattr(model, name)).__name__)
        assert module.backend == "reference" and not hasattr(module, "qconfig")


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_left_in_float_stay_fusedrnn(backend):
    """A spec naming only some classes: the others stay the fusedrnn modules they were (same
    objects in the quantized copy's place, same backend), running fusedrnn's kernels."""
    _usable(backend)
    model, converted = _pair(backend)
    x = _input()
    with torch.no_grad():
        before = converted(x)
    spec = {nn.LSTM, nn.GRUCell}
    expected = tq.quantize_dynamic(model, spec)
    quantized = _quiet(fusedrnn.quantize_dynamic, converted, spec)
    _assert_same_modules(quantized, expected, converted_names=("gru", "lstm_cell"))
    assert type(quantized.gru) is fusedrnn.GRU and type(quantized.lstm_cell) is fusedrnn.LSTMCell
    assert quantized.gru.backend == backend and quantized.lstm_cell.backend == backend
    with torch.no_grad():
        after = quantized(x)
    for i in OUTPUT_OF["gru"] + OUTPUT_OF["lstm_cell"]:
        assert torch.equal(after[i], before[i]), OUTPUT_NAMES[i]
    _check(quantized, expected, ("gru", "lstm_cell"), x)


def test_inplace_quantizes_the_model_itself():
    model, converted = _pair()
    kept = converted.gru
    expected = tq.quantize_dynamic(model, {nn.LSTM, nn.LSTMCell}, inplace=True)
    result = _quiet(fusedrnn.quantize_dynamic, converted, {nn.LSTM, nn.LSTMCell}, inplace=True)
    assert result is converted and expected is model
    assert type(converted.lstm) is nnqd.LSTM and type(converted.lstm_cell) is nnqd.LSTMCell
    assert converted.gru is kept and type(kept) is fusedrnn.GRU and kept.backend == "reference"
    _assert_same_modules(converted, model, converted_names=("gru", "gru_cell"))
    _check(converted, model, ("gru", "gru_cell"), _input())


def test_modules_built_as_fusedrnn_modules():
    """A model written with fusedrnn's classes (not converted) quantizes as the same model
    written with torch.nn's."""
    torch.manual_seed(0)
    torch_model = nn.Sequential(nn.LSTM(4, 5), nn.GRU(4, 5))
    ours = nn.Sequential(fusedrnn.LSTM(4, 5, backend="reference"), fusedrnn.GRU(4, 5, backend="reference"))
    ours.load_state_dict(torch_model.state_dict())
    expected = tq.quantize_dynamic(torch_model, {nn.LSTM})
    quantized = _quiet(fusedrnn.quantize_dynamic, ours, {fusedrnn.LSTM})
    assert type(quantized[0]) is nnqd.LSTM and type(quantized[1]) is fusedrnn.GRU
    x = _input()[..., :4]
    assert all(torch.equal(a, b) for a, b in zip(_flat(quantized[0](x)), _flat(expected[0](x))))


def _flat(out):
    return [t for item in out for t in (item if isinstance(item, tuple) else (item,))]


# ------------------------------------------------------------- subclasses and parametrizations
class MyLSTM(nn.LSTM):
    def forward(self, x, hx=None):
        out, state = super().forward(x, hx)
        return 2 * out, state


class MyGRUCell(nn.GRUCell):
    def forward(self, x, hx=None):
        return super().forward(x, hx) + 1


@pytest.mark.parametrize("spec", ["torch classes", "subclasses"])
def test_subclasses_are_treated_as_torch_treats_them(spec):
    """torch's tables match exact classes, so a user subclass of nn.LSTM is not quantized (not
    even when the spec names it: no quantized class is mapped to it).  The converted subclass
    (the user's class first in its MRO) gets exactly that: it stays float, running fusedrnn."""
    torch.manual_seed(0)
    model = nn.Sequential(MyLSTM(4, 5), MyGRUCell(4, 3))
    converted = fusedrnn.convert(copy.deepcopy(model), backend="reference")
    qspec = {nn.LSTM, nn.GRUCell} if spec == "torch classes" else {MyLSTM, MyGRUCell}
    expected = tq.quantize_dynamic(model, qspec)
    quantized = _quiet(fusedrnn.quantize_dynamic, converted, qspec)
    assert type(expected[0]) is MyLSTM and type(expected[1]) is MyGRUCell  # the oracle
    assert isinstance(quantized[0], MyLSTM) and isinstance(quantized[0], fusedrnn.LSTM)
    assert isinstance(quantized[1], MyGRUCell) and isinstance(quantized[1], fusedrnn.GRUCell)
    assert type(quantized[0]) is type(converted[0]) and type(quantized[1]) is type(converted[1])
    x = _input()[..., :4]
    assert_close(_flat(quantized[0](x)), _flat(expected[0](x)), torch.float32)
    assert_close([quantized[1](x[0])], [expected[1](x[0])], torch.float32)


def test_subclass_in_mapping_fails_as_in_torch():
    """Mapping a subclass to a quantized class: torch's from_float refuses it (exact class
    check); the converted subclass gets the same error."""
    model = nn.Sequential(MyLSTM(4, 5))
    converted = fusedrnn.convert(copy.deepcopy(model))
    args = ({MyLSTM}, torch.qint8, {MyLSTM: nnqd.LSTM})
    with pytest.raises(Exception) as torch_err:
        tq.quantize_dynamic(model, *args)
    with pytest.raises(type(torch_err.value)) as our_err:
        fusedrnn.quantize_dynamic(converted, *args)
    assert str(our_err.value) == str(torch_err.value)


def test_parametrized_module_fails_as_in_torch_and_is_restored():
    """torch's from_float refuses a parametrized RNN (weight_norm); fusedrnn.quantize_dynamic
    raises the same error and gives every module its fusedrnn class back, even with inplace=True
    (the qconfigs torch attached before failing stay, as they do on torch's model)."""
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.LSTM(4, 5), "weight_hh_l0"), nn.GRU(4, 5))
    converted = fusedrnn.convert(copy.deepcopy(model), backend="reference")
    classes = [type(m) for m in converted]
    for inplace in (False, True):
        with pytest.raises(Exception) as torch_err:
            tq.quantize_dynamic(copy.deepcopy(model), {nn.LSTM}, inplace=inplace)
        with pytest.raises(type(torch_err.value)) as our_err:
            fusedrnn.quantize_dynamic(converted, {nn.LSTM}, inplace=inplace)
        assert str(our_err.value) == str(torch_err.value)
        assert [type(m) for m in converted] == classes
        assert hasattr(converted[0], "qconfig") == inplace
    assert isinstance(converted[0], fusedrnn.LSTM)
    # not named: the parametrized module stays float (as torch leaves it), still fusedrnn's
    converted = fusedrnn.convert(copy.deepcopy(model), backend="reference")
    classes = [type(m) for m in converted]
    expected = tq.quantize_dynamic(model, {nn.GRU})
    quantized = _quiet(fusedrnn.quantize_dynamic, converted, {nn.GRU})
    assert type(expected[0]) is type(model[0]) and type(expected[1]) is nnqd.GRU  # the oracle
    assert type(quantized[0]) is classes[0] and type(quantized[1]) is nnqd.GRU
    x = _input()[..., :4]
    assert_close(_flat(quantized[0](x)), _flat(expected[0](x)), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(_flat(quantized[1](x)), _flat(expected[1](x))))


def test_clashing_fusedrnn_and_torch_keys_raise():
    model = fusedrnn.convert(nn.Sequential(nn.LSTM(4, 5)))
    spec = {nn.LSTM: tq.default_dynamic_qconfig, fusedrnn.LSTM: tq.float16_dynamic_qconfig}
    with pytest.raises(ValueError, match="different values"):
        fusedrnn.quantize_dynamic(model, spec)


# --------------------------------------------------- torch.ao.quantization's own quantize_dynamic
@pytest.mark.parametrize("form", ["set", "dict", "default (None)"])
def test_torch_quantize_dynamic_warns_instead_of_skipping_silently(form):
    """torch's own pass skips fusedrnn modules (exact-class tables): each one says so, names
    fusedrnn.quantize_dynamic, and stays a working fusedrnn module with its backend."""
    model, converted = _pair()
    x = _input()
    with torch.no_grad():
        before = converted(x)
    with pytest.warns(RuntimeWarning, match="leaves this module in float") as record:
        quantized = tq.quantize_dynamic(converted, SPECS[form]())
    messages = [str(w.message) for w in record if "leaves this module in float" in str(w.message)]
    for name in ("LSTM", "GRU", "LSTMCell", "GRUCell"):
        assert any(m.startswith(f"fusedrnn.{name}:") and "fusedrnn.quantize_dynamic" in m
                   for m in messages), name
    for name in ("lstm", "gru", "lstm_cell", "gru_cell"):
        module = getattr(quantized, name)
        assert type(module) is type(getattr(converted, name)) and module.backend == "reference"
        assert not hasattr(module, "qconfig")
    with torch.no_grad():
        after = quantized(x)
    for i, name in enumerate(OUTPUT_NAMES[:-1]):
        assert torch.equal(after[i], before[i]), name


def test_torch_quantize_dynamic_raises_when_a_fusedrnn_module_gets_a_qconfig():
    """A qconfig reaching a fusedrnn module (by its name, or from a parent) is a request torch
    would leave unanswered: raise, naming the way that works."""
    _, converted = _pair()
    for spec, name in (({"lstm"}, "LSTM"), ({"": tq.default_dynamic_qconfig}, "LSTM"), ({fusedrnn.GRU}, "GRU")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # modules visited before: "left in float"
            with pytest.raises(RuntimeError, match=rf"fusedrnn\.{name}: .*fusedrnn\.quantize_dynamic"):
                tq.quantize_dynamic(converted, spec)


def test_qconfig_attribute_behaves_as_on_torch_modules():
    module = fusedrnn.LSTM(3, 4)
    assert not hasattr(module, "qconfig") and getattr(module, "qconfig", "absent") == "absent"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # ``module.qconfig = None``: the user's "keep it float", silent
        module.qconfig = None
    assert module.qconfig is None and "qconfig" in module.__dict__
    clone = copy.deepcopy(module)
    assert clone.qconfig is None
    del module.qconfig
    assert not hasattr(module, "qconfig")
    with pytest.raises(AttributeError):
        del module.qconfig
    with pytest.raises(RuntimeError, match="fusedrnn.quantize_dynamic"):
        module.qconfig = tq.default_dynamic_qconfig
    assert not hasattr(module, "qconfig")


def test_spec_without_rnns_is_silent():
    """A spec naming no RNN class (``{nn.Linear}``) leaves fusedrnn modules in float as it leaves
    torch.nn's: nothing to warn about."""
    _, converted = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quantized = tq.quantize_dynamic(converted, {nn.Linear})
    assert type(quantized.lstm) is type(converted.lstm)
