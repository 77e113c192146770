"""Your own training loop on stream_rl's rollouts (docs/own-learner.md).

    python examples/own_learner.py --steps 40 --out runs/own_learner

stream_rl generates, prunes and recycles; this loop owns the model, the
optimizer and the loss: a token-level clipped surrogate against the
engine's own log-probs (the behaviour policy), each rollout weighted by
1/inclusion and normalised by the members before pruning, so that pruning
leaves the gradient unbiased.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from stream_rl import RolloutSource

p = argparse.ArgumentParser()
p.add_argument("--config", default="configs/tiny.yaml")
p.add_argument("--out", default="runs/own_learner")
p.add_argument("--steps", type=int, default=40)
p.add_argument("--set", dest="overrides", action="append", default=[], help="SECTION.KEY=VALUE")
args = p.parse_args()

from stream_rl.config import load_config  # noqa: E402

cfg = load_config(args.config, args.overrides)
model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)

with RolloutSource(cfg, args.out, max_steps=args.steps) as source:
    for batch in source:
        t = batch.to_tensors(pad_id=model.config.pad_token_id or 0)
        if not t:  # every group had equal rewards: nothing to learn from
            continue
        logits = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"]).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, t["input_ids"][:, 1:, None]).squeeze(-1)
        mask = t["response_mask"]
        ratio = torch.exp(logp - t["rollout_logprobs"])  # against the policy that sampled each token
        adv = t["advantages"][:, None]
        surrogate = torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
        _, num_tokens = batch.normalisers()  # tokens before pruning (Horvitz-Thompson)
        loss = -(t["seq_weights"][:, None] * surrogate * mask).sum() / num_tokens
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        version = source.update_weights(model, stats={"loss": loss.item()})
        reward = t["rewards"].mean().item()
        print(f"step {batch.step}: reward {reward:.3f} loss {loss.item():+.4f} serves v{version}", flush=True)
