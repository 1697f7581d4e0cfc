"""Property tests: whatever a manifest file holds, `load` returns a Manifest or raises
ManifestError whose every line names the file; never another exception, never a traceback.

About 300 examples in all (a few seconds); each test's example count is set where it runs.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpupack import manifest_fields, manifest_yaml
from gpupack.manifest import Manifest, ManifestError, load

CAPACITY = 80 * 10**9
# No example database: it would leave .hypothesis/ in the work tree; a failure prints its reproducer.
FUZZ = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

BASE: dict[str, Any] = {
    "name": "fuzz",
    "env": {"A": "1"},
    "defaults": {"mem": "1GB", "time": "1h"},
    "phases": [
        {"name": "train", "experiments": [
            {"name": "t-{task}-s{seed}", "cmd": "train {task} {seed} {out}",
             "grid": {"seed": [1, 2], "task": ["a", "b"]}, "outputs": ["{out}/r.json"]},
            {"name": "solo", "cmd": "solo", "gpus": 2, "exclusive": True},
        ]},
        {"name": "eval", "barrier": True, "experiments": [
            {"name": "e-s{seed}", "cmd": "eval {seed}", "grid": {"seed": [1, 2]}, "depends_on": ["t-*-s{seed}"]},
        ]},
    ],
}  # fmt: skip
EXPERIMENTS = [(0, 0), (0, 1), (1, 0)]  # (phase, experiment) positions in BASE

# Values that every field refuses, whichever experiment of BASE holds them.
BAD: dict[str, list[Any]] = {
    "name": [None, 5, "", "a/b", ".", "..", "x" * 201, "a\x00b", "\ud800", "{out}", "{nope}", "a\nb", ["n"]],
    "cmd": [None, 5, "", "{nope}", "{a.b}", "{seed[0]}", "awk '{print}'", "echo }", "{name!r}", "x\x00", {"a": 1}],
    "grid": [[1], "seed", {"seed": 3}, {"seed": []}, {"name": [1]}, {"a.b": [1]}, {"seed": [None]}, {"seed": [[1]]}],
    "gpus": [True, -1, 1.5, "2", None, [1], {"a": 1}],
    "cpus": [0, -3, False, "4", 2.5],
    "retries": [-1, True, "1", 0.5],
    "mem": ["60 GX", "20G", "-5GB", "", "GB", -1, 20, True, [], "1e9", "NaN GB", "٣GB", "100TB", float("inf")],
    "time": ["2 hours", "30m1h", "-1h", -5, 0, True, "h", [1], "1:99", float("nan"), 10**400],
    "util": [0, 1.5, -0.1, True, "0.5", None, float("nan")],
    "exclusive": ["yes", 1, None, "true"],
    "resumable": ["no", 0, None],
    "depends_on": [{"a": 1}, 5, [1], [""], "nothing-matches", "solo-*-x", ["{nope}"]],
    "outputs": [5, [None], {"a": "b"}, ["{nope}"], [""]],
    "env": [["A=1"], "A=1", {"A": None}, {"A": [1]}, {"CUDA_VISIBLE_DEVICES": "0"}, {"": "x"}, {"A": "{nope}"}],
}
TOP_BAD: dict[str, list[Any]] = {
    "name": [None, 5, "", "a/b", "..", "x" * 300, ["x"]],
    "runs_dir": [None, 5, "", ["r"]],
    "workdir": [None, 5, "no/such/dir", {"a": 1}],
    "env": [["A"], {"GPUPACK_RUN_DIR": "x"}, {"A": {"b": 1}}, {"A": "{seed}"}],
    "defaults": [[1], "x", {"name": "x"}, {"cmd": "x"}, {"grid": {}}, {"mem": "1 XB"}, {"gpus": -1}, {"zzz": 1}],
    "phases": [None, [], {}, "p", [None], [{"name": "p"}], [{"name": "p", "experiments": []}]],
}
VALID_KEYS = {
    "top": {"name", "runs_dir", "workdir", "env", "defaults", "phases"},
    "phase": {"name", "barrier", "experiments"},
    "experiment": {"name", "cmd", "grid", "gpus", "mem", "time", "cpus", "exclusive", "resumable", "retries",
                   "util", "depends_on", "outputs", "env"},
}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["20GB", "1h30m", "{name}", "{out}/x", "{{", "}", "*", "t-*", "\ud800", "a/b", "yes", "~"]),
)  # fmt: skip
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "exp.yaml"


def dump(data: object) -> str:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def outcome(path: Path, text: str, gpu_capacity_bytes: int | None = CAPACITY) -> Manifest | ManifestError:
    """Load `text` from `path`; any exception but ManifestError fails the test by escaping."""
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        return load(path, gpu_capacity_bytes=gpu_capacity_bytes)
    except ManifestError as e:
        assert e.problems and str(e) == "\n".join(e.problems)
        for line in e.problems:
            assert line.startswith(f"{path}: "), line
            assert len(line[len(f"{path}: ") :].split(": ", 2)) == 3, line  # who: field: what
            assert "\n" not in line and "\r" not in line, line
            assert "gpupack bug" not in line, line  # the catch-all for internal errors never fires
        return e


def refused(path: Path, data: object) -> ManifestError:
    result = outcome(path, dump(data))
    assert isinstance(result, ManifestError), "a broken manifest was accepted"
    return result


def test_base_manifest_is_valid(path: Path) -> None:
    result = outcome(path, dump(BASE))
    assert isinstance(result, Manifest) and len(result.experiments) == 7


# --------------------------------------------------------------------------- known-bad changes


def _parts(data: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The phases and experiments of a copy of BASE, taken before any change replaces them."""
    phases = list(data["phases"])
    return phases, [phases[p]["experiments"][e] for p, e in EXPERIMENTS]


