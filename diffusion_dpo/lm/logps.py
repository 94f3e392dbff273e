"""Sequence log-probs of completions under a causal LM, and the tokenisation that masks prompts.

The convention (docs/objectives.md#notation): ``log π(y|x)`` is the **sum** of the completion tokens' log-probs;
prompt and padding tokens carry the label ``-100`` and count for nothing. IPO (as TRL computes it),
SimPO and ORPO use the per-token **average** instead (``average=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor

IGNORE_INDEX = -100


def _token_logps(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-token ``log p(label)`` ``[B, T-1]`` float32 and the completion mask ``[B, T-1]`` bool."""
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape [B, T, V], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must have shape [B, T] = {tuple(logits.shape[:2])} to match logits, got {tuple(labels.shape)}"
        )
    # Causal LM: the logits at position t predict the token at t + 1.
    logits = logits[:, :-1, :]  # [B, T-1, V] (a view)
    labels = labels[:, 1:]  # [B, T-1]
    mask = labels != ignore_index
    index = torch.where(mask, labels, torch.zeros_like(labels)).unsqueeze(-1)  # any valid id; masked below
    # log p = logit[label] − logsumexp(logits), in float32, one sequence at a time: this never builds
    # the full [B, T-1, V] log_softmax (nor keeps it for backward), only one [T-1, V] temporary.
    rows = []
    for row_logits, row_index in zip(logits, index):
        row_logits = row_logits.float()  # no copy when the model already returns float32
        rows.append(row_logits.gather(-1, row_index).squeeze(-1) - row_logits.logsumexp(-1))
    token_logps = torch.stack(rows)  # [B, T-1]
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)), mask


def sequence_logps(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, average: bool = False
) -> Tensor:
    """Log-prob of each sequence's completion tokens under a causal LM.

    Args:
        logits: ``[B, T, V]`` model outputs (any float dtype; the arithmetic is float32).
        labels: ``[B, T]`` token ids aligned with the *inputs* (as :func:`tokenize_pairs` builds them),
            ``ignore_index`` on prompt and padding positions. Shifted by one here.
        ignore_index: label value that marks positions to leave out.
        average: if True, divide each sum by its number of completion tokens (per-token average, for
            IPO, SimPO, ORPO); a row with no completion token then gives 0 rather than NaN.

    Returns:
        ``[B]`` float32: ``Σ_t log p(y_t | x, y_<t)`` over completion tokens (or its mean).
    """
    token_logps, mask = _token_logps(logits, labels, ignore_index)
    total = token_logps.sum(-1)
    if not average:
        return total
    return total / mask.sum(-1).clamp(min=1)


def completion_token_counts(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Number of scored tokens per sequence ``[B]`` (labels ``[B, T]``; the first position is never scored)."""
    return (labels[:, 1:] != ignore_index).sum(-1)


def _pad_token_id(tokenizer) -> int:
    # GPT-2 and many other causal LMs ship without a pad token. Which id fills the padding does not
    # matter here (attention_mask is 0 and the label -100 there), so fall back to EOS without
    # modifying the caller's tokenizer.
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; set tokenizer.pad_token")


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict[str, Tensor]:
    """Tokenise (prompt, completion) pairs into one right-padded causal-LM batch.

    Prompt and completion are tokenised separately (``add_special_tokens=False``, as TRL does for
    decoder-only models) and concatenated, so the boundary between them is exact; put BOS or a chat
    template into the prompt text if the model expects one. The tokenizer's EOS is appended to each
    completion when ``add_eos``. Works with any Hugging Face tokenizer, including ones without a pad
    token (GPT-2): padding then uses the EOS id, masked out either way.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        prompts: ``B`` prompt strings.
        completions: ``B`` completion strings.
        max_length: if set, each sequence is cut to this many tokens from the right (the prompt is kept
            whole); a row whose completion is cut away entirely is an error.
        add_eos: append ``tokenizer.eos_token_id`` to every completion.

    Returns:
        ``input_ids`` ``[B, T]`` long, ``attention_mask`` ``[B, T]`` long (1 on real tokens), and
        ``labels`` ``[B, T]`` long: the input ids on completion tokens, ``-100`` on prompt and padding.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions differ in length: {len(prompts)} vs {len(completions)}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; need at least one (prompt, completion) pair")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id; pass add_eos=False")
    pad_id = _pad_token_id(tokenizer)
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]

    rows, row_labels = [], []
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        c = c + [tokenizer.eos_token_id] if add_eos else c
        ids = (p + c)[:max_length] if max_length is not None else p + c
        n_completion = len(ids) - len(p)
        if n_completion <= 0:
            raise ValueError(
                f"row {i}: no completion token left (prompt has {len(p)} tokens, completion {len(c)}, "
                f"max_length={max_length}); raise max_length or shorten the prompt"
            )
        rows.append(ids)
        row_labels.append([IGNORE_INDEX] * len(p) + ids[len(p) :])

    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, row_labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenize_preference_pairs(
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    *,
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict[str, Tensor]:
    """A paired batch for :func:`diffusion_dpo.lm.concatenated_forward`.

    Rows ``0..B-1`` hold (prompt, chosen), rows ``B..2B-1`` (prompt, rejected), all padded to one
    length: ``input_ids``, ``attention_mask``, ``labels``, each ``[2B, T]`` (see :func:`tokenize_pairs`).
    """
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(
            f"prompts, chosen and rejected differ in length: {len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    return tokenize_pairs(
        tokenizer, list(prompts) * 2, list(chosen) + list(rejected), max_length=max_length, add_eos=add_eos
    )


def tokenize_kto_batch(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    desirable: Sequence[bool],
    *,
    max_length: int | None = None,
    add_eos: bool = True,
) -> dict[str, Tensor]:
    """An unpaired KTO batch plus its mismatched pairs for the KL estimate (arXiv 2402.01306, §4.2).

    The mismatched pairs put prompt ``i`` with completion ``(i + 1) mod B`` (completions rotated by
    one), so every mismatched completion answers another prompt of the same batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` for the real pairs; ``desirable``
        ``[B]`` bool; ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels`` ``[B, T']`` for the
        mismatched pairs.
    """
    if not (len(prompts) == len(completions) == len(desirable)):
        raise ValueError(
            f"prompts, completions and desirable differ in length: "
            f"{len(prompts)}, {len(completions)}, {len(desirable)}"
        )
    if len(prompts) < 2:
        raise ValueError(
            f"KTO's KL estimate needs at least 2 examples per batch to mismatch, got {len(prompts)}"
        )
    batch = tokenize_pairs(tokenizer, prompts, completions, max_length=max_length, add_eos=add_eos)
    rotated = list(completions[1:]) + list(completions[:1])  # rotated[i] = completions[(i + 1) % B]
    kl = tokenize_pairs(tokenizer, prompts, rotated, max_length=max_length, add_eos=add_eos)
    batch["desirable"] = torch.tensor([bool(d) for d in desirable], dtype=torch.bool)
    batch.update({f"kl_{k}": v for k, v in kl.items()})
    return batch
