"""Texts -> fixed-length token blocks, and the loss a model gets on them.

Both the trainer (what it trains on) and the coordinator (held-out evaluation) go through these
two functions, so a loss measured on one side means the same thing on the other.

Packing is GPT-style: every text is followed by the tokenizer's eos token, the whole stream is
cut into ``seq_len`` blocks, and only the last block may be short. Its tail is filled with
:data:`PAD` (``-100``, PyTorch's ignore index) rather than a pad token, so one tensor says both
which ids to feed and which positions count, for any tokenizer, whether it has a pad token or
not. Feed ``inputs(blocks)`` to the model and use ``blocks`` itself as the labels.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

PAD = -100  # fills the tail of the last block; ignored by the loss


def pack(tokenizer, texts: Sequence[str], seq_len: int) -> torch.LongTensor:
    """Tokenize ``texts``, append eos to each, concatenate and cut into ``[n_blocks, seq_len]``.

    No token is dropped: a text longer than ``seq_len`` runs on into the next block. Positions
    after the last real token hold :data:`PAD`.
    """
    if isinstance(texts, str):
        raise TypeError("pack() takes a sequence of texts, not one string; wrap it in a list")
    if len(texts) == 0:
        raise ValueError("there are no texts to pack; give at least one")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one input and one target), not {seq_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token, which packing puts between texts")
    # split_special_tokens: a text that happens to contain "<|eos|>" is data, not a separator.
    # verbose=False: long texts are expected here; they are cut into blocks below.
    encoded = tokenizer(
        list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False
    )["input_ids"]
    stream = [tok for ids in encoded for tok in (*ids, eos)]
    n_blocks = -(-len(stream) // seq_len)
    blocks = torch.full((n_blocks * seq_len,), PAD, dtype=torch.long)
    blocks[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    return blocks.view(n_blocks, seq_len)


def inputs(blocks: torch.Tensor) -> torch.Tensor:
    """Model input ids for ``blocks``: padding becomes id 0.

    Padding only ever follows the last real token, so with causal attention what stands there
    never reaches a real prediction.
    """
    return blocks.clamp(min=0)


def n_tokens(blocks: torch.Tensor) -> int:
    """How many real (non-padding) tokens ``blocks`` holds."""
    return int((blocks != PAD).sum())


def loss_sum(model: torch.nn.Module, blocks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the real targets of ``blocks``, and their count.

    A sum rather than a mean so that callers can split a batch into pieces (gradient
    accumulation, evaluation in batches) and still get exactly the whole batch's mean.
    """
    logits = model(input_ids=inputs(blocks)).logits[:, :-1].float()
    targets = blocks[:, 1:]
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=PAD, reduction="sum"
    )
    return total, int((targets != PAD).sum())


def mean_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy, in nats per token, over the real targets of ``blocks``.

    Runs without gradients in eval mode, and leaves the model in the mode it found it in.
    """
    if blocks.dim() != 2 or blocks.numel() == 0:
        shape = tuple(blocks.shape)
        raise ValueError(f"blocks must be a non-empty [n_blocks, seq_len] tensor, not {shape}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in blocks.split(batch_size):
                s, n = loss_sum(model, batch.to(device))
                total += float(s)
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the blocks hold no next-token targets (each block needs 2+ real tokens)")
    return total / count


def epoch_orders(n_blocks: int, seed: int) -> Iterator[torch.Tensor]:
    """The order the trainer visits ``n_blocks`` blocks in, one permutation per epoch, forever.

    Seeded by the task's seed, which the coordinator chose and keeps (``TaskSpec.train.seed``): the
    folder replays it to know which blocks a task trained on last (:func:`most_recent_first`),
    the blocks an honest adapter fits best, where the shard proof reads (coordinator.fold.folder).
    """
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randperm(n_blocks, generator=gen)


def most_recent_first(n_blocks: int, seed: int, epochs: int = 1) -> list[int]:
    """Every block index, the one the trainer's last optimizer step saw first (its last epoch's
    order, reversed): what a trainer of ``n_blocks`` blocks at ``seed`` for ``epochs`` trained
    most recently."""
    orders = epoch_orders(n_blocks, seed)
    last = next(orders)
    for _ in range(max(1, epochs) - 1):
        last = next(orders)
    return last.flip(0).tolist()
