"""The optimizers under faults: steps that never half-apply (a closure that raises or returns no loss, NaN or
infinite rates), frozen parameters, and states checked against their method and tensors before loading."""
import copy
import math

import pytest
import torch

from zokern import optim
from test_optim import METHOD_SETTINGS, METHODS, TinyLM, fresh_model, lm_loss, make_optimizer, make_task

MODES = [(m, False) for m in METHODS] + [(m, True) for m in METHODS if METHOD_SETTINGS[m][0].two_pass_supported]
MODE_IDS = [f"{m}-{'two' if two else 'three'}-pass" for m, two in MODES]


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_bitwise(model, expected: dict) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name


def assert_same_state(a, b, where="state"):
    """Two optimizer states (or parts) equal: same structure, tensors bitwise equal."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, where


class Run:
    """An optimizer over a TinyLM whose closure misbehaves at one forward of one step."""

    def __init__(self, method, two_pass, bad_step=None, bad_forward=None, junk=None, **overrides):
        self.model, self.tokens = fresh_model(), make_task(0)
        self.opt = make_optimizer(method, self.model, None, two_pass=two_pass, **overrides)
        self.records = []
        self.opt.record_hook = self.records.append
        self.bad_step, self.bad_forward, self.junk = bad_step, bad_forward, junk
        self.calls, self.failed = 0, False
        batches = iter([make_task(i) for i in range(1, 100)])
        self.fresh = lambda: (lambda b: lambda: lm_loss(self.model, b))(next(batches))  # noqa: E731

    def closure(self):
        self.calls += 1
        if self.opt.step_count == self.bad_step and self.calls == self.bad_forward and not self.failed:
            self.failed = True  # once: a step retried after a failure runs normally
            if isinstance(self.junk, BaseException):
                raise self.junk
            return self.junk
        return lm_loss(self.model, self.tokens)

    def step(self):
        self.calls = 0
        return self.opt.step(self.closure, fresh_closure=self.fresh)


JUNK = {
    "raises": (RuntimeError("out of memory in the forward"), RuntimeError, "out of memory"),
    "None": (None, TypeError, "returned NoneType None"),
    "string": ("0.5", TypeError, "returned str '0.5'"),
    "two-element tensor": (torch.tensor([0.5, 0.6]), ValueError, r"tensor of shape \(2,\)"),
    "interrupt": (KeyboardInterrupt(), KeyboardInterrupt, None),
}


@pytest.mark.parametrize("junk", list(JUNK))
@pytest.mark.parametrize("method,two_pass", MODES, ids=MODE_IDS)
def test_a_failed_forward_restores_the_weights_as_a_skipped_step(method, two_pass, junk):
    """Whatever the closure does at any forward of a step, the weights end bitwise where a skipped step
    (non-finite loss at that forward) leaves them, the error is raised again, and training continues as
    after the skipped step; restore_weights() then leaves the trained weights. A failure before any weight
    moved (HiZOO's center forward, two-pass mode's +εz already applied) leaves everything as it was, and
    the step retried is the step of a run that never failed."""
    value, error, message = JUNK[junk]
    for forward in range(1, METHOD_SETTINGS[method][0].forwards_per_step + 1):
        failing = Run(method, two_pass, bad_step=2, bad_forward=forward, junk=value)
        skipped = Run(method, two_pass, bad_step=2, bad_forward=forward, junk=torch.tensor(math.nan))
        for _ in range(2):
            failing.step(), skipped.step()
        before, pending = snapshot(failing.model), failing.opt.pending_seed
        with pytest.raises(error, match=message):
            failing.step()
        untouched = method == "hizoo" and forward == 1 or two_pass and forward == 1
        if untouched:
            assert_bitwise(failing.model, before)
            assert failing.opt.step_count == 2 and failing.opt.pending_seed == pending
            assert len(failing.records) == 2
        else:
            with pytest.warns(RuntimeWarning, match="non-finite loss"):
                skipped.step()
            assert_bitwise(failing.model, snapshot(skipped.model))
            assert failing.opt.step_count == 3 and failing.opt.pending_seed is None
            assert failing.records[-1]["skipped"] and error.__name__ in failing.records[-1]["failed"]
            assert failing.opt.nonfinite_steps == 0
            if not two_pass:  # two-pass mode: test_two_pass_failure_restores_the_unperturbed_weights
                for name, p in failing.model.named_parameters():
                    torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)
        failing.step()
        if untouched:
            clean = Run(method, two_pass)
            for _ in range(3):
                clean.step()
            assert_bitwise(failing.model, snapshot(clean.model))
        else:
            skipped.step()
            assert_bitwise(failing.model, snapshot(skipped.model))
        failing.opt.restore_weights()
        assert failing.opt.pending_seed is None
        assert all(torch.isfinite(p).all() for p in failing.model.parameters())


@pytest.mark.parametrize("method,two_pass", MODES, ids=MODE_IDS)
def test_two_pass_failure_restores_the_unperturbed_weights(method, two_pass):
    """In two-pass mode a failure after the step moved the weights ends at the trained weights θ (the
    pending +εz is gone, as after a skipped step): restore_weights() has nothing left to take out."""
    run, reference = Run(method, two_pass, bad_step=2, bad_forward=2, junk=RuntimeError("boom")), Run(method, two_pass)
    for _ in range(2):
        run.step(), reference.step()
    reference.opt.restore_weights()
    with pytest.raises(RuntimeError, match="boom"):
        run.step()
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(p, dict(reference.model.named_parameters())[name], rtol=0, atol=1e-6)
    after = snapshot(run.model)
    run.opt.restore_weights()
    assert_bitwise(run.model, after)


@pytest.mark.parametrize("method,two_pass", MODES, ids=MODE_IDS)
def test_a_failed_step_replays_bitwise(method, two_pass):
    """The failed step's record replays its weight operations: the seed log stays exact."""
    run = Run(method, two_pass, bad_step=1, bad_forward=2, junk=None)
    for _ in range(3):
        try:
            run.step()
        except TypeError:
            pass
    run.opt.restore_weights()
    assert "failed" in run.records[1]
    replayed = Run(method, two_pass)
    for record in run.records:
        replayed.opt.replay_step(record)
    replayed.opt.restore_weights()
    assert_bitwise(replayed.model, snapshot(run.model))


