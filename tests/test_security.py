"""Security promises (issue 9): UIs bind loopback unless told otherwise, checkpoints never unpickle code, no
shell strings anywhere in the package, and names from specs / the CLI cannot make a write escape the work dir."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

PACKAGE = Path(__file__).resolve().parents[1]
# The installed package is the root __init__.py plus these four rooms; walking the whole checkout would also
# read a virtualenv created inside it (the README's `.venv`, CI's `.ci-venv`).
SOURCES = sorted([PACKAGE / "__init__.py",
                  *(p for room in ("models", "metrics", "studies", "reports") for p in (PACKAGE / room).rglob("*.py"))])


# --- UIs bind 127.0.0.1 --------------------------------------------------------------------------------------


def _study_workdir(tmp_path: Path) -> Path:
    wd = tmp_path / "wd; rm -rf ~ $(touch pwned)"  # shell metacharacters must stay inert: argv, not a string
    wd.mkdir()
    (wd / "study.json").write_text(json.dumps({"studies": {"s": {"storage": None, "spec_hash": "x"}}, "default": "s"}))
    return wd


def _host_of(argv: list[str]) -> str:
    return argv[argv.index("--host") + 1]


def test_ui_defaults_to_loopback() -> None:
    from diffablate.studies import cmd_study, ui

    assert inspect.signature(ui.start_ui).parameters["host"].default == "127.0.0.1"
    opt = inspect.signature(cmd_study.ui_cmd).parameters["host"].default
    assert getattr(opt, "default", opt) == "127.0.0.1"


def test_ui_commands_are_argv_lists_bound_where_told(tmp_path: Path) -> None:
    from diffablate.studies import ui

    wd = _study_workdir(tmp_path)
    mlflow, dash = ui.ui_commands(wd, "127.0.0.1", 5001, 5002)
    for argv in (mlflow, dash):
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        assert _host_of(argv) == "127.0.0.1"
        assert "0.0.0.0" not in argv
    assert "--allowed-hosts" not in mlflow  # MLflow's Host-header check stays on at loopback
    assert any(str(wd) in a for a in mlflow + dash)  # the odd path is one argv element, not shell text
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    exposed, _ = ui.ui_commands(wd, "0.0.0.0", 5001, 5002)
    assert _host_of(exposed) == "0.0.0.0"  # only when asked


def test_no_server_defaults_to_all_interfaces() -> None:
    """No function in the package has a default bind address other than loopback."""
    bad = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for d in node.args.defaults + node.args.kw_defaults:
                    if isinstance(d, ast.Constant) and d.value in ("0.0.0.0", "::"):
                        bad.append(f"{path}:{node.lineno} {node.name}")
    assert not bad


# --- checkpoints never unpickle code ---------------------------------------------------------------------------


class _Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch '{self.marker}'",))


def _checkpoint(tmp_path: Path) -> Path:
    import torch

    from diffablate.models import checkpoint as ckpt

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return ckpt.save_checkpoint(tmp_path / "run", ckpt.CheckpointPayload(
        step=1, denoiser=net, text_encoder=torch.nn.Linear(2, 2), ema=net, optimizer=opt, state={"rows": []},
        config_json="{}", captions=["a"], meta={}))


def _plant(path: Path, name: str, payload: bytes, *, fix_manifest: bool) -> None:
    (path / name).write_bytes(payload)
    if fix_manifest:  # an attacker who can write the file can rewrite the manifest too
        manifest = json.loads((path / "MANIFEST.json").read_text())
        manifest["files"][name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        (path / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["optimizer.pt", "state.pt"])
def test_pickle_bomb_in_checkpoint_is_refused(tmp_path: Path, name: str) -> None:
    import torch

    from diffablate.models import checkpoint as ckpt

    path = _checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(_Bomb(marker))
    # Self-check: this payload really executes when unpickled the unsafe way.
    pickle.loads(bomb)
    assert marker.exists()
    marker.unlink()

    _plant(path, name, bomb, fix_manifest=False)
    with pytest.raises(ckpt.CheckpointError, match=name):
        ckpt.verify_checkpoint(path)  # a swapped file fails the manifest first
    _plant(path, name, bomb, fix_manifest=True)
    ckpt.verify_checkpoint(path)
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(ckpt.CheckpointError, match=name):
        ckpt.load_optimizer(path, opt) if name == "optimizer.pt" else ckpt.load_state(path)
    assert not marker.exists()


def test_weights_are_safetensors() -> None:
    from diffablate.models import checkpoint as ckpt

    assert all(f.endswith(".safetensors") for f in ckpt.WEIGHT_FILES)


def _calls(tree: ast.AST) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _dotted(func: ast.AST) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def unsafe_loads(source: str, where: str = "<src>") -> list[str]:
    """torch.load without weights_only=True, and any pickle/marshal/yaml.load call."""
    bad = []
    for call in _calls(ast.parse(source)):
        name = _dotted(call.func)
        if name.endswith("torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                bad.append(f"{where}:{call.lineno} {name} without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "marshal.loads", "yaml.load", "dill.load", "dill.loads"):
            bad.append(f"{where}:{call.lineno} {name}")
    return bad


def test_unsafe_load_checker_catches_bad_code() -> None:
    assert unsafe_loads("import torch\ntorch.load('x')")
    assert unsafe_loads("import torch\ntorch.load('x', weights_only=False)")
    assert unsafe_loads("import pickle\npickle.loads(b'')")
    assert not unsafe_loads("import torch\ntorch.load('x', map_location='cpu', weights_only=True)")


def test_package_never_unpickles_untrusted_data() -> None:
    bad = [b for p in SOURCES for b in unsafe_loads(p.read_text(), str(p.relative_to(PACKAGE)))]
    assert not bad, bad


def test_torchscript_is_loaded_only_after_its_hash_is_checked() -> None:
    """torch.jit.load can run code; the one use (fid-helper's Inception file) checks the sha256 first."""
    users = [p for p in SOURCES if "jit.load" in p.read_text()]
    assert [p.relative_to(PACKAGE).as_posix() for p in users] == ["metrics/inception.py"]
    from diffablate.metrics import inception

    src = inspect.getsource(inception.convert_fid_helper_weights)
    assert src.index("_check_source(source)") < src.index("torch.jit.load")
    assert "SOURCE_SHA256" in inspect.getsource(inception._check_source)


# --- no shell strings ------------------------------------------------------------------------------------------

_PROC = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
         "asyncio.create_subprocess_exec"}
