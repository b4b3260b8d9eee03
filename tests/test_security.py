"""Security defaults: no checkpoint code runs unless asked, weights are safetensors, no pickle loads.

* ``trust_remote_code`` is False by default in every loader (signatures) and every CLI flag
  (parsers), and a checkpoint whose ``config.json`` has an ``auto_map`` to its own Python code is
  loaded without running that code (a known model type falls back to the built-in class; an
  unknown one is a clear error) -- the custom module writes a marker file on import, which must
  never appear.
* Exports are safetensors only; loaders pass ``use_safetensors=True``, so a checkpoint holding only
  a pickled ``pytorch_model.bin`` is refused (its payload never runs).
* Every ``torch.load`` in the source tree passes ``weights_only=True``, and the resume path
  (Lightning's ``--ckpt_path``) refuses a checkpoint carrying a pickled object.

Each behavioural test first shows that its payload *does* fire when loaded unsafely, so the
test cannot pass because the payload was broken.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("mmalign", "models", "data_pipelines", "benchmarks", "tests")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class _Payload:
    """Unpickling this creates ``marker``: stands for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_pickle(path: Path, marker: Path, extra: dict | None = None) -> Path:
    torch.save({**(extra or {}), "payload": _Payload(marker)}, path)
    return path


def _payload_fires(path: Path, marker: Path) -> None:
    """Positive control: an unsafe load of ``path`` runs the payload (then clean up)."""
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload did not fire: this test would prove nothing"
    marker.unlink()


# --------------------------------------------------------------------------------------------
# trust_remote_code


def _modules():
    for pkg in ("mmalign", "models", "data_pipelines"):
        mod = importlib.import_module(pkg)
        yield mod
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
            yield importlib.import_module(info.name)


def _callables_with(param: str):
    seen = set()
    for mod in _modules():
        for name, obj in vars(mod).items():
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            targets = [obj]
            if inspect.isclass(obj):
                targets = [getattr(obj, n) for n, v in vars(obj).items() if inspect.isfunction(v)]
            for f in targets:
                if not callable(f) or id(f) in seen:
                    continue
                seen.add(id(f))
                try:
                    sig = inspect.signature(f)
                except (TypeError, ValueError):
                    continue
                if param in sig.parameters:
                    yield f"{mod.__name__}.{getattr(f, '__qualname__', name)}", sig.parameters[param]


def test_trust_remote_code_defaults_to_false_in_every_signature():
    found = dict(_callables_with("trust_remote_code"))
    # the loaders that must be among them (if one is renamed, this list says what to check)
    for expected in ("models.policy.HFPolicy.__init__", "models.judge.MMHalJudge.__init__",
                     "models.processors.load_processor", "models.feedback_sources.VLMJudgeSource.__init__",
                     "models.feedback_sources.DetectorSource.__init__",
                     "models.feedback_sources.TeacherCritic.__init__"):
        assert expected in found, f"{expected} no longer takes trust_remote_code; found {sorted(found)}"
    # A required parameter (private helpers that are always handed the caller's flag) cannot
    # turn remote code on by default either; any other default must be False.
    bad = {name: p.default for name, p in found.items() if p.default not in (False, inspect.Parameter.empty)}
    assert not bad, f"trust_remote_code must default to False (or be required to be passed): {bad}"


def _trust_flags():
    """Every ``add_argument("--trust-remote-code", ...)`` in the source tree, as (file:line, keywords)."""
    for d in ("mmalign", "models", "data_pipelines"):
        for f in sorted((REPO / d).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "add_argument"
                        and any(isinstance(a, ast.Constant) and a.value == "--trust-remote-code" for a in node.args)):
                    yield f"{f.relative_to(REPO)}:{node.lineno}", {k.arg: k.value for k in node.keywords}