@pytest.mark.parametrize("junk", ["raises", "None", "two-element tensor"])
def test_a_failed_dizo_search_puts_back_the_weights_it_probed(junk):
    """A closure failing inside DiZO's projection search (after the step's update landed) leaves the
    weights as they were before the projection began; the step counts, its record has no rescale and says
    what failed, and it replays bitwise."""
    value, error, message = JUNK[junk]
    run = Run("dizo", False, project_every=2, project_iters=3)
    run.step()
    calls = {"n": 0}
    real = run.fresh

    def bad_closure():
        if isinstance(value, BaseException):
            raise value
        return value

    def fresh():  # the second search iteration's batch misbehaves
        calls["n"] += 1
        return bad_closure if calls["n"] == 2 else real()

    run.fresh = fresh
    update = {}
    real_after = run.opt._after_step
    run.opt._after_step = lambda closure, fresh_closure, record: (update.update(snapshot(run.model)),
                                                                  real_after(closure, fresh_closure, record))
    with pytest.raises(error, match=message):
        run.step()
    assert_bitwise(run.model, update)
    assert run.opt.step_count == 2 and "rescale" not in run.records[-1] and "failed" in run.records[-1]
    replayed = Run("dizo", False, project_every=2, project_iters=3)
    for record in run.records:
        replayed.opt.replay_step(record)
    assert_bitwise(replayed.model, snapshot(run.model))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method,two_pass", MODES, ids=MODE_IDS)
