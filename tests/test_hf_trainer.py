"""ZOTrainer: the five methods under Hugging Face's Trainer on a tiny random-config Llama (logging, evaluation,
callbacks, checkpoints and exact resume, gradient accumulation, two-pass mode, PEFT LoRA), and a few steps
of the embedded SmolLM2."""
import math
import os

import pytest
import torch

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments  # noqa: E402

from zokern.integration import ZOTrainer  # noqa: E402

METHODS = ["mezo", "subzero", "sparse-mezo", "hizoo", "dizo"]
# A projection search after steps 2 and 4 of a 4-step run, on two fresh batches each.
DIZO = {"project_every": 2, "project_iters": 2}
TWO_PASS = {"mezo", "subzero", "sparse-mezo"}


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences for causal-LM training (labels = input_ids)."""

    def __init__(self, n: int = 16, length: int = 8, vocab: int = 64, seed: int = 0):
        self.ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def make_args(out, **kw):
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                    logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[],
                    use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(**{**settings, **kw})


def options(method, **kw):
    return {**(DIZO if method == "dizo" else {}), **kw}


def trainer(out, method="mezo", model=None, zo_options=None, **kw):
    return ZOTrainer(model=model or tiny_llama(), args=make_args(out, **kw), train_dataset=TokenDataset(),
                     eval_dataset=TokenDataset(8, seed=1), zo_method=method,
                     zo_options=options(method) if zo_options is None else zo_options)


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


class StepRecorder(TrainerCallback):
    def __init__(self):
        self.steps, self.evaluations = [], 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluations += 1


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_logs_evaluates_and_calls_back(tmp_path, method):
    t = trainer(tmp_path, method)
    recorder = StepRecorder()
    t.add_callback(recorder)
    before = weights(t.model)
    result = t.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    losses = [(log["step"], log["loss"]) for log in t.state.log_history if "loss" in log]
    assert [step for step, _ in losses] == [1, 2, 3, 4] and all(math.isfinite(v) for _, v in losses)
    assert not any("grad_norm" in log for log in t.state.log_history)
    assert [log["step"] for log in t.state.log_history if "eval_loss" in log] == [2, 4]
    assert recorder.steps == [1, 2, 3, 4] and recorder.evaluations == 2
    assert type(t.zo_optimizer).__name__ == {"mezo": "MeZO", "subzero": "SubZero", "sparse-mezo": "SparseMeZO",
                                            "hizoo": "HiZOO", "dizo": "DiZO"}[method]
    assert t.zo_optimizer.step_count == 4
    assert not t.model.training
    assert all(p.grad is None for p in t.model.parameters())  # no gradient buffers
    after = weights(t.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert t.zo_optimizer.param_groups[0]["lr"] == 0.0  # Trainer's linear schedule reached the optimizer


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, method):
    two_pass = {"two_pass": True} if method in TWO_PASS else {}
    kw = dict(save_strategy="steps", save_steps=2, eval_strategy="no")
    straight = trainer(tmp_path / "straight", method, zo_options=options(method, **two_pass), **kw)
    straight.train()
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    resumed = trainer(tmp_path / "resumed", method, zo_options=options(method, **two_pass), **kw)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.zo_optimizer.step_count == 4 and resumed.zo_optimizer.pending_seed is None
    a, b = weights(straight.model), weights(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log and log["step"] > 2]
              for t in (straight, resumed)]
    assert losses[0] == losses[1]


def test_gradient_accumulation_is_one_step_over_the_micro_batches(tmp_path):
    kw = dict(eval_strategy="no", lr_scheduler_type="constant")
    whole = trainer(tmp_path / "whole", per_device_train_batch_size=4, **kw)
    accumulated = trainer(tmp_path / "accumulated", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                          **kw)
    whole.train()
    accumulated.train()
    assert accumulated.zo_optimizer.step_count == 4
    a, b = weights(whole.model), weights(accumulated.model)
    # Equal up to rounding: the loss differences are divided by 2·eps, so last-bit changes in a loss show.
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (whole, accumulated)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


class StopAfter(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_two_pass_mode_evaluates_saves_and_ends_at_the_trained_weights(tmp_path):
    from safetensors.torch import load_file

    one = trainer(tmp_path / "one", eval_steps=3, lr_scheduler_type="constant")
    # Stopped by a callback after step 4, which is neither evaluated nor saved: +εz is still pending when Trainer
    # loads the best checkpoint (step 3).
    two = trainer(tmp_path / "two", zo_options={"two_pass": True}, eval_steps=3, save_strategy="steps", save_steps=3,
                  max_steps=8, lr_scheduler_type="constant", load_best_model_at_end=True,
                  metric_for_best_model="eval_loss")
    two.add_callback(StopAfter(4))
    one.train()
    two.train()
    assert two.state.global_step == 4 and two.state.best_model_checkpoint.endswith("checkpoint-3")
    # Evaluation saw the trained weights, not the pending +εz (which would move eval_loss by far more).
    evals = [[log["eval_loss"] for log in t.state.log_history if log.get("step") == 3 and "eval_loss" in log]
             for t in (one, two)]
    assert evals[0] == pytest.approx(evals[1], rel=1e-6)
    # The checkpoint was saved unperturbed and the best model loaded as is.
    assert two.zo_optimizer.pending_seed is None
    best = load_file(os.path.join(two.state.best_model_checkpoint, "model.safetensors"))
    assert all(torch.equal(p, best[name]) for name, p in two.model.state_dict().items() if name in best)


def test_bf16_autocast_runs(tmp_path):
    t = trainer(tmp_path, bf16=True, max_steps=2, eval_strategy="no")
    assert math.isfinite(t.train().training_loss)


@pytest.mark.parametrize("method", ["mezo", "subzero"])
def test_peft_lora_trains_only_the_adapters(tmp_path, method):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=["q_proj", "v_proj"]))
    t = trainer(tmp_path, method, model=model, zo_options={"rank": 2} if method == "subzero" else {},
                save_strategy="steps", save_steps=4)
    before = weights(model)
    t.train()
    after = weights(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= changed
    assert (tmp_path / "checkpoint-4" / "adapter_model.safetensors").exists()
    assert (tmp_path / "checkpoint-4" / "optimizer.pt").exists()


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("kw,zo_method,zo_options,message", [
    (dict(fp16=True), "mezo", {}, "gradient scaler"),
    (dict(max_grad_norm=0.5), "mezo", {}, "no gradients to clip"),
    (dict(neftune_noise_alpha=5.0), "mezo", {}, "two probes"),
    (dict(gradient_checkpointing=True), "mezo", {}, "no activations"),
    (dict(weight_decay=0.1), "subzero", {}, "SubZero has no weight decay"),
    ({}, "adam", {}, "unknown zo_method"),
    ({}, "mezo", {"lr": 1e-6}, "learning_rate"),
])
def test_rejected_settings(tmp_path, kw, zo_method, zo_options, message):
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, zo_method, zo_options=zo_options, **kw)


def test_rejects_an_optimizer_given_to_trainer(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="builds its own"):
        ZOTrainer(model=model, args=make_args(tmp_path, eval_strategy="no"), train_dataset=TokenDataset(),
                  optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


def test_embedded_smollm2_few_steps(tmp_path):
    from zokern.finetune.model import ModelError, embedded_model_path, load_model

    try:
        embedded_model_path()
    except ModelError as e:
        pytest.skip(str(e))

    model, tokenizer = load_model()
    texts = ["The cat sat on the mat.", "Stocks rose sharply today.", "The team won the final.",
             "A new phone was released.", "Parliament passed the bill.", "The film opens on Friday."]
    encoded = tokenizer(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    examples = [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(encoded["input_ids"], encoded["attention_mask"], labels)]
    args = make_args(tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-6, eval_steps=2)
    t = ZOTrainer(model=model, args=args, train_dataset=examples, eval_dataset=examples[:2], zo_method="mezo",
                  zo_options={"two_pass": True})
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = t.train()
    assert math.isfinite(result.training_loss) and result.training_loss < 10
    assert [log["step"] for log in t.state.log_history if "eval_loss" in log] == [2]
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)
