"""Probe a Hugging Face Trainer: AlphaTrainer in place of transformers.Trainer measures alpha* of the Trainer's loss."""

import tempfile

import torch
import transformers

from alphalib.integrations.hf import AlphaTrainer

torch.manual_seed(0)
config = transformers.BertConfig(
    vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=3
)
model = transformers.BertForSequenceClassification(config)
ids, labels = torch.randint(0, 32, (64, 12)), torch.randint(0, 3, (64,))
train_set = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]

with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(
        output_dir=out,
        num_train_epochs=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        logging_steps=4,  # each training log carries the medians of alpha/... since the previous one
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = AlphaTrainer(model=model, args=args, train_dataset=train_set, every=2)  # probe every 2nd step
    trainer.train()

frame = trainer.to_frame()
print(frame[["step", "loss", "alpha_star", "ratio", "flag", "path"]].to_string(float_format="%.4g"))