def test_nonfinite_rates_change_nothing(method, two_pass, bad):
    """NaN or infinite lr / weight_decay: rejected by the constructor, and, set by a scheduler, before the
    step's first perturbation (no forward, weights and counters as they were, two-pass +εz kept)."""
    model = fresh_model()
    with pytest.raises(ValueError, match="lr must be finite"):
        make_optimizer(method, model, None, two_pass=two_pass, lr=bad)
    if method != "subzero":  # SubZero has no weight decay
        with pytest.raises(ValueError, match="weight_decay must be finite"):
            make_optimizer(method, model, None, two_pass=two_pass, weight_decay=bad)
    for key in ("lr", "weight_decay"):
        run = Run(method, two_pass)
        run.step()
        before, pending, records = snapshot(run.model), run.opt.pending_seed, len(run.records)
        run.opt.param_groups[0][key] = bad
        run.calls = 0
        with pytest.raises(ValueError, match=f"{key} must be finite"):
            run.opt.step(run.closure)
        assert run.calls == 0 and run.opt.step_count == 1 and run.opt.pending_seed == pending
        assert_bitwise(run.model, before)
        assert len(run.records) == records


def test_scheduler_setting_a_nan_rate_changes_nothing():
    run = Run("mezo", True)
    sched = torch.optim.lr_scheduler.LambdaLR(run.opt, lambda step: 1.0 if step < 1 else math.nan)
    run.step()
    sched.step()
    before = snapshot(run.model)
    with pytest.raises(ValueError, match="lr must be finite"):
        run.step()
    assert_bitwise(run.model, before)
    run.opt.restore_weights()  # the pending +εz of step 1 comes out as usual
    assert run.opt.pending_seed is None


@pytest.mark.parametrize("method,option", [("hizoo", "alpha"), ("dizo", "gamma_eps"), ("dizo", "gamma_lr"),
                                           ("dizo", "gamma_range")])
def test_nonfinite_method_options_change_nothing(method, option):
    with pytest.raises(ValueError, match=option):
        make_optimizer(method, fresh_model(), None, **{option: math.nan})
    run = Run(method, False)
    run.step()
    before = snapshot(run.model)
    setattr(run.opt, option, math.inf)
    with pytest.raises(ValueError, match=f"{option} must be finite"):
        run.step()
    assert_bitwise(run.model, before)


def test_lr_beyond_float32_is_rejected():
    """1e39 is finite in float64 but inf in the kernels' float32: rejected before any weight moves."""
    model = fresh_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="lr"):
        opt = optim.MeZO(model.named_parameters(), lr=1e39)
        opt.step(lambda: lm_loss(model, make_task(0)))
    assert_bitwise(model, before)


@pytest.mark.parametrize("method,two_pass", MODES, ids=MODE_IDS)
def test_an_update_that_would_overflow_float32_changes_nothing(method, two_pass):
    """lr·ρ·z beyond float32 is known only after the forwards: the step ends as a skipped step does (the
    weights bitwise those of a run whose step had a non-finite loss), the record replays, and the op's error
    is raised before any group's update is written."""
    failing = Run(method, two_pass, lr=1e30)  # finite in float32, and so is lr·z
    skipped = Run(method, two_pass, lr=1e30, bad_step=0, bad_forward=2, junk=torch.tensor(math.nan))
    for run in (failing, skipped):
        loss = run.closure
        run.closure = lambda loss=loss: loss() * 1e12  # ρ of order 1e12: lr·ρ·z overflows float32
    with pytest.raises(ValueError, match=r"lr \* grad \* z overflows float32"):
        failing.step()
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        skipped.step()
    assert_bitwise(failing.model, snapshot(skipped.model))
    assert failing.records[-1]["skipped"] and "overflows float32" in failing.records[-1]["failed"]
    assert failing.opt.pending_seed is None and failing.opt.step_count == 1


# --- frozen parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method,two_pass", MODES, ids=MODE_IDS)
def test_frozen_parameters_are_not_trained(method, two_pass):
    model, tokens = fresh_model(), make_task(0)
    model.head.requires_grad_(False)
    model.layer.linear1.weight.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    opt = make_optimizer(method, model, None, two_pass=two_pass)
    before = snapshot(model)
    fresh = lambda: (lambda: lm_loss(model, make_task(5)))  # noqa: E731
    for _ in range(11):  # DiZO projects at step 10
        opt.step(lambda: lm_loss(model, tokens), fresh_closure=fresh)
    opt.restore_weights()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and not moved & frozen
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) not in trained for n, p in model.named_parameters() if n in frozen)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert not set(names) & frozen


