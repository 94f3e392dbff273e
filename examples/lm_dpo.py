"""DPO on a tiny random GPT-2 in under a minute on CPU, nothing downloaded.

    python examples/lm_dpo.py

A word-level tokenizer is built from the example's own sentences, the model is a randomly
initialised GPT-2 from ``GPT2Config``, and a frozen copy of it is the reference. After a few dozen
steps the policy prefers every chosen completion to its rejected one (``rewards/accuracies`` 1.0).
For a real model, load it and its tokenizer with ``from_pretrained`` instead; the loop is the same.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from diffusion_dpo.lm import create_reference_model, preference_step, tokenize_preference_pairs

# (prompt, chosen, rejected): the preferred answer is the kind one.
PAIRS = [
    ("how is the weather", "it is sunny and warm", "go away"),
    ("can you help me", "yes of course i can help", "no i will not"),
    ("thank you", "you are very welcome", "whatever"),
    ("what is two plus two", "two plus two is four", "i do not care"),
    ("tell me a story", "once upon a time a cat was happy", "no stories for you"),
    ("good morning", "good morning to you too", "go away"),
    ("is the cat happy", "yes the cat is happy", "i do not care"),
    ("please be kind", "of course i will be kind", "no i will not"),
]
STEPS = 40
LOG_EVERY = 5


def build_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of ``sentences``; like GPT-2 it has EOS but no pad token."""
    words = sorted({w for s in sentences for w in s.split()})
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


def main() -> None:
    torch.manual_seed(0)
    prompts, chosen, rejected = (list(col) for col in zip(*PAIRS))
    tokenizer = build_tokenizer(prompts + chosen + rejected)

    # A GPT-2-shaped model, tiny and random. Dropout 0 so the log-probs are deterministic (TRL's default).
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    policy = GPT2LMHeadModel(config)
    reference = create_reference_model(policy)  # frozen copy: eval(), requires_grad False
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)

    # One fixed batch: chosen rows [B, T] stacked on rejected rows -> [2B, T], prompts masked with -100.
    batch = tokenize_preference_pairs(tokenizer, prompts, chosen, rejected)
    print(f"{len(PAIRS)} pairs, batch input_ids {tuple(batch['input_ids'].shape)}, vocab {len(tokenizer)}")

    for step in range(1, STEPS + 1):
        loss, metrics = preference_step(policy, batch, ref_model=reference, loss_type="sigmoid", beta=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % LOG_EVERY == 0:
            # .item() syncs with the device, so read the metrics only when printing them.
            shown = ", ".join(f"{k} {v.item():.3f}" for k, v in metrics.items())
            print(f"step {step:3d}: {shown}")


if __name__ == "__main__":
    main()
