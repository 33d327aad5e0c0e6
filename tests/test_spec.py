"""The YAML spec: shipped specs load and round-trip; bad specs fail at load time with
"FILE: FIELD: what is allowed"; hostile text (mask expressions, YAML tags) never runs."""

from __future__ import annotations

import builtins
import math
import os
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attngen.errors import SpecError
from attngen.spec import DTYPES, Causal, MaskSpec, ScoreSpec, Spec, Window, load_spec, parse_spec

pytestmark = pytest.mark.compiler

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
SHIPPED = sorted(SPECS_DIR.glob("*.yaml"))
BASE = "name: t\nhead_dim: 64\n"


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path, field: str, *fragments: str) -> SpecError:
    """load_spec(path) must raise SpecError "path: field: ..." containing every fragment."""
    with pytest.raises(SpecError) as info:
        load_spec(path)
    e, msg = info.value, str(info.value)
    assert e.source == str(path)
    assert e.field == field, msg
    assert msg.startswith(f"{path}: {field}: " if field else f"{path}: "), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return e


def spec_error(tmp_path: Path, text: str, field: str, *fragments: str) -> SpecError:
    return load_error(write(tmp_path, text), field, *fragments)


def same_but_source(a: Spec, b: Spec) -> bool:
    return replace(a, source="") == replace(b, source="")


# ------------------------------------------------------------------ shipped specs

def test_specs_are_shipped():
    assert len(SHIPPED) >= 5
    assert {"dense", "causal", "sliding_window"} <= {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_spec_loads_and_round_trips(path: Path, tmp_path: Path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.source == str(path)
    assert spec.name == path.stem  # shipped specs are named after their files
    assert 16 <= spec.head_dim <= 256 and 16 <= spec.head_dim_v <= 256
    assert spec.dtypes and set(spec.dtypes) <= set(DTYPES)

    text = spec.to_yaml()
    again = parse_spec(yaml.safe_load(text), "<round trip>")
    assert again.source == "<round trip>"
    assert same_but_source(again, spec)
    assert again.to_yaml() == text  # the canonical form is a fixed point

    copy = write(tmp_path, text, f"{path.stem}.yaml")  # and through a file, as `show --emit spec` users would
    assert same_but_source(load_spec(copy), spec)


def test_defaults_are_filled_in(tmp_path: Path):
    spec = load_spec(write(tmp_path, BASE))
    assert spec == Spec(name="t", description="", head_dim=64, head_dim_v=64, dtypes=DTYPES,
                        mask=MaskSpec(), score=ScoreSpec(), source=str(tmp_path / "spec.yaml"))
    assert spec.mask.is_dense
    assert spec.scale == pytest.approx(1 / 8)


def test_accepted_shorthands(tmp_path: Path):
    spec = load_spec(write(tmp_path, """\
        name: t2
        head_dim: 96
        head_dim_v: 64
        dtypes: [bf16, fp16, bf16]
        mask:
          causal: true
          window: {left: 16}
          prefix: 0
          expr: "kv_idx // C == q_idx // C"
          constants: {C: 32}
        score: {scale: 0.5, softcap: 30, alibi: true}
        """))
    assert spec.dtypes == ("bf16", "fp16")  # order kept, duplicates dropped
    assert spec.mask.causal == Causal("bottom_right")
    assert spec.mask.window == Window(left=16, right=None, align="bottom_right")
    assert spec.mask.prefix == 0 and spec.mask.constants == (("C", 32),)
    assert spec.score == ScoreSpec(scale=0.5, softcap=30.0, alibi=True)
    assert isinstance(spec.score.softcap, float)
    assert spec.scale == 0.5
    assert load_spec(write(tmp_path, BASE + "dtypes: fp32\n")).dtypes == ("fp32",)
    assert load_spec(write(tmp_path, BASE + "mask: {causal: false}\n")).mask.is_dense


# ------------------------------------------------------------------ round trip of generated specs

_EXPRS = [("kv_idx // C == q_idx // C", {"C": 64}), ("(q_idx - kv_idx) % 2 == 0", {}),
          ("abs(q_idx - kv_idx) <= W or kv_idx < S", {"W": 8, "S": 4})]
_positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)


@st.composite
def spec_documents(draw):
    data = {"name": draw(st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True)),
            "head_dim": draw(st.integers(16, 256))}
    if draw(st.booleans()):
        data["description"] = draw(st.text(max_size=30))
    if draw(st.booleans()):
        data["head_dim_v"] = draw(st.integers(16, 256))
    if draw(st.booleans()):
        data["dtypes"] = draw(st.lists(st.sampled_from(DTYPES), min_size=1, max_size=4))
    mask = {}
    if draw(st.booleans()):
        mask["causal"] = draw(st.sampled_from([True, {}, {"align": "top_left"}, {"align": "bottom_right"}]))
    if draw(st.booleans()):
        left, right = draw(st.one_of(st.none(), st.integers(0, 4096))), draw(st.integers(0, 4096))
        mask["window"] = {"left": left, "right": right, "align": draw(st.sampled_from(["top_left", "bottom_right"]))}
    if draw(st.booleans()):
        mask["prefix"] = draw(st.integers(0, 1 << 20))
    if draw(st.booleans()):
        mask["expr"], constants = draw(st.sampled_from(_EXPRS))
        if constants:
            mask["constants"] = constants
    if mask:
        data["mask"] = mask
    if draw(st.booleans()):
        data["score"] = {"scale": draw(st.none() | _positive), "softcap": draw(st.none() | _positive),
                         "alibi": draw(st.booleans())}
    return data


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec_documents())
def test_generated_specs_round_trip(data):
    spec = parse_spec(data, "gen.yaml")
    text = spec.to_yaml()
    again = parse_spec(yaml.safe_load(text), "again.yaml")
    assert same_but_source(again, spec)
    assert again.to_yaml() == text