@st.composite
def broken(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """BASE with one to three changes, each of which alone makes it invalid."""
    data = copy.deepcopy(BASE)
    phases, exps = _parts(data)
    kinds = draw(st.lists(st.sampled_from(
        ["field", "top", "unknown", "cycle", "self", "duplicate", "phase", "huge", "capacity"]), min_size=1, max_size=3))
    for kind in kinds:
        exp = draw(st.sampled_from(exps))
        if kind == "field":
            key = draw(st.sampled_from(sorted(BAD)))
            exp[key] = draw(st.sampled_from(BAD[key]))
        elif kind == "top":
            key = draw(st.sampled_from(sorted(TOP_BAD)))
            data[key] = draw(st.sampled_from(TOP_BAD[key]))
        elif kind == "unknown":
            level = draw(st.sampled_from(["top", "phase", "experiment"]))
            unknown = draw(st.one_of(st.text(min_size=1, max_size=12), st.integers(), st.booleans()).filter(
                lambda k: k not in VALID_KEYS[level]))
            target: dict[Any, Any] = {"top": data, "phase": phases[0], "experiment": exp}[level]
            target[unknown] = draw(values)
        elif kind == "cycle":
            exps[1]["depends_on"], exps[0]["depends_on"] = "t-a-s1", ["solo"]
        elif kind == "self":
            exp["depends_on"] = exp["name"]  # a template: each expansion names itself
        elif kind == "duplicate":
            phases[1]["experiments"].append({"name": draw(st.sampled_from(["solo", "t-b-s2", "e-s1"])), "cmd": "x"})
        elif kind == "phase":
            phases[1]["name"] = "train"
        elif kind == "huge":
            # At least 47^3 = 103,823 expansions: refused from the counts, never expanded.
            sizes = draw(st.lists(st.integers(47, 60), min_size=3, max_size=4))
            exp["grid"] = {f"k{i}": list(range(n)) for i, n in enumerate(sizes)}
        elif kind == "capacity":
            exp["gpus"], exp["mem"] = draw(st.integers(1, 8)), draw(st.sampled_from(["81GB", "80GiB", "1TB", 10**12]))
    return data, ",".join(kinds)


@settings(FUZZ, max_examples=120)
@given(case=broken())
def test_broken_manifests_are_refused_naming_the_file(path: Path, case: tuple[dict[str, Any], str]) -> None:
    data, _kinds = case
    refused(path, data)


@settings(FUZZ, max_examples=20)
@given(top=st.one_of(scalars, st.lists(values, max_size=3)))
def test_top_level_that_is_not_a_mapping(path: Path, top: object) -> None:
    error = refused(path, top)
    assert error.problems[0].startswith(f"{path}: manifest: top level: expected a mapping")


# --------------------------------------------------------------------------- anything at all


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_random_values_in_any_field(path: Path, data: st.DataObject) -> None:
    doc = copy.deepcopy(BASE)
    phases, exps = _parts(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        level = data.draw(st.sampled_from(["top", "phase", "experiment"]))
        target = data.draw(st.sampled_from({"top": [doc], "phase": phases, "experiment": exps}[level]))
        key = data.draw(st.one_of(st.sampled_from(sorted(VALID_KEYS[level])), st.text(max_size=8)))
        target[key] = data.draw(values)
    outcome(path, dump(doc), gpu_capacity_bytes=data.draw(st.none() | st.integers(0, 10**12)))


@settings(FUZZ, max_examples=40)
@given(doc=values)
def test_random_yaml_documents(path: Path, doc: object) -> None:
    outcome(path, dump(doc))


YAML_BITS = list(":-[]{}#&*!|>'\"%@`,?~ \n\t") + ["\n  ", "name: ", "phases:", "- ", "{seed}", "<<: ", "!!int ", "\\u"]


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_random_text_and_damaged_yaml(path: Path, data: st.DataObject) -> None:
    text = dump(BASE)
    if data.draw(st.booleans()):
        text = data.draw(st.text(max_size=200) | st.lists(st.sampled_from(YAML_BITS), max_size=40).map("".join))
    else:  # a valid file with a few bytes of YAML syntax put in or cut out somewhere
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(text)))
            cut = data.draw(st.integers(0, 3))
            text = text[:at] + data.draw(st.sampled_from(YAML_BITS + [""])) + text[at + cut :]
    outcome(path, text)