@pytest.mark.parametrize("method", METHODS)
def test_only_the_adapters_of_a_peft_model_are_trained(method):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).eval(), peft.LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    cls, settings = METHOD_SETTINGS[method]
    settings = {k: v for k, v in settings.items() if k != "project_pattern"}
    opt = cls(model.named_parameters(), **{**settings, "project_pattern": r"lora_B"} if method == "dizo" else settings)
    before = snapshot(model)
    for _ in range(10 if method == "dizo" else 3):
        opt.step(closure, fresh_closure=lambda: closure)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert all("lora_" in n for g in opt.param_groups for n in g["param_names"])


def test_all_parameters_frozen_is_an_error():
    model = fresh_model().requires_grad_(False)
    for cls in (optim.MeZO, optim.SubZero, optim.SparseMeZO, optim.HiZOO, optim.DiZO):
        with pytest.raises(ValueError, match=f"every parameter given to {cls.__name__} has requires_grad=False"):
            cls(model.named_parameters())


# --- state checks ---------------------------------------------------------------------------------------


def trained_state(method, model=None, steps=2):
    run = Run(method, False)
    if model is not None:
        run.model = model
        run.opt = make_optimizer(method, model, None)
    for _ in range(steps):
        run.step()
    return copy.deepcopy(run.opt.state_dict())


def legacy(state):
    """A state as saved before the optimizer recorded its method and tensors."""
    state = copy.deepcopy(state)
    del state["zo"]["optimizer"], state["zo"]["tensors"]
    state["zo"]["method"].pop("tracked", None)  # Sparse MeZO's thresholds were all fixed then
    return state


CLASS_NAMES = {"mezo": "MeZO", "subzero": "SubZero", "sparse": "SparseMeZO", "hizoo": "HiZOO", "dizo": "DiZO"}


@pytest.mark.parametrize("source,target", [(s, t) for s in METHODS for t in METHODS if s != t])
def test_state_of_another_method_is_rejected_and_changes_nothing(source, target):
    saved = trained_state(source)
    run = Run(target, False)
    run.step()
    before = copy.deepcopy(run.opt.state_dict())
    with pytest.raises(ValueError, match=f"saved by {CLASS_NAMES[source]}; this optimizer is {CLASS_NAMES[target]}"):
        run.opt.load_state_dict(saved)
    assert_same_state(run.opt.state_dict(), before)


# Before the record, only states that hold the same structure could pass; MeZO and SubZero keep none.
LEGACY_COMPATIBLE = {("mezo", "subzero"), ("subzero", "mezo")}


@pytest.mark.parametrize("source,target", [(s, t) for s in METHODS for t in METHODS
                                           if s != t and (s, t) not in LEGACY_COMPATIBLE])
def test_an_older_state_of_another_method_is_rejected_by_its_contents(source, target):
    """States saved without the record are checked on what they hold: MeZO's state into DiZO (no anchors)
    fails at loading, naming what is missing, instead of at the first projection."""
    run = Run(target, False)
    run.step()
    before = copy.deepcopy(run.opt.state_dict())
    with pytest.raises(ValueError, match="in the state_dict; this optimizer"):
        run.opt.load_state_dict(legacy(trained_state(source)))
    assert_same_state(run.opt.state_dict(), before)


@pytest.mark.parametrize("method", METHODS)
def test_an_older_state_of_the_same_method_resumes_bitwise(method):
    straight, resumed = Run(method, False), Run(method, False)
    for _ in range(4):
        straight.step()
    for _ in range(2):
        resumed.step()
    state = legacy(resumed.opt.state_dict())
    resumed.opt = make_optimizer(method, resumed.model, None)
    resumed.opt.load_state_dict(state)
    for _ in range(2):
        resumed.step()
    assert_bitwise(resumed.model, snapshot(straight.model))


