"""Looks bad, is normal: REINFORCE on a 5-armed contextual bandit. The policy
gradient "loss" -log pi(a|s) * (r - baseline) has no trend (its sign follows the
advantage) even while the average reward climbs."""
import torch
import torch.nn as nn

torch.manual_seed(0)
n_ctx, n_arms = 8, 5
best = torch.randint(0, n_arms, (n_ctx,))
policy = nn.Sequential(nn.Linear(n_ctx, 32), nn.Tanh(), nn.Linear(32, n_arms))
opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
baseline = 0.0
for episode in range(150):
    ctx = torch.randint(0, n_ctx, (32,))
    s = nn.functional.one_hot(ctx, n_ctx).float()
    dist = torch.distributions.Categorical(logits=policy(s))
    a = dist.sample()
    r = (a == best[ctx]).float() + 0.1 * torch.randn(32)
    adv = r - baseline
    baseline = 0.9 * baseline + 0.1 * r.mean().item()
    loss = -(dist.log_prob(a) * adv).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if episode % 30 == 0:
        print(f"episode {episode} reward {r.mean().item():.3f} loss {loss.item():.4f}")
print("CHECKSUM", repr(sum(float(v.double().sum()) for v in policy.state_dict().values())))