# ------------------------------------------------------------------ bad specs: FILE: FIELD: what is allowed

def test_error_format_exact(tmp_path: Path):
    path = write(tmp_path, BASE + "mask:\n  window: {left: -3}\n")
    e = load_error(path, "mask.window.left")
    assert str(e) == f"{path}: mask.window.left: expected a non-negative integer, got -3"
    assert e.message == "expected a non-negative integer, got -3"


@pytest.mark.parametrize("text, field, fragments", [
    # required fields and the name
    ("head_dim: 64\n", "name", ["required field is missing"]),
    ("name: null\nhead_dim: 64\n", "name", ["required field is missing"]),
    ("name: t\n", "head_dim", ["required field is missing"]),
    ("name: Bad Name\nhead_dim: 64\n", "name",
     ["expected lower-case letters, digits and _, starting with a letter", "'Bad Name'"]),
    ("name: 1abc\nhead_dim: 64\n", "name", ["starting with a letter", "'1abc'"]),
    ("name: 'x-y'\nhead_dim: 64\n", "name", ["'x-y'"]),
    ("name: 5\nhead_dim: 64\n", "name", ["expected a string, got 5"]),
    ("name: t\nhead_dim: 64\ndescription: [a]\n", "description", ["expected a string"]),
    # head dims
    ("name: t\nhead_dim: 8\n", "head_dim", ["expected an integer from 16 to 256, got 8"]),
    ("name: t\nhead_dim: 300\n", "head_dim", ["expected an integer from 16 to 256, got 300"]),
    ("name: t\nhead_dim: 64.5\n", "head_dim", ["expected an integer, got 64.5"]),
    ("name: t\nhead_dim: '64'\n", "head_dim", ["expected an integer, got '64'"]),
    ("name: t\nhead_dim: true\n", "head_dim", ["expected an integer, got True"]),
    (BASE + "head_dim_v: 8\n", "head_dim_v", ["expected an integer from 16 to 256, got 8"]),
    (BASE + "head_dim_v: 512\n", "head_dim_v", ["expected an integer from 16 to 256, got 512"]),
    (BASE + "head_dim_v: 64.0\n", "head_dim_v", ["expected an integer, got 64.0"]),
    # dtypes
    (BASE + "dtypes: {fp16: 1}\n", "dtypes", ["expected a non-empty list drawn from fp16, bf16, fp32"]),
    (BASE + "dtypes: 16\n", "dtypes", ["expected a non-empty list drawn from fp16, bf16, fp32, got 16"]),
    (BASE + "dtypes: [fp16, fp8]\n", "dtypes", ["drawn from fp16, bf16, fp32", "'fp8'"]),
    (BASE + "dtypes: fp8\n", "dtypes", ["drawn from fp16, bf16, fp32", "'fp8'"]),
    (BASE + "dtypes: []\n", "dtypes", ["expected a non-empty list", "got []"]),
    (BASE + "dtypes:\n", "dtypes", ["expected a non-empty list", "got None"]),
    # unknown fields: the message lists what is allowed
    (BASE + "mask: {sliding: 4}\n", "mask.sliding",
     ["unknown field; allowed here: causal, window, prefix, expr, constants"]),
    (BASE + "score: {temp: 2}\n", "score.temp",
     ["unknown field; allowed here: scale, softcap, alibi, temperature"]),
    (BASE + "score: {temperature: 2}\n", "score.temperature", ["expected true or false, got 2"]),
    (BASE + "mask: {window: {left: 4, size: 8}}\n", "mask.window.size",
     ["unknown field; allowed here: left, right, align"]),
    (BASE + "mask: {causal: {align: top_left, diagonal: 1}}\n", "mask.causal.diagonal",
     ["unknown field; allowed here: align"]),
    # sections of the wrong type
    (BASE + "mask: [causal]\n", "mask", ["expected a mapping, got ['causal']"]),
    (BASE + "score: 1.0\n", "score", ["expected a mapping, got 1.0"]),
    (BASE + "mask: {causal: 'yes'}\n", "mask.causal", ["expected a mapping, got 'yes'"]),
    (BASE + "mask: {window: 256}\n", "mask.window", ["expected a mapping, got 256"]),
    # causal and window
    (BASE + "mask: {causal: {align: middle}}\n", "mask.causal.align",
     ["expected one of top_left, bottom_right, got 'middle'"]),
    (BASE + "mask: {window: {left: 4, align: middle}}\n", "mask.window.align",
     ["expected one of top_left, bottom_right, got 'middle'"]),
    (BASE + "mask: {window: {}}\n", "mask.window", ["a window needs `left` or `right`"]),
    (BASE + "mask: {window: {left: null, right: null, align: top_left}}\n", "mask.window",
     ["a window needs `left` or `right`", "leave the window out"]),
    (BASE + "mask: {window: {left: -3}}\n", "mask.window.left", ["expected a non-negative integer, got -3"]),
    (BASE + "mask: {window: {right: -1}}\n", "mask.window.right", ["expected a non-negative integer, got -1"]),
    (BASE + "mask: {window: {left: 2.5}}\n", "mask.window.left", ["expected an integer, got 2.5"]),
    (BASE + "mask: {prefix: -3}\n", "mask.prefix", ["expected a non-negative integer, got -3"]),
    (BASE + "mask: {prefix: '128'}\n", "mask.prefix", ["expected an integer, got '128'"]),
    # score
    (BASE + "score: {softcap: 0}\n", "score.softcap", ["expected a positive number, got 0"]),
    (BASE + "score: {softcap: -30.0}\n", "score.softcap", ["expected a positive number, got -30.0"]),
    (BASE + "score: {softcap: x}\n", "score.softcap", ["expected a number, got 'x'"]),
    (BASE + "score: {softcap: .inf}\n", "score.softcap", ["expected a number, got inf"]),
    (BASE + "score: {scale: abc}\n", "score.scale", ["expected a number, got 'abc'"]),
    (BASE + "score: {scale: [1.0]}\n", "score.scale", ["expected a number, got [1.0]"]),
    (BASE + "score: {scale: true}\n", "score.scale", ["expected a number, got True"]),
    (BASE + "score: {scale: .nan}\n", "score.scale", ["expected a number, got nan"]),
    (BASE + "score: {scale: 0}\n", "score.scale", ["expected a positive number, got 0"]),
    (BASE + "score: {alibi: 'yes'}\n", "score.alibi", ["expected true or false, got 'yes'"]),
    (BASE + "score: {alibi: 1}\n", "score.alibi", ["expected true or false, got 1"]),
    # constants
    (BASE + "mask: {constants: {C: 4}}\n", "mask.constants",
     ["constants are only used by `expr`, which is missing"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx', constants: {q_idx: 4}}\n", "mask.constants.q_idx",
     ["constant names are identifiers other than", "kv_idx", "q_idx", "Nq", "Nk"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx', constants: {Nk: 4}}\n", "mask.constants.Nk",
     ["constant names are identifiers other than"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx', constants: {max: 4}}\n", "mask.constants.max",
     ["constant names are identifiers other than"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx', constants: {'2x': 4}}\n", "mask.constants.2x",
     ["constant names are identifiers other than"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx // C', constants: {C: 1.5}}\n", "mask.constants.C",
     ["expected an integer, got 1.5"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx // C', constants: {C: '4'}}\n", "mask.constants.C",
     ["expected an integer, got '4'"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx // C', constants: {C: true}}\n", "mask.constants.C",
     ["expected an integer, got True"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx', constants: [C]}\n", "mask.constants",
     ["expected a mapping of names to integers, got ['C']"]),
    # the expression is checked at load time, against the constants
    (BASE + "mask: {expr: 'q_idx >= kv_idx // C'}\n", "mask.expr", ["`C` is an unknown name"]),
    (BASE + "mask: {expr: 'q_idx >= kv_idx // C', constants: {C: 0}}\n", "mask.expr",
     ["must be a positive integer constant"]),
    (BASE + "mask: {expr: 'q_idx - kv_idx'}\n", "mask.expr", ["must be a boolean"]),
    (BASE + "mask: {expr: 'q_idx >= '}\n", "mask.expr", ["not a valid expression"]),
    (BASE + "mask: {expr: ''}\n", "mask.expr", ["the expression is empty"]),
    (BASE + "mask: {expr: 5}\n", "mask.expr", ["expected a string, got 5"]),
], ids=lambda v: v if isinstance(v, str) and "\n" not in v and len(v) < 30 else None)
def test_bad_spec(tmp_path: Path, text: str, field: str, fragments: list[str]):
    spec_error(tmp_path, text, field, *fragments)


def test_unknown_top_level_field_lists_every_allowed_field(tmp_path: Path):
    e = spec_error(tmp_path, BASE + "heads: 8\n", "heads", "unknown field; allowed here: name, description, ")
    allowed = e.message.split("allowed here: ", 1)[1].split(", ")
    assert {"name", "description", "head_dim", "head_dim_v", "dtypes", "mask", "score"} <= set(allowed)


@pytest.mark.parametrize("document", ["- name: t\n  head_dim: 64\n", "just a string\n", "42\n", ""])
def test_top_level_must_be_a_mapping(tmp_path: Path, document: str):
    spec_error(tmp_path, document, "<top level>", "expected a mapping")


def test_top_level_list_names_what_it_got(tmp_path: Path):
    spec_error(tmp_path, "- a\n- b\n", "<top level>", "expected a mapping, got ['a', 'b']")


@pytest.mark.parametrize("text, line, column", [
    ("name: [t\nhead_dim: 64\n", 2, 9),            # unclosed flow sequence
    ("name: t\n\thead_dim: 64\n", 2, 1),           # a tab cannot start a token
    ("name: t\nhead_dim: 64\n  dtypes: [fp16]\n", 3, 9),
    ("name: t\nhead_dim: 64\n---\nname: u\n", 3, 1),  # two documents
])
def test_invalid_yaml_names_line_and_column(tmp_path: Path, text: str, line: int, column: int):
    e = spec_error(tmp_path, text, "", "not valid YAML", f"line {line}, column {column}: ")
    assert e.field == ""


def test_missing_file(tmp_path: Path):
    path = tmp_path / "nope" / "missing.yaml"
    load_error(path, "", "cannot read the file")
    assert str(path) in str(pytest.raises(SpecError, load_spec, str(path)).value)  # str paths too


def test_directory_is_not_a_spec(tmp_path: Path):
    load_error(tmp_path, "", "cannot read the file")


def test_non_utf8_file_is_a_spec_error(tmp_path: Path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: t\nhead_dim: 64\ndescription: caf\xe9\n")
    load_error(path, "")


def test_scalar_constants_is_a_spec_error(tmp_path: Path):
    spec_error(tmp_path, BASE + "mask: {expr: 'q_idx >= kv_idx', constants: 5}\n",
               "mask.constants", "expected a mapping of names to integers, got 5")


def test_parse_spec_without_file_uses_default_source():
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "t", "head_dim": 8})
    assert str(info.value) == "<spec>: head_dim: expected an integer from 16 to 256, got 8"


# ------------------------------------------------------------------ hostile text never runs

@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A builtin `attngen_probe` and a replacement os.system, both recording calls; cwd is tmp_path."""
    calls: list[tuple] = []

    def record(*args, **kwargs):
        calls.append(args)
        return 1

    monkeypatch.setattr(builtins, "attngen_probe", record, raising=False)
    monkeypatch.setattr(os, "system", record)
    monkeypatch.chdir(tmp_path)
    return calls


HOSTILE = [
    "attngen_probe() == 1",
    "__import__('os').system('touch X') == 0",
    "q_idx >= kv_idx and attngen_probe() == 1",
    "q_idx >= kv_idx or __import__('os').system('touch X') == 0",
    "attngen_probe",
    "q_idx >= (attngen_probe() or 0)",
    "q_idx if attngen_probe() else kv_idx",
    "(lambda: attngen_probe())() == 1",
    "[attngen_probe() for _ in (1,)] == [1]",
    "eval('attngen_probe()') == 1",
    "exec('import os; os.system(\"touch X\")') is None",
    "open('X', 'w').write('x') == 1",
    "q_idx.__class__.__bases__[0].__subclasses__() == 0",
    "getattr(__builtins__, 'attngen_probe')() == 1",
    "(x := attngen_probe()) == 1",
    "f'{attngen_probe()}' == '1'",
    "abs(attngen_probe()) == 1",
    "max(q_idx, attngen_probe()) >= kv_idx",
    "q_idx >= kv_idx; attngen_probe()",
    "q_idx >= kv_idx\nattngen_probe()",
    "__import__('os').system('touch X') == 0 " + "or q_idx >= kv_idx " * 40,  # too long, never parsed
]


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_mask_expr_rejected_at_load_time(tmp_path: Path, probe: list, expr: str):
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump({"name": "hostile", "head_dim": 64, "mask": {"expr": expr}}))
    load_error(path, "mask.expr")
    assert probe == []
    assert not (tmp_path / "X").exists()


def test_hostile_expr_via_constant_names_is_rejected(tmp_path: Path, probe: list):
    # a constant cannot smuggle a function name in: names are checked, and calls are limited to abs/min/max
    path = write(tmp_path, BASE + "mask: {expr: 'attngen_probe() == C', constants: {C: 1}}\n")
    load_error(path, "mask.expr", "calls are limited to abs, min, max")
    path = write(tmp_path, BASE + "mask: {expr: 'q_idx >= kv_idx', constants: {__import__: 1}}\n")
    spec = load_spec(path)  # a valid identifier, merely unused: harmless
    assert spec.mask.constants == (("__import__", 1),)
    assert probe == []


@pytest.mark.parametrize("tag", [
    '!!python/object/apply:os.system ["touch X"]',
    "!!python/object/apply:builtins.attngen_probe []",
    "!!python/name:os.system",
    "!!python/object/new:os.system [touch X]",
    "!!python/module:os",
])
def test_python_yaml_tags_are_rejected(tmp_path: Path, probe: list, tag: str):
    path = write(tmp_path, f"name: {tag}\nhead_dim: 64\n")
    load_error(path, "", "not valid YAML", "line 1, column 7", "could not determine a constructor")
    assert probe == []
    assert not (tmp_path / "X").exists()


def test_python_tag_inside_mask_is_rejected(tmp_path: Path, probe: list):
    path = write(tmp_path, BASE + 'mask:\n  expr: !!python/object/apply:os.system ["touch X"]\n')
    load_error(path, "", "not valid YAML", "line 4")
    assert probe == [] and not (tmp_path / "X").exists()


def test_yaml_aliases_are_plain_data(tmp_path: Path):
    # anchors/aliases are ordinary YAML and resolve to values, not code
    spec = load_spec(write(tmp_path, "name: t\nhead_dim: &d 64\nhead_dim_v: *d\n"))
    assert spec.head_dim_v == 64
    assert math.isclose(spec.scale, 0.125)
