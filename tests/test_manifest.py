"""Manifest rules, one table per concern; every error names file, experiment and field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpupack.manifest import (
    MAX_EXPERIMENTS,
    ManifestError,
    load,
    load_text,
    parse_duration,
    parse_size,
)

DESIGN_EXAMPLE = """\
name: telepathy-24h
runs_dir: runs
workdir: .
env: {PYTHONPATH: ., HF_HOME: "{run}/hf"}
defaults: {gpus: 1, mem: 20GB, time: 30m, cpus: 4, retries: 0}
phases:
  - name: probes
    experiments:
      - name: "probe-s{seed}"
        cmd: "python probe.py --seed {seed} --out {out}"
        grid: {seed: [42, 123, 456]}
  - name: seeds
    barrier: true
    experiments:
      - name: "bridge-{task}-s{seed}"
        cmd: "python experiments/bridge.py --task {task} --seed {seed} --out {out}"
        grid: {seed: [42, 123, 456], task: [sst2, agnews, trec]}
        mem: 60GB
        time: 2h
        retries: 1
        depends_on: ["probe-s{seed}"]
        outputs: ["{out}/results.json", "tables/{name}.csv"]
        env: {TOKENIZERS_PARALLELISM: false, SEED: "{seed:05d}"}
        util: 0.5
      - name: summary
        cmd: "python summarize.py {run} && awk '{{print $1}}' x"
        gpus: 0
        mem: null
        depends_on: "bridge-*"