# --------------------------------------------------------------------------- libyaml


def _read(text: str, loader: type) -> object:
    try:
        return ("read", repr(yaml.load(text, Loader=loader)))  # noqa: S506 - SafeLoader subclasses
    except Exception:
        return "refused"


@pytest.mark.skipif(manifest_yaml.FastLoader is None, reason="PyYAML built without libyaml")
@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_libyaml_reads_what_it_accepts_as_the_python_loader_does(data: st.DataObject) -> None:
    """The fast path may refuse more (the Python loader then words the error), never read
    differently: whether libyaml is installed changes no manifest's meaning."""
    if data.draw(st.booleans()):
        text = data.draw(st.lists(st.sampled_from(YAML_BITS + ["'", "'a b'", '"\\t"', "0x1F", "1_000", "- -"]),
                                  max_size=40).map("".join))  # fmt: skip
    else:
        text = dump(data.draw(values)) if data.draw(st.booleans()) else dump(BASE)
        for _ in range(data.draw(st.integers(0, 4))):
            at = data.draw(st.integers(0, len(text)))
            text = text[:at] + data.draw(st.sampled_from(YAML_BITS + [""])) + text[at + data.draw(st.integers(0, 3)) :]
    fast = _read(text, manifest_yaml.FastLoader)
    if manifest_yaml.LIBYAML_DIFFERS.search(text) or fast == "refused":
        return  # the Python loader alone reads it
    assert fast == _read(text, manifest_yaml.Loader), text


def test_the_fast_path_is_taken_for_an_ordinary_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[type] = []
    real_load = yaml.load

    def spy(text: str, Loader: type) -> object:  # noqa: N803 - yaml.load's own keyword
        calls.append(Loader)
        return real_load(text, Loader=Loader)  # noqa: S506

    monkeypatch.setattr(yaml, "load", spy)
    problems = manifest_fields.Problems("exp.yaml")
    assert manifest_yaml.read_yaml(dump(BASE), problems) == BASE and not problems.lines
    expected = [manifest_yaml.FastLoader] if manifest_yaml.FastLoader is not None else [manifest_yaml.Loader]
    assert calls == expected
