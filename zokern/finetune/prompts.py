"""Prompt-based classification in the MeZO style: the loss is the cross-entropy over the label words'
next-token logits at the end of the prompt."""
from __future__ import annotations

import torch

from zokern.finetune.data import DataError, Example, Task


class PromptClassifier:
    def __init__(self, task: Task, tokenizer, max_length: int = 64):
        self.task, self.tokenizer, self.max_length = task, tokenizer, max_length
        ids = [tokenizer(w, add_special_tokens=False).input_ids for w in task.label_words]
        for word, tokens in zip(task.label_words, ids):
            if len(tokens) != 1:
                raise DataError(f"label word {word!r} is {len(tokens)} tokens for this tokenizer; use one-token words")
        self.label_ids = torch.tensor([t[0] for t in ids])
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        if text not in self._cache:
            prompt = self.task.template.format(text=text)
            self._cache[text] = self.tokenizer(prompt, add_special_tokens=False).input_ids[-self.max_length:]
        return self._cache[text]

    def batch(self, examples: list[Example], device) -> dict:
        encoded = [self._encode(e.text) for e in examples]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        # Left padding: positions count real tokens only, so a padded prompt reads like an unpadded one.
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        labels = torch.tensor([e.label for e in examples], device=device)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "labels": labels}

    def label_logits(self, model, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], logits_to_keep=1)
        return out.logits[:, -1, self.label_ids.to(out.logits.device)].float()

    def loss(self, model, batch: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.label_logits(model, batch), batch["labels"])

    # no_grad, not inference_mode: FSDP2 reuses its all-gather buffers across forwards, and a buffer made in
    # inference mode cannot be written by a training step's gather.
    @torch.no_grad()
    def accuracy(self, model, examples: list[Example], batch_size: int = 32) -> float:
        device = next(model.parameters()).device
        correct = 0
        for start in range(0, len(examples), batch_size):
            batch = self.batch(examples[start:start + batch_size], device)
            correct += int((self.label_logits(model, batch).argmax(-1) == batch["labels"]).sum())
        return correct / max(1, len(examples))