"""


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def manifest(*experiments: dict[str, Any], **top: Any) -> str:
    """YAML of a one-phase manifest holding `experiments`; `top` overrides top-level keys."""
    data: dict[str, Any] = {"name": "run", "phases": [{"name": "p", "experiments": list(experiments)}]}
    data.update(top)
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False)


def exp(name: str = "e", cmd: str = "true", **fields: Any) -> dict[str, Any]:
    return {"name": name, "cmd": cmd, **fields}


def problems(tmp_path: Path, text: str, **kwargs: Any) -> list[str]:
    """The problem lines of a manifest that must be refused, with the '<file>: ' prefix checked and cut."""
    path = write(tmp_path, text)
    with pytest.raises(ManifestError) as caught:
        load(path, **kwargs)
    lines = str(caught.value).splitlines()
    assert lines == caught.value.problems and lines
    for line in lines:
        assert line.startswith(f"{path}: "), line
    return [line[len(f"{path}: ") :] for line in lines]


def only_problem(tmp_path: Path, text: str, **kwargs: Any) -> str:
    found = problems(tmp_path, text, **kwargs)
    assert len(found) == 1, found
    return found[0]


# --------------------------------------------------------------------------- a valid manifest


def test_design_example_expands_in_order_with_everything_substituted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, DESIGN_EXAMPLE)
    monkeypatch.chdir("/")  # relative paths follow the manifest file, not the cwd
    m = load(path)
    run = tmp_path / "runs" / "telepathy-24h"
    assert (m.path, m.name, m.run_dir, m.workdir) == (path, "telepathy-24h", run, tmp_path)
    assert [(p.name, p.index, p.barrier) for p in m.phases] == [("probes", 0, False), ("seeds", 1, True)]
    names = [e.name for e in m.experiments]
    # Keys in the order written, the last one varying fastest: seed outer, task inner.
    assert names[3:7] == ["bridge-sst2-s42", "bridge-agnews-s42", "bridge-trec-s42", "bridge-sst2-s123"]
    assert names[:3] == ["probe-s42", "probe-s123", "probe-s456"] and names[-1] == "summary"
    assert [e.order for e in m.experiments] == list(range(13))
    assert m.text == DESIGN_EXAMPLE

    b = m.experiments[4]
    assert b.cmd == f"python experiments/bridge.py --task agnews --seed 42 --out {run}/exp/bridge-agnews-s42"
    assert (b.template, b.phase, b.phase_index, b.barrier) == ("bridge-{task}-s{seed}", "seeds", 1, True)
    assert b.out_dir == run / "exp" / "bridge-agnews-s42"
    assert (b.gpus, b.mem_bytes, b.time_s, b.cpus, b.retries, b.util) == (1, 60 * 10**9, 7200.0, 4, 1, 0.5)
    assert (b.exclusive, b.resumable) == (False, False)
    assert b.depends_on == ("probe-s42",)
    assert b.outputs == (f"{run}/exp/bridge-agnews-s42/results.json", "tables/bridge-agnews-s42.csv")
    assert b.params == {"seed": 42, "task": "agnews"}
    # Manifest env, then the experiment's; scalars as YAML spells them; sorted.
    assert dict(b.env) == {"HF_HOME": f"{run}/hf", "PYTHONPATH": ".", "SEED": "00042", "TOKENIZERS_PARALLELISM": "false"}
    assert list(b.env) == sorted(b.env)

    s = m.experiments[-1]
    assert s.cmd == f"python summarize.py {run} && awk '{{print $1}}' x"  # {{ }} are literal braces
    assert (s.gpus, s.mem_bytes, s.time_s) == (0, None, 1800.0)  # mem: null overrides the default
    assert s.depends_on == tuple(names[3:12])


def test_builtin_defaults(tmp_path: Path) -> None:
    (e,) = load(write(tmp_path, manifest(exp()))).experiments
    assert (e.gpus, e.cpus, e.retries, e.exclusive, e.resumable, e.util) == (1, 1, 0, False, False, 1.0)
    assert (e.time_s, e.mem_bytes, e.depends_on, e.outputs, dict(e.env), e.params) == (None, None, (), (), {}, {})
    assert e.workdir == tmp_path and e.out_dir == tmp_path / "runs" / "run" / "exp" / "e"


def test_env_merge_order_defaults_then_experiment(tmp_path: Path) -> None:
    text = manifest(exp(env={"B": "exp", "N": 7}), env={"A": "top", "B": "top", "C": "top"},
                    defaults={"env": {"B": "defaults", "C": "defaults"}, "outputs": ["{out}/r.json"]})
    (e,) = load(write(tmp_path, text)).experiments
    assert dict(e.env) == {"A": "top", "B": "exp", "C": "defaults", "N": "7"}
    assert e.outputs == (f"{e.out_dir}/r.json",)


def test_builtin_placeholders_and_format_spec(tmp_path: Path) -> None:
    text = manifest(exp(name="{phase}-g{gpus}-{lr}", cmd="{name} {phase} {gpus} {run} {out} {i:03d} {{x}}",
                        gpus=2, grid={"lr": ["1e-4"], "i": [7]}))
    (e,) = load(write(tmp_path, text)).experiments
    run = tmp_path / "runs" / "run"
    assert e.name == "p-g2-1e-4"
    assert e.cmd == f"p-g2-1e-4 p 2 {run} {run}/exp/p-g2-1e-4 007 {{x}}"


def test_relative_runs_dir_and_workdir_follow_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    path = write(tmp_path, manifest(exp(), runs_dir="../elsewhere", workdir="code"))
    m = load(path)
    assert m.run_dir == tmp_path.parent / "elsewhere" / "run"
    assert m.workdir == tmp_path / "code" == m.experiments[0].workdir


def test_fingerprint_follows_cmd_env_and_workdir_only(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()

    def fp(**changes: Any) -> str:
        top = changes.pop("top", {})
        (e,) = load_text(manifest(exp(**changes), **top), tmp_path / "exp.yaml").experiments
        return e.fingerprint

    base = fp(cmd="train", env={"A": "1"})
    assert len(base) == 64 and base == fp(cmd="train", env={"A": "1"}, mem="30GB", retries=3)
    changed = [fp(cmd="train --x", env={"A": "1"}), fp(cmd="train", env={"A": "2"}),
               fp(cmd="train", env={"A": "1"}, top={"workdir": "w"})]
    assert len({base, *changed}) == 4


def test_unicode_names_and_glob_like_exact_names(tmp_path: Path) -> None:
    text = manifest(exp("résumé-ñ-{s}", grid={"s": ["é", "日本"]}), exp("a[1]"), exp("z", depends_on=["a[1]", "résumé-*"]))
    m = load(write(tmp_path, text))
    assert [e.name for e in m.experiments] == ["résumé-ñ-é", "résumé-ñ-日本", "a[1]", "z"]
    assert m.experiments[-1].depends_on == ("a[1]", "résumé-ñ-é", "résumé-ñ-日本")


def test_glob_excludes_itself_and_duplicates_collapse(tmp_path: Path) -> None:
    text = manifest(exp("t-{s}", grid={"s": [2, 1]}), exp("t-x", depends_on=["t-*", "t-1"]), exp("y", depends_on="*-1"))
    m = load(write(tmp_path, text))
    assert m.experiments[-2].depends_on == ("t-2", "t-1")  # manifest order, not sorted
    assert m.experiments[-1].depends_on == ("t-1",)


def test_yaml_sexagesimal_time_is_seconds(tmp_path: Path) -> None:
    # Unquoted 1:30:00 is YAML 1.1's base-60 integer 5400: the seconds Slurm would read.
    text = "name: r\nphases: [{name: p, experiments: [{name: e, cmd: x, time: 1:30:00}]}]\n"
    assert load(write(tmp_path, text)).experiments[0].time_s == 5400


def test_yaml_merge_keys_are_not_duplicate_keys(tmp_path: Path) -> None:
    text = (
        "name: r\nphases:\n  - name: p\n    experiments:\n"
        "      - &b {name: a, cmd: 'true', mem: 1GB}\n"
        "      - {<<: *b, name: b}\n"
    )
    m = load(write(tmp_path, text))
    assert [(e.name, e.mem_bytes) for e in m.experiments] == [("a", 10**9), ("b", 10**9)]


def test_capacity_check_ignores_cpu_only_experiments(tmp_path: Path) -> None:
    (e,) = load(write(tmp_path, manifest(exp(gpus=0, mem="90GB"))), gpu_capacity_bytes=80 * 10**9).experiments
    assert e.mem_bytes == 90 * 10**9


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * 10**9), ("512MiB", 512 * 2**20), ("80 GB", 80 * 10**9), (1024, 1024), ("1.5GiB", 3 * 2**29),
     ("1KB", 1000), ("1KiB", 1024), ("2TB", 2 * 10**12), ("1TiB", 2**40), ("10B", 10), ("20gb", 20 * 10**9),
     ("4096", 4096), (" 1 MB ", 10**6), (2.0e10, 2 * 10**10), ("0.5KB", 500)],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [("60 GX", "bad size '60 GX' (use MB, MiB, GB or GiB)"), ("20G", "bad size '20G'"), ("-5GB", "negative size '-5GB'"),
     ("", "bad size ''"), ("GB", "bad size 'GB'"), (True, "expected a size like 20GB, got True"),
     (-1, "must not be negative, got -1"), (1.5, "bad size 1.5"), (float("nan"), "got nan"),
     ("99999999999TB", "too large")],
)
def test_parse_size_refuses_with_reason(text: Any, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_size(text)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("1h 30m 10s", 5410), ("1.5h", 5400),
     (90, 90), (1.5, 1.5), ("90", 90), ("02:00:00", 7200), ("1-00:00:00", 86400), ("01:30", 90), ("2H", 7200)],
)
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [("2 hours", "bad duration '2 hours' (use 90s, 15m, 2h, 1d, 1h30m"), ("30m1h", "bad duration"),
     ("1h1h", "bad duration"), ("", "bad duration"), ("h", "bad duration"), (-1, "must not be negative"),
     (True, "expected a duration like 2h, got True"), (float("inf"), "got inf"), (10**400, "too long")],
)
def test_parse_duration_refuses_with_reason(text: Any, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_duration(text)
    assert reason in str(caught.value)


# --------------------------------------------------------------------------- field rules


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"mem": "60 GX"}, "e: mem: bad size '60 GX' (use MB, MiB, GB or GiB)"),
        ({"mem": "-5GB"}, "e: mem: negative size '-5GB' (use MB, MiB, GB or GiB)"),
        ({"mem": -5}, "e: mem: must not be negative, got -5"),
        ({"mem": 20}, "e: mem: 20 means 20 bytes; write a unit, e.g. 20GB or 20GiB"),
        ({"mem": "0GB"}, "e: mem: must be more than 0 (leave it out when unknown)"),
        ({"mem": [1]}, "e: mem: expected a size like 20GB, got a list"),
        ({"time": "2 hours"}, "e: time: bad duration '2 hours' (use 90s, 15m, 2h, 1d, 1h30m, seconds or [D-]HH:MM:SS)"),
        ({"time": -5}, "e: time: must not be negative, got -5"),
        ({"time": 0}, "e: time: must be more than 0 (leave it out when unknown)"),
        ({"gpus": True}, "e: gpus: expected an integer >= 0, got True"),
        ({"gpus": -1}, "e: gpus: must be >= 0, got -1"),
        ({"gpus": 1.5}, "e: gpus: expected an integer >= 0, got 1.5"),
        ({"cpus": 0}, "e: cpus: must be >= 1, got 0"),
        ({"retries": "2"}, "e: retries: expected an integer >= 0, got '2'"),
        ({"exclusive": "yes"}, "e: exclusive: expected true or false, got 'yes'"),
        ({"resumable": 1}, "e: resumable: expected true or false, got 1"),
        ({"util": 0}, "e: util: expected a number in (0, 1], got 0"),
        ({"util": 1.5}, "e: util: expected a number in (0, 1], got 1.5"),
        ({"util": True}, "e: util: expected a number in (0, 1], got True"),
        ({"outputs": [1]}, "e: outputs: expected a string or a list of non-empty strings, got a list"),
        ({"depends_on": {"a": 1}}, "e: depends_on: expected a string or a list of non-empty strings, got a mapping"),
        ({"env": ["A=1"]}, "e: env: expected a mapping NAME: value, got a list"),
        ({"env": {"A": None}}, "e: env.A: expected a string or number, got None"),
        ({"env": {"A": [1]}}, "e: env.A: expected a string or number, got a list"),
        ({"env": {"A=B": "1"}}, "e: env: bad variable name 'A=B'"),
        ({"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "e: env.CUDA_VISIBLE_DEVICES: set by gpupack for each attempt; leave it out"),
        ({"env": {"GPUPACK_OUT": "x"}}, "e: env.GPUPACK_OUT: set by gpupack for each attempt; leave it out"),
        ({"env": {"A": "x\x00y"}}, "e: env.A: value contains a NUL character"),
        ({"grid": {"seed": 42}}, "e: grid.seed: expected a non-empty list of values, got 42 (write [42])"),
        ({"grid": {"seed": []}}, "e: grid.seed: expected a non-empty list of values, got an empty list"),
        ({"grid": {"seed": [[1]]}}, "e: grid.seed: values must be strings or numbers, got a list (quote it)"),
        ({"grid": {"seed": [None]}}, "e: grid.seed: values must be strings or numbers, got None (quote it)"),
        ({"grid": {"name": [1]}}, "e: grid.name: {name} is a built-in placeholder; rename the key"),
        ({"grid": {"a.b": [1]}}, "e: grid: key 'a.b' is not a placeholder name (letters, digits, _ and -)"),
        ({"grid": [1]}, "e: grid: expected a mapping key: [values], got a list"),
        ({"memory": "1GB"}, "e: memory: unknown key (did you mean 'mem'?)"),
        ({"depend_on": "x"}, "e: depend_on: unknown key (did you mean 'depends_on'?)"),
        ({"cmd": 5}, "e: cmd: expected a non-empty string, got 5"),
        ({"cmd": "  "}, "e: cmd: expected a non-empty string, got '  '"),
    ],
)
def test_experiment_field_errors(tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    assert only_problem(tmp_path, manifest(exp(**fields))) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"cmd": "run {taks}", "grid": {"task": ["a"]}}, "cmd: unknown placeholder '{taks}' (did you mean 'task'?)"),
        ({"cmd": "run {zzz}"}, "cmd: unknown placeholder '{zzz}' (valid: name, phase, out, run, gpus, nodes)"),
        ({"cmd": "echo ${HOME}"}, "cmd: unknown placeholder '{HOME}' (write $VAR, or ${{VAR}} for a shell variable)"),
        ({"cmd": "{out.parent}"}, "cmd: bad placeholder '{out.parent}': only {key} or {key:spec}; write {{ and }} for literal braces"),
        ({"cmd": "{run[0]}"}, "cmd: bad placeholder '{run[0]}'"),
        ({"cmd": "{name!r}"}, "cmd: bad placeholder '{name!r}'"),
        ({"cmd": "{}"}, "cmd: bad placeholder '{}'"),
        ({"cmd": "{name:>100000}"}, "cmd: bad placeholder '{name:>100000}'"),
        ({"cmd": "awk '{print $1}'"}, "cmd: bad placeholder '{print $1}'"),
        ({"cmd": "echo }"}, "cmd: bad braces in 'echo }': Single '}' encountered in format string (write {{ and }} for literal braces)"),
        ({"cmd": "echo {"}, "cmd: bad braces in 'echo {'"),
        ({"outputs": ["{nope}/r.json"]}, "outputs: unknown placeholder '{nope}'"),
        ({"depends_on": "x-{nope}"}, "depends_on: unknown placeholder '{nope}'"),
        ({"env": {"A": "{nope}"}}, "env.A: unknown placeholder '{nope}'"),
    ],
)
def test_placeholder_errors_name_the_field(tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    found = only_problem(tmp_path, manifest(exp(**fields)))
    assert found.startswith(f"e: {expected}"), found


@pytest.mark.parametrize(
    ("name", "grid", "expected"),
    [
        ("x-{out}", {}, "x-{out}: name: placeholder {out} can't be used in the name (it is made from the name)"),
        ("x-{name}", {}, "x-{name}: name: placeholder {name} can't be used in the name"),
        ("x-{seed}", {}, "x-{seed}: name: unknown placeholder '{seed}'"),
        ("a/b", {}, "a/b: name: 'a/b' contains '/' (a name is a directory name)"),
        ("m-{model}", {"model": ["org/bert"]}, "m-{model}: name: 'm-org/bert' contains '/'"),
        (".", {}, ".: name: '.' can't be a directory name"),
        ("{d}", {"d": [".."]}, "{d}: name: '..' can't be a directory name"),
        ("a\x00b", {}, "phase p experiment #1: name: expected a non-empty string, got 'a\\x00b'"),
        ("", {}, "phase p experiment #1: name: expected a non-empty string, got ''"),
        ("é" * 150, {}, "is longer than 200 characters or 255 UTF-8 bytes"),
    ],
)
def test_names_must_be_directory_names(tmp_path: Path, name: str, grid: dict[str, Any], expected: str) -> None:
    found = only_problem(tmp_path, manifest(exp(name, grid=grid)))
    assert expected in found, found


def test_control_characters_in_names_are_refused_and_escaped(tmp_path: Path) -> None:
    found = only_problem(tmp_path, manifest(exp("a\nb")))
    assert found == "'a\\nb': name: 'a\\nb' contains a control character"
    found = only_problem(tmp_path, manifest(exp("x" * 201)))
    assert found.startswith("x" * 201 + ": name: 'xxx") and found.endswith("is longer than 200 characters or 255 UTF-8 bytes")


def test_missing_name_is_named_by_position(tmp_path: Path) -> None:
    text = manifest(exp(), {"cmd": "true", "mem": "1 XB"})
    assert problems(tmp_path, text) == [
        "phase p experiment #2: name: missing (required)",
        "phase p experiment #2: mem: bad size '1 XB' (use MB, MiB, GB or GiB)",
    ]


# --------------------------------------------------------------------------- manifest and phase rules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "manifest: top level: expected a mapping (name:, phases:, ...), got a list"),
        ("", "manifest: top level: expected a mapping (name:, phases:, ...), got an empty file"),
        ("42\n", "manifest: top level: expected a mapping (name:, phases:, ...), got 42"),
        ("name: r\nphases: [\n", "manifest: line 3, column 1: expected the node content, but found '<stream end>'"),
        ("name: r\n  bad: indent\n", "manifest: line 2, column 6: mapping values are not allowed here"),
        ("name: r\nname: s\nphases: []\n", "manifest: line 2, column 1: duplicate key 'name'"),
        ("name: r\nphases: [{name: p, experiments: [{name: e, cmd: x, mem: 1GB, mem: 2GB}]}]\n",
         "manifest: line 2, column 62: duplicate key 'mem'"),
        ("a: b\n--- \nc: d\n", "manifest: line 2, column 1: but found another document"),
        ("x: \x07\n", "manifest: yaml: unacceptable character #x0007: special characters are not allowed"),
    ],
)
def test_yaml_level_errors(tmp_path: Path, text: str, expected: str) -> None:
    found = only_problem(tmp_path, text)
    assert found.startswith(expected), found


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ({"phase": []}, ["manifest: phase: unknown key (did you mean 'phases'?)"]),
        ({"zzz": 1}, ["manifest: zzz: unknown key (valid: name, runs_dir, workdir, env, defaults, phases)"]),
        ({"name": None}, ["manifest: name: expected a string (the run directory's name), got None"]),
        ({"name": "a/b"}, ["manifest: name: 'a/b' contains '/' (a name is a directory name)"]),
        ({"name": ".."}, ["manifest: name: '..' can't be a directory name"]),
        ({"runs_dir": 5}, ["manifest: runs_dir: expected a non-empty string, got 5"]),
        ({"workdir": "missing"}, ["manifest: workdir: no such directory: {tmp}/missing"]),
        ({"env": "A=1"}, ["manifest: env: expected a mapping NAME: value, got 'A=1'"]),
        ({"env": {"A": "{seed}"}}, ["manifest: env.A: unknown placeholder '{seed}' (valid: name, phase, out, run, gpus, nodes)"]),
        ({"defaults": [1]}, ["manifest: defaults: expected a mapping of experiment fields, got a list"]),
        ({"defaults": {"cmd": "x"}}, ["manifest: defaults.cmd: can't have a default: set it in each experiment"]),
        ({"defaults": {"memory": "1GB"}}, ["manifest: defaults.memory: unknown key (did you mean 'mem'?)"]),
        ({"defaults": {"mem": "1 XB", "gpus": -1}},
         ["manifest: defaults.gpus: must be >= 0, got -1", "manifest: defaults.mem: bad size '1 XB' (use MB, MiB, GB or GiB)"]),
        ({"defaults": {"outputs": "{x}"}}, ["manifest: defaults.outputs: unknown placeholder '{x}'"]),
        ({"phases": []}, ["manifest: phases: expected a non-empty list of phases, got an empty list"]),
        ({"phases": None}, ["manifest: phases: expected a non-empty list of phases, got None"]),
        ({"phases": ["p"]}, ["phase #1: phases: expected a mapping (name:, experiments:), got 'p'"]),
        ({"phases": [{"experiments": [exp()]}]}, ["phase #1: name: missing (required)"]),
        ({"phases": [{"name": "p"}]}, ["phase p: experiments: missing (required)"]),
        ({"phases": [{"name": "p", "experiments": [exp("a")]}, {"name": "p", "experiments": [exp("b")]}]},
         ["phase p: name: duplicate phase name"]),
        ({"phases": [{"name": "p", "barrier": "no", "experiments": [exp()]}]},
         ["phase p: barrier: expected true or false, got 'no'"]),
        ({"phases": [{"name": "p", "barier": True, "experiments": [exp()]}]},
         ["phase p: barier: unknown key (did you mean 'barrier'?)"]),
        ({"phases": [{"name": "p", "experiments": []}]},
         ["phase p: experiments: expected a non-empty list of experiments, got an empty list"]),
        ({"phases": [{"name": "p", "experiments": ["e"]}]},
         ["phase p experiment #1: experiment: expected a mapping (name:, cmd:, ...), got 'e'"]),
    ],
)
def test_manifest_and_phase_errors(tmp_path: Path, top: dict[str, Any], expected: list[str]) -> None:
    found = problems(tmp_path, manifest(exp(), **top))
    expected = [e.replace("{tmp}", str(tmp_path)) for e in expected]
    assert len(found) == len(expected) and all(f.startswith(e) for f, e in zip(found, expected)), found


def test_missing_name_and_phases(tmp_path: Path) -> None:
    assert problems(tmp_path, "runs_dir: r\n") == ["manifest: name: missing (required)", "manifest: phases: missing (required)"]
    assert problems(tmp_path, manifest({"name": "e"})) == ["e: cmd: missing (required)"]


# --------------------------------------------------------------------------- expansion rules


@pytest.mark.parametrize(
    ("experiments", "expected"),
    [
        ([exp("e-{a}", grid={"a": [1, 2], "b": [1, 2]})],
         ["e-{a}: name: duplicate experiment name 'e-1' after expansion (also from e-{a}, phase p); "
          "put every grid key that varies into the name",
          "e-{a}: name: duplicate experiment name 'e-2' after expansion"]),
        ([exp("e"), exp("e")], ["e: name: duplicate experiment name 'e' after expansion"]),
        ([exp("a", depends_on="trian")], ["a: depends_on: 'trian' matches no experiment"]),
        ([exp("train"), exp("a", depends_on="trian")], ["a: depends_on: 'trian' matches no experiment (did you mean 'train'?)"]),
        ([exp("a", depends_on="probe-*")], ["a: depends_on: 'probe-*' matches no other experiment"]),
        ([exp("a-{s}", grid={"s": [1]}, depends_on="a-*")], ["a-1: depends_on: 'a-*' matches no other experiment"]),
        ([exp("a", depends_on="a")], ["a: depends_on: depends on itself"]),
        ([exp("t-{s}", grid={"s": [1, 2]}, depends_on="t-{s}")],
         ["t-1: depends_on: depends on itself", "t-2: depends_on: depends on itself"]),
        ([exp("a", depends_on="b"), exp("b", depends_on="a")], ["a: depends_on: dependency cycle: a -> b -> a"]),
        ([exp("a", depends_on="c"), exp("b", depends_on="a"), exp("c", depends_on=["b"])],
         ["a: depends_on: dependency cycle: a -> c -> b -> a"]),
        ([exp("e-{s}", grid={"s": ["x"]}, cmd="{s:d}")], ["e-{s}: cmd: can't format: Unknown format code 'd'"]),
    ],
)
def test_expansion_errors(tmp_path: Path, experiments: list[dict[str, Any]], expected: list[str]) -> None:
    found = problems(tmp_path, manifest(*experiments))
    assert len(found) == len(expected) and all(f.startswith(e) for f, e in zip(found, expected)), found


def test_long_dependency_cycle_is_found_without_recursion(tmp_path: Path) -> None:
    n = 1500  # deeper than Python's recursion limit
    chain = [exp(f"c{i}", depends_on=f"c{(i + 1) % n}") for i in range(n)]
    assert only_problem(tmp_path, manifest(*chain)) == (
        "c0: depends_on: dependency cycle: c0 -> c1 -> c2 -> c3 -> c4 -> ... (1491 more) -> c1496 -> c1497 -> c1498 -> c1499 -> c0"
    )


def test_duplicate_across_phases_names_both_origins(tmp_path: Path) -> None:
    text = manifest(phases=[{"name": "p", "experiments": [exp("x-{s}", grid={"s": [1]})]},
                            {"name": "q", "experiments": [exp("x-1")]}])
    assert only_problem(tmp_path, text).startswith("x-1: name: duplicate experiment name 'x-1' after expansion (also from x-{s}, phase p)")


def test_dependency_on_a_later_phase_behind_a_barrier_is_a_deadlock(tmp_path: Path) -> None:
    phases: list[dict[str, Any]] = [{"name": "a", "experiments": [exp("first", depends_on="late")]},
              {"name": "b", "barrier": True, "experiments": [exp("late")]}]
    assert only_problem(tmp_path, manifest(phases=phases)) == (
        "first: depends_on: 'late' is in phase b, which waits at a barrier for phase a to end: deadlock")
    phases[1]["barrier"] = False  # without the barrier it is only an odd order, and allowed
    assert load(write(tmp_path, manifest(phases=phases))).experiments[0].depends_on == ("late",)


def test_gpu_capacity(tmp_path: Path) -> None:
    text = manifest(exp("big-{s}", grid={"s": [1, 2]}, mem="90GB"), exp("ok", mem="80GB"))
    assert problems(tmp_path, text, gpu_capacity_bytes=80 * 10**9) == [
        "big-{s}: mem: 90.0 GB is more than a GPU holds (80.0 GB): can't fit on any GPU"
    ]
    assert len(load(write(tmp_path, text)).experiments) == 3  # no capacity given: no check


def test_default_mem_above_capacity_is_refused_per_experiment(tmp_path: Path) -> None:
    text = manifest(exp("a"), exp("b", gpus=0), defaults={"mem": "100GiB"})
    assert problems(tmp_path, text, gpu_capacity_bytes=80 * 10**9) == [
        "a: mem: 107.4 GB is more than a GPU holds (80.0 GB): can't fit on any GPU"
    ]


def test_grid_of_101000_is_refused_with_its_count(tmp_path: Path) -> None:
    big = exp("g-{a}-{b}", grid={"a": list(range(101)), "b": list(range(1000))})
    assert only_problem(tmp_path, manifest(big)) == (
        "manifest: grid: expands to 101,000 experiments, more than the limit of 100,000 (largest: g-{a}-{b} x 101,000)")


def test_grid_is_counted_before_it_is_expanded(tmp_path: Path) -> None:
    # 10^20 expansions: this test would never end if the count came after expanding.
    huge = exp("h", grid={f"k{i}": list(range(10)) for i in range(20)})
    found = only_problem(tmp_path, manifest(exp("small"), huge))
    assert "expands to 100,000,000,000,000,000,001 experiments" in found


def test_limit_is_total_over_all_experiments(tmp_path: Path) -> None:
    half = {"a": list(range(100)), "b": list(range(500))}
    text = manifest(exp("x-{a}-{b}", grid=half), exp("y-{a}-{b}", grid=half), exp("z"))
    assert f"expands to {MAX_EXPERIMENTS + 1:,} experiments" in only_problem(tmp_path, text)


def test_all_problems_are_collected(tmp_path: Path) -> None:
    text = manifest(exp("a", mem="1 XB", gpus=-1), exp("b", time="soon", depends_on="zz"), zzz=1)
    found = problems(tmp_path, text)
    assert [f.split(": ")[:2] for f in found] == [
        ["manifest", "zzz"], ["a", "gpus"], ["a", "mem"], ["b", "time"], ["b", "depends_on"]]


def test_problem_list_is_capped(tmp_path: Path) -> None:
    text = manifest(*(exp(f"e{i}", gpus=-1) for i in range(150)))
    found = problems(tmp_path, text)
    assert len(found) == 101 and found[-1] == "manifest: problems: 50 more not shown"


# --------------------------------------------------------------------------- file level


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ManifestError) as caught:
        load(missing)
    assert str(caught.value) == f"{missing}: manifest: file: can't read: No such file or directory"
    with pytest.raises(ManifestError, match="can't read: Is a directory"):
        load(tmp_path)


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"name: r\xff\n")
    with pytest.raises(ManifestError) as caught:
        load(path)
    assert str(caught.value) == f"{path}: manifest: file: not UTF-8 text (bad byte at offset 7)"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + manifest(exp()).encode())
    assert load(path).name == "run"


def test_error_lines_are_single_lines(tmp_path: Path) -> None:
    found = problems(tmp_path, manifest(exp("a\r\nb", cmd="x\n{nope}")))
    assert all("\n" not in f and "\r" not in f for f in found)
    assert json.dumps(found)  # printable, serializable


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "?"), (-3, "0s"), (59.4, "59s"), (59.6, "1m00s"), (90, "1m30s"), (3599, "59m59s"),
     (7260, "2h01m"), (86399, "23h59m"), (86400, "1d00h"), (93600, "1d02h"), (30 * 86400 + 3600, "30d01h")],
)  # fmt: skip
def test_durations_are_shown_in_two_units(seconds: float | None, shown: str) -> None:
    from gpupack.units import format_duration

    assert format_duration(seconds) == shown


# --------------------------------------------------------------------------- nodes: K


def test_whole_nodes_take_the_nodes_gpus_unless_the_experiment_says(tmp_path: Path) -> None:
    # `defaults: {gpus: 1}` is for one-node experiments: a nodes: 2 one without gpus takes the
    # node's 4; one that writes gpus keeps it (policy refuses it unless it is a node's count).
    text = manifest(
        exp("ddp-{nodes}x{gpus}", "torchrun --nnodes {nodes} --nproc-per-node {gpus}", nodes=2),
        exp("pair", nodes=2, gpus=2), exp("one"), defaults={"gpus": 1},
    )
    m = load(write(tmp_path, text), node_gpus=4)
    assert [(e.name, e.nodes, e.gpus) for e in m.experiments] == [("ddp-2x4", 2, 4), ("pair", 2, 2), ("one", 1, 1)]
    assert m.experiments[0].cmd == "torchrun --nnodes 2 --nproc-per-node 4"


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"nodes": 0}, "e: nodes: must be >= 1, got 0"),
        ({"nodes": "two"}, "e: nodes: expected an integer >= 1, got 'two'"),
        ({"nodes": 2, "gpus": 0}, "e: gpus: nodes: 2 takes whole nodes: leave gpus out or give a node's GPU count"),
    ],
)
def test_bad_nodes_are_refused_naming_the_field(tmp_path: Path, fields: dict[str, Any], expected: str) -> None:
    assert only_problem(tmp_path, manifest(exp(**fields)), node_gpus=4) == expected
