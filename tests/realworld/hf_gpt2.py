"""A Hugging Face model trained by a hand-written loop (the "no Trainer" examples):
a tiny GPT-2 built from its config (no download), AdamW, a linear warmup schedule,
gradient clipping, and a padding attention mask that the model turns into a large
negative additive mask internally. Conv1D projections, tied embeddings."""
import random

import torch
from transformers import GPT2Config, GPT2LMHeadModel, get_linear_schedule_with_warmup

rng = random.Random(0)
words = ["the", "cat", "dog", "sat", "ran", "on", "under", "mat", "log", "a", "big", "small"]
text = " ".join(rng.choice(words) for _ in range(2000))
vocab = sorted(set(text))
data = torch.tensor([vocab.index(c) for c in text])
torch.manual_seed(0)
T, B = 24, 8
config = GPT2Config(vocab_size=len(vocab), n_positions=T, n_embd=32, n_layer=2, n_head=2,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(config)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=60)
for step in range(60):
    starts = torch.randint(0, len(data) - T, (B,))
    ids = torch.stack([data[s:s + T] for s in starts])
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # a padded sequence
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad()
    if step % 20 == 0:
        print(f"step {step} loss {out.loss.item():.5f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in model.state_dict().values())))