def test_trust_remote_code_cli_flags_are_opt_in():
    flags = list(_trust_flags())
    files = {w.split(":")[0] for w, _ in flags}
    assert {"mmalign/eval/cli.py", "data_pipelines/feedback.py", "data_pipelines/refine_bench.py"} <= files, files
    for where, kw in flags:
        assert isinstance(kw.get("action"), ast.Constant) and kw["action"].value == "store_true", where
        assert "default" not in kw, f"{where}: --trust-remote-code must not set a default"
    # and the parsers as built: off unless the flag is given
    from data_pipelines.refine_bench import _parser
    from mmalign.eval.cli import _run_parser

    for ap in (_run_parser(), _parser()):
        (act,) = [a for a in ap._actions if a.dest == "trust_remote_code"]
        assert act.default is False and act.const is True


@pytest.fixture
def remote_code_checkpoint(model_dirs, tmp_path):
    """A copy of the tiny LLaVA checkpoint whose config maps the Auto classes to ``custom.py``,
    which creates ``marker`` when imported."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dirs["llava"], ckpt)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (ckpt / "custom.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlavaConfig, LlavaForConditionalGeneration\n"
        "class EvilConfig(LlavaConfig):\n    pass\n"
        "class EvilModel(LlavaForConditionalGeneration):\n    config_class = EvilConfig\n")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.EvilConfig", "AutoModelForImageTextToText": "custom.EvilModel",
                       "AutoModelForCausalLM": "custom.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt, marker


def test_auto_map_code_is_not_run_by_the_policy_loader(remote_code_checkpoint):
    """A known model type with an auto_map: the built-in class loads, the custom code never runs."""
    from models.policy import HFPolicy

    ckpt, marker = remote_code_checkpoint
    policy = HFPolicy(str(ckpt))
    assert type(policy.model).__module__.startswith("transformers."), type(policy.model)
    assert not marker.exists(), "trust_remote_code=False, yet the checkpoint's own code ran"


def test_auto_map_code_is_not_run_by_the_judge_loader(remote_code_checkpoint):
    from models.judge import MMHalJudge

    ckpt, marker = remote_code_checkpoint
    judge = MMHalJudge(str(ckpt), progress=False)
    assert judge.kind == "image-text-to-text"
    assert not marker.exists()


def test_unknown_model_type_with_auto_map_is_a_clear_error(remote_code_checkpoint):
    """A model type transformers does not know: loading needs the custom code, so it is refused
    with an error that says trust_remote_code, and nothing runs."""
    from models.policy import HFPolicy

    ckpt, marker = remote_code_checkpoint
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "evil_vlm"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, OSError, KeyError)) as e:
        HFPolicy(str(ckpt))
    assert "trust_remote_code" in str(e.value) or "evil_vlm" in str(e.value), str(e.value)
    assert not marker.exists()


def test_auto_map_code_runs_only_when_asked(remote_code_checkpoint):
    """Positive control for the three tests above: with the flag, transformers does import
    custom.py (so a missing marker there really means "not run")."""
    from transformers import AutoConfig

    ckpt, marker = remote_code_checkpoint
    AutoConfig.from_pretrained(str(ckpt), trust_remote_code=True)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# safetensors only


def test_tiny_model_exports_are_safetensors_only(model_dirs, tmp_path):
    from models.policy import HFPolicy

    for family, d in model_dirs.items():
        files = [p.name for p in d.rglob("*") if p.is_file()]
        assert any(n.endswith(".safetensors") for n in files), (family, files)
        assert not [n for n in files if n.endswith(PICKLE_SUFFIXES)], (family, files)
    # a policy export (what every training stage writes with save_pretrained) too
    out = tmp_path / "export"
    HFPolicy(str(model_dirs["llava"])).save_pretrained(str(out))
    files = [p.name for p in out.rglob("*") if p.is_file()]
    assert any(n.endswith(".safetensors") for n in files) and not [n for n in files if n.endswith(PICKLE_SUFFIXES)]


def test_pickle_only_checkpoint_is_refused_and_its_payload_never_runs(model_dirs, tmp_path):
    """Only ``pytorch_model.bin`` (a pickle with a payload) and no safetensors: the loader
    refuses it instead of unpickling."""
    from safetensors.torch import load_file

    from models.policy import HFPolicy

    ckpt = tmp_path / "ckpt"
    shutil.copytree(model_dirs["llava"], ckpt)
    marker = tmp_path / "PICKLE_RAN"
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(f)))
        f.unlink()
    for f in ckpt.glob("*.safetensors.index.json"):
        f.unlink()
    _malicious_pickle(ckpt / "pytorch_model.bin", marker, state)
    _payload_fires(ckpt / "pytorch_model.bin", marker)
    with pytest.raises((OSError, ValueError)) as e:
        HFPolicy(str(ckpt))
    assert "safetensors" in str(e.value).lower() or "model.safetensors" in str(e.value), str(e.value)
    assert not marker.exists()


def test_weight_writers_use_safetensors():
    """Source scan: no torch.save of weights anywhere, and every save_pretrained of a model says
    safe_serialization=True (a processor's save_pretrained writes JSON only and is exempt)."""
    problems = []
    for d in ("mmalign", "models", "data_pipelines"):
        for f in sorted((REPO / d).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                where = f"{f.relative_to(REPO)}:{node.lineno}"
                if node.func.attr == "save" and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                    problems.append(f"{where}: torch.save")
                if node.func.attr == "save_pretrained" and isinstance(node.func.value, ast.Name) \
                        and node.func.value.id == "model":
                    kw = {k.arg: k.value for k in node.keywords}
                    v = kw.get("safe_serialization")
                    if not (isinstance(v, ast.Constant) and v.value is True):
                        problems.append(f"{where}: model.save_pretrained without safe_serialization=True")
    assert not problems, problems


# --------------------------------------------------------------------------------------------
# torch.load / pickle


def torch_load_calls(source: str, filename: str = "<src>") -> list[tuple[int, bool]]:
    """``(line, has weights_only=True)`` for every ``torch.load(...)`` / ``load(...)`` imported
    from torch in ``source``."""
    tree = ast.parse(source, filename)
    aliases = {"torch.load"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "load"}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                else f.id if isinstance(f, ast.Name) else None)
        if name in aliases:
            ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                     for k in node.keywords)
            out.append((node.lineno, ok))
    return out


