"""The optimizer protocol: `zokern finetune` and ZOTrainer name no method and ask the optimizer class for
everything (capabilities, options, fresh batches), so a ZOOptimizer registered in zokern.optim.METHODS is
driven by both as the built-in methods are."""
import ast
import inspect
import json
from dataclasses import replace

import pytest

from conftest import tiny_run_config
from zokern.optim import METHODS, MeZO, ZOOptimizer
from test_optim import METHOD_SETTINGS, fresh_model, lm_loss, make_optimizer, make_task


class FreshProbe(ZOOptimizer):
    """MeZO's step that then evaluates `probes` fresh batches; no weight decay; leaves a tied embedding alone."""

    weight_decay_supported = False
    trains_tied_embeddings = False
    made: list = []

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-3, probes: int = 2, **options):
        self.probes, self.fresh_losses = probes, []
        super().__init__(params, dict(lr=lr, weight_decay=0.0), eps=eps, **options)
        FreshProbe.made.append(self)

    @property
    def fresh_batches_per_search(self):
        return self.probes

    _perturb = MeZO._perturb
    _update = MeZO._update

    def _after_step(self, closure, fresh_closure, record):
        if closure is not None:
            self.fresh_losses += [float(fresh_closure()()) for _ in range(self.probes)]


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setitem(METHODS, "fresh-probe", FreshProbe)
    monkeypatch.setattr(FreshProbe, "made", [])
    return FreshProbe


def _code_names(module) -> list:
    """The string constants and identifiers of a module's code: no docstrings, comments or default values
    (a default method is a setting, not a special case)."""
    tree = ast.parse(inspect.getsource(module))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            skipped.add(id(node.body[0].value))
        if isinstance(node, ast.FunctionDef):
            skipped |= {id(d) for d in node.args.defaults + node.args.kw_defaults if d is not None}
        if isinstance(node, ast.ClassDef):
            skipped |= {id(n.value) for n in node.body if isinstance(n, ast.AnnAssign) and n.value is not None}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            found.append(node.value)
        elif isinstance(node, ast.Name):
            found.append(node.id)
        elif isinstance(node, ast.Attribute):
            found.append(node.attr)
        elif isinstance(node, ast.alias):
            found.append(node.asname or node.name)
    return found


def test_finetune_and_the_trainer_name_no_method():
    pytest.importorskip("transformers")
    from zokern.finetune import config, replay, train
    from zokern.integration import hf_trainer

    methods = set(METHODS) | {cls.__name__ for cls in METHODS.values()}
    for module in (train, config, replay, hf_trainer):
        named = sorted(methods & set(_code_names(module)))
        assert not named, f"{module.__name__} names {named}"


@pytest.mark.parametrize("method", list(METHOD_SETTINGS))
def test_the_capabilities_agree_with_what_the_class_does(method):
    cls, _ = METHOD_SETTINGS[method]
    assert cls.weight_decay_supported == ("weight_decay" in cls.option_names())
    model, tokens = fresh_model(), make_task(0)
    opt = make_optimizer(method, model, None)
    assert opt.uses_fresh_batches == (method == "dizo")
    calls, records = {"closure": 0, "fresh": 0}, []
    opt.record_hook = records.append

    def closure():
        calls["closure"] += 1
        return lm_loss(model, tokens)

    def fresh_closure():
        calls["fresh"] += 1
        return closure

    for _ in range(METHOD_SETTINGS["dizo"][1]["project_every"]):
        opt.step(closure, fresh_closure)
    assert calls["closure"] - 2 * calls["fresh"] == opt.forwards_per_step * opt.step_count
    assert calls["fresh"] == opt.fresh_batches_per_search * (method == "dizo")
    assert set(cls.measured) <= set(records[0]) and set(opt.state_dict()["zo"]["method"]) == set(cls.saved_buffers)


def test_a_registered_method_is_driven_by_zokern_finetune(fresh_probe, tiny_model_dir, tmp_path):
    pytest.importorskip("transformers")
    from zokern.finetune.config import ConfigError
    from zokern.finetune.train import finetune

    config = tiny_run_config(method="fresh-probe", model=str(tiny_model_dir), output_dir=str(tmp_path), steps=3,
                             eval_every=0, checkpoint_every=0, weight_decay=0.1, method_options={"probes": 3},
                             zero_shot_eval=False)
    with pytest.raises(ConfigError, match="--weight-decay: fresh-probe has no weight decay"):
        finetune(config, progress_stream=open("/dev/null", "w"))
    summary = finetune(replace(config, weight_decay=0.0), progress_stream=open("/dev/null", "w"))
    opt, = fresh_probe.made
    assert len(opt.fresh_losses) == 9 and summary["forwards"] == 3 * 2 + 9
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    header = json.loads((tmp_path / "seedlog.jsonl").read_text().splitlines()[0])
    assert header["method"] == "fresh-probe" and header["trainable"]
    assert "model.embed_tokens.weight" not in header["trainable"]  # tied to the output layer


def test_a_registered_method_is_driven_by_the_trainer(fresh_probe, tmp_path):
    pytest.importorskip("transformers")
    from test_hf_trainer import trainer

    t = trainer(tmp_path, method="fresh-probe", zo_options={"probes": 2})
    t.train()
    opt, = fresh_probe.made
    assert opt.step_count == 4 and len(opt.fresh_losses) == 8
    with pytest.raises(ValueError, match="FreshProbe has no weight decay; set weight_decay=0"):
        trainer(tmp_path, method="fresh-probe", zo_options={}, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"zo_options \['rank'\]: FreshProbe takes .*probes"):
        trainer(tmp_path, method="fresh-probe", zo_options={"rank": 4})
