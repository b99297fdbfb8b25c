"""Whatever a user types as --methods / --suites, qbench answers with a QBenchError (one line), never
a traceback: parse_specs and the validation of every registered method and suite, fuzzed."""
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qbench import host  # noqa: E402
from qbench.params import QBenchError, parse_specs  # noqa: E402

METHODS, SUITES = sorted(host.methods()), sorted(host.suites())
PARAM_NAMES = sorted({p for cls in (*host.methods().values(), *host.suites().values()) for p in cls.params})
VALUES = ["0", "-1", "1", "2", "3", "4", "8", "64", "128", "1e999", "nan", "inf", "-inf", "1.5", "true", "false",
          "none", "null", "", " ", "1+8", "+", "++", "1+", "all", "auto", "nf4", "fp4", "float16", "tensor",
          "channel", "dynamic", "static", "c4", "9" * 40, "é", "\x00"]
fragment = st.one_of(
    st.sampled_from(METHODS + SUITES),
    st.sampled_from(PARAM_NAMES).flatmap(lambda k: st.sampled_from(VALUES).map(lambda v: f"{k}={v}")),
    st.sampled_from([",", ":", "=", "+", " ", "::", ",,", "=="]),
    st.text(max_size=8),
)
spec_text = st.lists(fragment, max_size=8).map("".join)


def construct(spec, make):
    try:
        make(spec.name, dict(spec.params))
    except QBenchError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_text)
def test_method_specs_never_raise_anything_but_qbench_error(text):
    try:
        specs = parse_specs(text)
    except QBenchError:
        return
    for spec in specs:
        assert isinstance(spec.name, str)
        construct(spec, host.make_method)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_text)
def test_suite_specs_never_raise_anything_but_qbench_error(text):
    try:
        specs = parse_specs(text)
    except QBenchError:
        return
    for spec in specs:
        construct(spec, host.make_suite)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=20), max_size=4))
def test_repeated_options_of_any_text(texts):
    try:
        parse_specs(texts)
    except QBenchError:
        pass
