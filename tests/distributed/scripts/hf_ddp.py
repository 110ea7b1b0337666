"""A tiny GPT-2 (built from its config, no download) trained by the Hugging Face Trainer
under torchrun on 2 CPU processes, with gradvitals' GradVitalsCallback: the Trainer
(accelerate) wraps the model in DistributedDataParallel itself and hands the callback
the bare model. ``--drift-step N``: at that step rank 1 adds 1e-3 to a LayerNorm bias
outside the optimizer (the replicas differ from then on, silently). argv[1]: the
report folder."""
import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from gradvitals.integrations.hf import GradVitalsCallback

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--drift-step", type=int, default=-1)
args = ap.parse_args()


class Drift(TrainerCallback):
    def on_step_end(self, targs, state, control, model=None, **kwargs):
        if state.global_step == args.drift_step and targs.process_index == 1:
            with torch.no_grad():
                model.transformer.ln_f.bias.add_(1e-3)


torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                   bos_token_id=0, eos_token_id=0))
g = torch.Generator().manual_seed(0)
ids = (torch.randint(0, 32, (128, 1), generator=g) + torch.arange(16)) % 32
data = [{"input_ids": r, "labels": r} for r in ids]
targs = TrainingArguments(output_dir=args.out, max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
                          logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                          disable_tqdm=True, dataloader_num_workers=0)
Trainer(model=model, args=targs, train_dataset=data,
        callbacks=[GradVitalsCallback(args.out, every=4, quiet=True), Drift()]).train()
