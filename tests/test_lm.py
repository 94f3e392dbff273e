"""The LM side of the preference core: log-probs, tokenisation, forwards, steps, and DPO training."""

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from diffusion_dpo.lm import (
    concatenated_forward,
    create_reference_model,
    kto_kl_estimate,
    kto_step,
    preference_step,
    reference_logps,
    sequence_logps,
    tokenize_kto_batch,
    tokenize_pairs,
    tokenize_preference_pairs,
)
from diffusion_dpo.losses import dpo_loss, kto_loss, orpo_loss, simpo_loss

LN2, LN3 = math.log(2.0), math.log(3.0)
WORDS = ["<unk>", "<eos>", "a", "b", "c", "d", "e", "f", "g"]  # ids 0..8


def word_tokenizer(words=WORDS, **special) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``words`` (ids in list order); like GPT-2, EOS but no pad token."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", **special)


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(config)


def forward_logps(model, batch, average=False):
    """Independent path: a plain forward on one tokenised batch, then sequence_logps."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["labels"], average=average)


PROMPTS = ["a b", "c", "a c d"]
CHOSEN = ["d", "e f g", "b"]
REJECTED = ["e f", "g", "b c d e"]


# ---------------------------------------------------------------- sequence_logps


def hand_example():
    """Logits [2, 4, 3] and labels [2, 4] whose completion log-probs are derived by hand.

    Row 0: prompt of 2 tokens, completion labels 2, 1 at positions 2, 3. They are predicted by the
    logits at positions 1 and 2: [ln2, 0, 0] -> softmax (1/2, 1/4, 1/4), log p(2) = −2 ln2;
    [0, 0, 0] -> log p(1) = −ln3. Sum −2ln2 − ln3, average (−2ln2 − ln3)/2.
    Row 1: prompt of 1 token, completion labels 0, 2 at positions 1, 2, padding at 3. Logits at 0:
    [ln2, 0, 0] -> log p(0) = −ln2; at 1: [0, 0, ln2] -> log p(2) = −ln2. Sum −2ln2, average −ln2.
    Every other position holds junk logits that would change the result if they were used.
    """
    junk = [50.0, -7.0, 3.0]
    logits = torch.tensor(
        [
            [junk, [LN2, 0.0, 0.0], [0.0, 0.0, 0.0], junk],
            [[LN2, 0.0, 0.0], [0.0, 0.0, LN2], junk, junk],
        ]
    )
    labels = torch.tensor([[-100, -100, 2, 1], [-100, 0, 2, -100]])
    return logits, labels


def test_sequence_logps_hand_computed():
    logits, labels = hand_example()
    out = sequence_logps(logits, labels)
    torch.testing.assert_close(out, torch.tensor([-2 * LN2 - LN3, -2 * LN2]))
    assert out.dtype == torch.float32 and out.shape == (2,)


def test_sequence_logps_average():
    logits, labels = hand_example()
    out = sequence_logps(logits, labels, average=True)
    torch.testing.assert_close(out, torch.tensor([(-2 * LN2 - LN3) / 2, -LN2]))


def test_sequence_logps_matches_log_softmax_loop_and_computes_in_float32():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))
    labels[0, :3] = -100
    labels[2, 4:] = -100
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(1, 6):
            if labels[b, t] != -100:
                expected[b] += torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]].float()
    torch.testing.assert_close(sequence_logps(logits, labels), expected)
    low = sequence_logps(logits.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, sequence_logps(logits.bfloat16().float(), labels))


def test_sequence_logps_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="labels must have shape"):
        sequence_logps(torch.zeros(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        sequence_logps(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------- tokenisation


def test_tokenize_pairs_masks_prompt_and_padding_without_pad_token():
    tok = word_tokenizer()
    assert tok.pad_token_id is None  # GPT-2-like
    batch = tokenize_pairs(tok, ["a b", "c"], ["d", "e f g"])
    # row 0: prompt [a b] = [2, 3], completion [d] + EOS = [5, 1], then one pad (EOS id 1, masked)
    # row 1: prompt [c] = [4], completion [e f g] + EOS = [6, 7, 8, 1]
    assert batch["input_ids"].tolist() == [[2, 3, 5, 1, 1], [4, 6, 7, 8, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # The completion's EOS is scored, the padding EOS (same id) is not: masking is by position.
    assert batch["labels"].tolist() == [[-100, -100, 5, 1, -100], [-100, 6, 7, 8, 1]]
    assert tok.pad_token_id is None  # the caller's tokenizer is left alone


def test_tokenize_pairs_uses_pad_token_and_truncates():
    tok = word_tokenizer(pad_token="<unk>")
    batch = tokenize_pairs(tok, ["a b", "c"], ["d", "e f g"], max_length=3, add_eos=False)
    assert batch["input_ids"].tolist() == [[2, 3, 5], [4, 6, 7]]
    assert batch["labels"].tolist() == [[-100, -100, 5], [-100, 6, 7]]
    batch = tokenize_pairs(tok, ["a", "c"], ["d", "e f g"], add_eos=False)
    assert batch["input_ids"].tolist() == [[2, 5, 0, 0], [4, 6, 7, 8]]  # padded with <unk> = 0
    with pytest.raises(ValueError, match="row 0: no completion token left"):
        tokenize_pairs(tok, ["a b", "c"], ["d", "e"], max_length=2)


def test_tokenize_preference_pairs_stacks_chosen_on_rejected():
    tok = word_tokenizer()
    batch = tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    expected = tokenize_pairs(tok, PROMPTS + PROMPTS, CHOSEN + REJECTED)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[key], expected[key])
    assert batch["input_ids"].shape[0] == 6


def test_tokenize_kto_batch_rotates_completions_and_needs_two_rows():
    tok = word_tokenizer()
    batch = tokenize_kto_batch(tok, PROMPTS, CHOSEN, [True, False, True])
    rotated = tokenize_pairs(tok, PROMPTS, [CHOSEN[1], CHOSEN[2], CHOSEN[0]])
    assert torch.equal(batch["kl_input_ids"], rotated["input_ids"])
    assert torch.equal(batch["kl_labels"], rotated["labels"])
    assert batch["desirable"].tolist() == [True, False, True]
    with pytest.raises(ValueError, match="at least 2 examples"):
        tokenize_kto_batch(tok, ["a"], ["b"], [True])


# ---------------------------------------------------------------- forwards


def test_concatenated_forward_equals_two_separate_forwards():
    tok = word_tokenizer()
    model = tiny_gpt2(len(WORDS))
    # Chosen and rejected are padded to different lengths on their own, to one length when stacked.
    chosen_batch = tokenize_pairs(tok, PROMPTS, CHOSEN)
    rejected_batch = tokenize_pairs(tok, PROMPTS, REJECTED)
    assert chosen_batch["input_ids"].shape[1] != rejected_batch["input_ids"].shape[1]
    with torch.no_grad():
        chosen, rejected, extras = concatenated_forward(
            model, tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
        )
        torch.testing.assert_close(chosen, forward_logps(model, chosen_batch), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rejected, forward_logps(model, rejected_batch), atol=1e-5, rtol=1e-5)
    # completion tokens incl. EOS: d+1, efg+1, b+1 / ef+1, g+1, bcde+1
    assert extras["chosen_num_tokens"].tolist() == [2, 4, 2]
    assert extras["rejected_num_tokens"].tolist() == [3, 2, 5]


def test_concatenated_forward_rejects_odd_batch():
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="stack chosen on rejected"):
        concatenated_forward(tiny_gpt2(len(WORDS)), tokenize_pairs(tok, PROMPTS, CHOSEN))


def test_peft_disabled_adapter_reference_equals_base_model():
    from peft import LoraConfig, get_peft_model

    tok = word_tokenizer()
    batch = tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    base = tiny_gpt2(len(WORDS))
    base_copy = copy.deepcopy(base)
    policy = get_peft_model(
        base, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    )
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at 0; make the adapter change the model
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)

    ref_c, ref_r = reference_logps(policy, batch)
    with torch.no_grad():
        base_c, base_r, _ = concatenated_forward(base_copy, batch)
        pol_c, pol_r, _ = concatenated_forward(policy, batch)
    torch.testing.assert_close(ref_c, base_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_r, base_r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pol_c, base_c, atol=1e-3)  # the adapter is on again outside the context
    assert not ref_c.requires_grad

    loss, _ = preference_step(policy, batch, beta=0.1)
    expected, _, _ = dpo_loss(pol_c, pol_r, base_c, base_r, beta=0.1)
    torch.testing.assert_close(loss.detach(), expected.mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g is not None for n, g in grads.items())


def test_reference_none_without_peft_is_an_error():
    tok = word_tokenizer()
    batch = tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    with pytest.raises(ValueError, match="not a peft.PeftModel"):
        preference_step(tiny_gpt2(len(WORDS)), batch)


# ---------------------------------------------------------------- KTO


class FakeAccelerator:
    """Stands in for accelerate.Accelerator: other processes pushed the mean up by 1."""

    def __init__(self):
        self.calls = []

    def reduce(self, tensor, reduction="sum"):
        self.calls.append(reduction)
        return tensor + 1.0


def test_kto_kl_uses_rotated_pairs_without_gradient():
    tok = word_tokenizer()
    policy, ref = tiny_gpt2(len(WORDS), seed=0), tiny_gpt2(len(WORDS), seed=1)
    batch = tokenize_kto_batch(tok, PROMPTS, CHOSEN, [True, False, True])
    kl = kto_kl_estimate(policy, batch, ref_model=ref)
    assert kl.shape == () and not kl.requires_grad and kl.grad_fn is None

    with torch.no_grad():
        mismatched, matched = [], []
        for i in range(3):
            for pairs, completion in ((mismatched, CHOSEN[(i + 1) % 3]), (matched, CHOSEN[i])):
                one = tokenize_pairs(tok, [PROMPTS[i]], [completion])
                pairs.append(forward_logps(policy, one) - forward_logps(ref, one))
    torch.testing.assert_close(kl, torch.cat(mismatched).mean(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(kl, torch.cat(matched).mean(), atol=1e-3)

    accelerator = FakeAccelerator()
    reduced = kto_kl_estimate(policy, batch, ref_model=ref, accelerator=accelerator)
    assert accelerator.calls == ["mean"]
    torch.testing.assert_close(reduced, kl + 1.0)


def test_kto_step_at_initialisation_is_half_per_example():
    # policy = reference, so r = 0 and KL = 0: desirable rows cost λD·(1 − σ(0)) = 0.5·λD, undesirable
    # rows 0.5·λU. With λD = 1, λU = 2 and desirable [T, F, T]: mean(0.5, 1.0, 0.5) = 2/3.
    tok = word_tokenizer()
    policy = tiny_gpt2(len(WORDS))
    batch = tokenize_kto_batch(tok, PROMPTS, CHOSEN, [True, False, True])
    loss, metrics = kto_step(
        policy, batch, ref_model=create_reference_model(policy), desirable_weight=1.0, undesirable_weight=2.0
    )
    torch.testing.assert_close(loss, torch.tensor(2.0 / 3.0))
    torch.testing.assert_close(metrics["kl"], torch.tensor(0.0))
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0


def test_kto_step_matches_kto_loss_on_independent_logps():
    tok = word_tokenizer()
    policy, ref = tiny_gpt2(len(WORDS), seed=0), tiny_gpt2(len(WORDS), seed=1)
    desirable = [True, False, False]
    batch = tokenize_kto_batch(tok, PROMPTS, REJECTED, desirable)
    loss, metrics = kto_step(policy, batch, ref_model=ref, beta=0.5)
    with torch.no_grad():
        pol, rf = forward_logps(policy, batch), forward_logps(ref, batch)
        kl_batch = {k[3:]: v for k, v in batch.items() if k.startswith("kl_")}
        kl = (forward_logps(policy, kl_batch) - forward_logps(ref, kl_batch)).mean()
    expected, rewards = kto_loss(pol, rf, torch.tensor(desirable), kl, beta=0.5)
    torch.testing.assert_close(loss.detach(), expected.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["kl"], kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], rewards[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["rewards/rejected"], rewards[1:].mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["logps/rejected"], pol[1:].mean(), atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in ref.parameters())


# ---------------------------------------------------------------- preference_step


def test_preference_step_metrics_at_initialisation():
    # policy = reference: DPO loss ln 2, every reward 0, every pair a tie (accuracy 0.5).
    tok = word_tokenizer()
    policy = tiny_gpt2(len(WORDS))
    batch = tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    loss, metrics = preference_step(policy, batch, ref_model=create_reference_model(policy))
    assert loss.requires_grad and loss.shape == ()
    torch.testing.assert_close(loss.detach(), torch.tensor(LN2))
    expected_keys = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
    assert set(metrics) == expected_keys
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())
    assert metrics["rewards/accuracies"] == 0.5 and metrics["rewards/margins"] == 0
    with torch.no_grad():
        chosen = forward_logps(policy, tokenize_pairs(tok, PROMPTS, CHOSEN))
    torch.testing.assert_close(metrics["logps/chosen"], chosen.mean(), atol=1e-5, rtol=1e-5)


def test_ipo_uses_per_token_averaged_logps():
    tok = word_tokenizer()
    policy, ref = tiny_gpt2(len(WORDS), seed=0), tiny_gpt2(len(WORDS), seed=1)
    batch = tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    loss, metrics = preference_step(policy, batch, ref_model=ref, loss_type="ipo", beta=0.1)
    with torch.no_grad():
        c, r = tokenize_pairs(tok, PROMPTS, CHOSEN), tokenize_pairs(tok, PROMPTS, REJECTED)
        avg = [forward_logps(m, b, average=True) for m in (policy, ref) for b in (c, r)]
        summed = [forward_logps(m, b) for m in (policy, ref) for b in (c, r)]
    expected, _, _ = dpo_loss(*avg, beta=0.1, loss_type="ipo")
    with_sums, _, _ = dpo_loss(*summed, beta=0.1, loss_type="ipo")
    torch.testing.assert_close(loss.detach(), expected.mean(), atol=1e-4, rtol=1e-5)
    assert not torch.allclose(loss.detach(), with_sums.mean(), rtol=1e-2)
    torch.testing.assert_close(metrics["logps/chosen"], avg[0].mean(), atol=1e-5, rtol=1e-5)


def test_simpo_and_orpo_are_reference_free_on_averaged_logps():
    tok = word_tokenizer()
    policy = tiny_gpt2(len(WORDS))
    batch = tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    with torch.no_grad():
        c = forward_logps(policy, tokenize_pairs(tok, PROMPTS, CHOSEN), average=True)
        r = forward_logps(policy, tokenize_pairs(tok, PROMPTS, REJECTED), average=True)

    loss, metrics = preference_step(policy, batch, loss_type="simpo", beta=2.0, simpo_gamma_beta_ratio=0.5)
    expected, _, _ = simpo_loss(c, r, beta=2.0, gamma_beta_ratio=0.5)
    torch.testing.assert_close(loss.detach(), expected.mean(), atol=1e-5, rtol=1e-5)

    loss, metrics = preference_step(policy, batch, loss_type="orpo", beta=0.1)
    expected, _, _ = orpo_loss(c, r, -c, lam=0.1)
    torch.testing.assert_close(loss.detach(), expected.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["nll_loss"], -c.mean(), atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="reference-free"):
        preference_step(policy, batch, ref_model=policy, loss_type="simpo")


def test_preference_step_rejects_bad_arguments():
    tok = word_tokenizer()
    policy = tiny_gpt2(len(WORDS))
    batch = tokenize_preference_pairs(tok, PROMPTS, CHOSEN, REJECTED)
    ref = create_reference_model(policy)
    with pytest.raises(ValueError, match="kto_step"):
        preference_step(policy, batch, ref_model=ref, loss_type="kto")
    with pytest.raises(ValueError, match="not supported"):
        preference_step(policy, batch, ref_model=ref, loss_type="dpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_step(policy, batch, ref_model=ref, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="batch is missing"):
        preference_step(policy, {"input_ids": batch["input_ids"]}, ref_model=ref)


# ---------------------------------------------------------------- training


TRAIN_PAIRS = [
    ("a b", "c d", "e f"),
    ("b c", "d e", "g a"),
    ("c", "a a b", "f f g"),
    ("d e f", "b", "g"),
    ("g", "c c", "e e"),
    ("a", "d", "f g a"),
    ("e", "b c d", "a"),
    ("f a", "c", "b b"),
]


def test_dpo_training_learns_the_preferences_and_leaves_the_reference_frozen(tmp_path):
    # Build, save and reload the way a user loads a real checkpoint.
    word_tokenizer().save_pretrained(tmp_path / "tok")
    tiny_gpt2(len(WORDS)).save_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    reference = create_reference_model(policy)
    prompts, chosen, rejected = (list(col) for col in zip(*TRAIN_PAIRS))
    batch = tokenize_preference_pairs(tok, prompts, chosen, rejected)

    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy_before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(30):
        loss, _ = preference_step(policy, batch, ref_model=reference, loss_type="sigmoid", beta=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        loss, metrics = preference_step(policy, batch, ref_model=reference)
    assert metrics["rewards/accuracies"] >= 0.9
    assert metrics["rewards/margins"] > 0 and loss < LN2
    assert all(torch.equal(v, ref_before[k]) for k, v in reference.state_dict().items())
    assert all(p.grad is None for p in reference.parameters())
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(p, policy_before[n])]
    assert unchanged == []