def test_the_torch_load_scanner_sees_bad_calls():
    src = ("import torch\nfrom torch import load as L\n"
           "torch.load('a')\ntorch.load('b', weights_only=False)\nL('c')\ntorch.load('d', weights_only=True)\n")
    assert torch_load_calls(src) == [(3, False), (4, False), (5, False), (6, True)]


@pytest.mark.parametrize("d", SOURCE_DIRS)
def test_every_torch_load_in_the_repo_is_weights_only(d):
    this = Path(__file__).resolve()
    scanned, bad = 0, []
    if not (REPO / d).is_dir():
        pytest.skip(f"no {d}/ here")
    for f in sorted((REPO / d).rglob("*.py")):
        if f.resolve() == this:  # this file unpickles on purpose, in its positive controls
            continue
        scanned += 1
        bad += [f"{f.relative_to(REPO)}:{line}" for line, ok in torch_load_calls(f.read_text(), str(f)) if not ok]
    assert scanned > 0
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_resume_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    """``mmalign fit --ckpt_path X`` restores through the Trainer's strategy.load_checkpoint (what
    ``_checkpoint_connector.resume_start`` calls); it must refuse a pickled object, not run it."""
    import pickle

    from lightning.pytorch import Trainer

    marker = tmp_path / "CKPT_RAN"
    ckpt = _malicious_pickle(tmp_path / "last.ckpt", marker, {"state_dict": {}, "epoch": 0, "global_step": 0})
    _payload_fires(ckpt, marker)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(pickle.UnpicklingError, match="(?i)weights_only"):
        trainer.strategy.load_checkpoint(ckpt)
    assert not marker.exists()
    # and torch's own default here is the safe one (no TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD in play)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    assert not marker.exists()