def wide_model():
    """TinyLM's parameter names with wider tensors."""
    torch.manual_seed(0)
    return TinyLM(dim=24).eval()


@pytest.mark.parametrize("record", ["recorded", "older"])
@pytest.mark.parametrize("method", METHODS)
def test_state_of_tensors_of_other_shapes_is_rejected(method, record):
    """A state saved for the same names with other shapes (DiZO's anchors, HiZOO's D, SparseMeZO's masks)
    is rejected naming the tensor and both shapes; the optimizer is unchanged."""
    saved = trained_state(method, model=wide_model())
    if record == "older":
        saved = legacy(saved)
        if method in ("mezo", "subzero"):  # nothing in their state has a shape to compare
            saved["state"] = {}
    run = Run(method, False)
    run.step()
    before = copy.deepcopy(run.opt.state_dict())
    if record == "older" and method in ("mezo", "subzero"):
        run.opt.load_state_dict(saved)  # accepted: the state holds nothing shaped by the tensors
        return
    match = r"shape \(40, 24\) in the state_dict; this optimizer's is 'embed.weight' of shape \(40, 16\)" \
        if record == "recorded" else r"has shape \(.*\) in the state_dict; this optimizer's has shape"
    with pytest.raises(ValueError, match=match):
        run.opt.load_state_dict(saved)
    assert_same_state(run.opt.state_dict(), before)


@pytest.mark.parametrize("method", METHODS)
def test_state_of_other_tensor_names_is_rejected(method):
    model = fresh_model()
    saved = trained_state(method, model=model)
    saved["zo"]["tensors"][0][0][0] = "encoder.embed.weight"
    run = Run(method, False)
    before = copy.deepcopy(run.opt.state_dict())
    with pytest.raises(ValueError, match="'encoder.embed.weight' of shape .* this optimizer's is 'embed.weight'"):
        run.opt.load_state_dict(saved)
    assert_same_state(run.opt.state_dict(), before)


@pytest.mark.parametrize("state,message", [
    (lambda: torch.optim.SGD(fresh_model().parameters(), lr=0.1).state_dict(), "not a zokern optimizer state"),
    (lambda: {**trained_state("mezo"), "param_groups": []}, "0 param groups; this optimizer has 1"),
    (lambda: {**(s := trained_state("mezo")), "zo": {k: v for k, v in s["zo"].items() if k != "seed"}},
     r"lacks \['seed'\]"),
    (lambda: {**(s := trained_state("mezo")), "param_groups": [{**s["param_groups"][0], "lr": math.nan}]},
     "lr must be finite"),
])
def test_malformed_states_are_rejected(state, message):
    run = Run("mezo", False)
    run.step()
    before = copy.deepcopy(run.opt.state_dict())
    with pytest.raises(ValueError, match=message):
        run.opt.load_state_dict(state())
    assert_same_state(run.opt.state_dict(), before)


def test_a_dizo_state_with_per_tensor_anchors_resumes_bitwise():
    """DiZO's anchors were per-tensor state before they moved into its buckets: such a state still loads."""
    straight, resumed = Run("dizo", False, project_every=2), Run("dizo", False, project_every=2)
    for _ in range(4):
        straight.step()
    for _ in range(2):
        resumed.step()
    assert [r["step"] for r in straight.records if "rescale" in r] == [1, 3]  # a projection on either side
    state = copy.deepcopy(resumed.opt.state_dict())
    index = {id(p): k for k, p in enumerate(p for g in resumed.opt.param_groups for p in g["params"])}
    for b, anchors in zip(resumed.opt.buckets, state["zo"]["method"].pop("anchors")):
        for i, anchor in zip(b.extra["projected"], anchors):
            state["state"][index[id(b.params[i])]] = {"anchor": anchor}
    resumed.opt = make_optimizer("dizo", resumed.model, None, project_every=2)
    resumed.opt.load_state_dict(state)
    assert not resumed.opt.state_dict()["state"]
    for _ in range(2):
        resumed.step()
    assert_bitwise(resumed.model, snapshot(straight.model))