_SHELL = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "asyncio.create_subprocess_shell"}


def shell_uses(source: str, where: str = "<src>") -> list[str]:
    """Process launches that go through a shell or pass a command as one string."""
    bad = []
    for call in _calls(ast.parse(source)):
        name = _dotted(call.func)
        if name in _SHELL:
            bad.append(f"{where}:{call.lineno} {name}")
        if name in _PROC or name.split(".")[-1] in {"Popen", "check_output", "check_call"}:
            for k in call.keywords:
                if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    bad.append(f"{where}:{call.lineno} {name}(shell=...)")
            if call.args and isinstance(call.args[0], (ast.JoinedStr, ast.BinOp)) or (
                    call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                bad.append(f"{where}:{call.lineno} {name} with a command string")
    return bad


def test_shell_checker_catches_bad_code() -> None:
    assert shell_uses("import subprocess\nsubprocess.run(['ls'], shell=True)")
    assert shell_uses("import subprocess\nsubprocess.Popen(f'ls {x}')")
    assert shell_uses("import subprocess\nsubprocess.run('ls ' + x)")
    assert shell_uses("import os\nos.system('ls')")
    assert not shell_uses("import subprocess\nsubprocess.run(['ls', x], check=False)")


def test_package_uses_argument_lists_never_a_shell() -> None:
    bad = [b for p in SOURCES for b in shell_uses(p.read_text(), str(p.relative_to(PACKAGE)))]
    assert not bad, bad


# --- writes stay inside the work directory ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "..", "/etc", "a/../../b", ".hidden", "a\\..\\b", "x\0y", ""])
def test_study_names_that_would_escape_are_refused(name: str) -> None:
    from diffablate.studies.preflight import check_name
    from diffablate.studies.runner import StudyError
    from diffablate.studies.spec import SpecError, spec_from_dict

    raw = {"name": name, "seeds": [0], "base": {"device": "cpu"},
           "design": {"kind": "factorial", "axes": {"timestep_sampler": ["uniform"]}}}
    with pytest.raises(SpecError, match="^name:"):
        spec_from_dict(raw)
    with pytest.raises(StudyError, match="--new-name"):
        check_name(name)


def test_rename_refuses_escaping_names() -> None:
    """The library path (run_study(new_name=...)), not only the CLI, refuses a name that escapes."""
    from diffablate.studies.runner import StudyError, rename_spec
    from diffablate.studies.spec import spec_from_dict

    spec = spec_from_dict({"name": "ok", "seeds": [0], "base": {"device": "cpu"},
                           "design": {"kind": "factorial", "axes": {"timestep_sampler": ["uniform"]}}})
    with pytest.raises(StudyError):
        rename_spec(spec, "../../evil")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=20))
def test_any_accepted_name_writes_inside_the_workdir(name: str) -> None:
    """Property: a study name is either refused, or every path derived from it stays under the work dir."""
    from diffablate.studies.runner import default_workdir
    from diffablate.studies.spec import SpecError, spec_from_dict

    raw = {"name": name, "seeds": [0], "base": {"device": "cpu"},
           "design": {"kind": "factorial", "axes": {"timestep_sampler": ["uniform"]}}}
    try:
        spec = spec_from_dict(raw)
    except SpecError:
        return
    wd = Path("/srv/wd")
    for p in (wd / "runs" / spec.name / "0000", wd / "specs" / f"{spec.name}.toml"):
        assert os.path.normpath(p).startswith(str(wd) + os.sep), p
    root = Path("/srv/studies-out")
    assert os.path.normpath(root / default_workdir(spec.name).relative_to("studies-out")).startswith(str(root) + os.sep)


def test_train_run_name_cannot_escape(tmp_path: Path) -> None:
    from diffablate.studies.cli import app

    wd = tmp_path / "wd"
    r = CliRunner().invoke(app, ["train", "--workdir", str(wd), "--run-name", "../../evil", "--set", "device=cpu",
                                 "--no-progress"])
    assert r.exit_code == 2 and "--run-name" in r.output
    assert not (tmp_path / "evil").exists() and not (wd / "runs").exists()
