"""The bundled demo tasks: a vote forecast that a tiny random Llama learns through LoRA on q and v.

Each example shows the votes counted so far as digits ("Which number wins? Votes so far:
3123433") and offers the numbers 1..k as the choices A, B, ...; the answer is the letter of the
number that wins once `hidden_votes` more, unseen, votes are counted (the final count has no
tie). Mostly the leader wins; when the shown count is tied or close the hidden votes decide, so
some examples are genuinely uncertain and a calibrated model says so.

Why the tiny demo model can learn it: the last position can attend to the digits, the value path
can map digit k onto the k-th letter's embedding (tied embeddings make that raise the letter's
logit), and averaging over the votes counts them.

- `demo`: 3 or 4 choices, 8 to 14 shown votes, 1 hidden vote, shown lead at most 3. Hub-like
  splits train / validation / test of `SPLIT_SIZES` rows, each from its own fixed seed.
- `demo_ood`: the shifted variant, test only: 5 choices (answer "E" never occurs in training),
  16 to 24 shown votes, 3 hidden votes, shown lead at most 2.
- `demo_small`: `demo` with only the first `SMALL_TRAIN_SIZE` training rows (validation and test
  as `demo`): the paper's regime in miniature, where a MAP adapter overfits and grows
  over-confident (jobs/configs/demo_study.yaml).
- `demo_shift`: a shift that keeps `demo`'s label space (3 or 4 choices, answers "A".."D"), test
  only: 16 to 24 shown votes, 3 hidden votes, shown lead at most 2. Its OOD AUROC measures the
  model's uncertainty, not the number of choices (which `demo_ood`'s fifth choice gives away).

`demo_tokenizer()` reads characters (every printable ASCII character is one token, so the answer
letters are single tokens), and `demo_model_config(tokenizer)` is the tiny Llama that the demo,
the tests and the benchmarks all build.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `import melora.tasks` stays light
    from transformers import LlamaConfig, PreTrainedTokenizerFast

ANSWERS = ("A", "B", "C", "D")
OOD_ANSWERS = ("A", "B", "C", "D", "E")
SPLIT_SIZES = {"train": 1000, "validation": 300, "test": 500}
OOD_SIZE = 500
SMALL_TRAIN_SIZE = 32
SEEDS = {"train": 0, "validation": 1, "test": 2, "ood": 3, "shift": 4}


@dataclass(frozen=True)
class VoteDistribution:
    """How the examples of one demo variant are drawn."""

    n_choices: tuple[int, ...]  # drawn uniformly from these
    n_votes: tuple[int, int]  # shown votes, inclusive range
    hidden_votes: int  # votes counted for the answer but not shown
    max_lead: int  # largest lead of the shown leader over the runner-up


IN_DISTRIBUTION = VoteDistribution(n_choices=(3, 4), n_votes=(8, 14), hidden_votes=1, max_lead=3)
OUT_OF_DISTRIBUTION = VoteDistribution(n_choices=(5,), n_votes=(16, 24), hidden_votes=3, max_lead=2)
SHIFTED = VoteDistribution(n_choices=(3, 4), n_votes=(16, 24), hidden_votes=3, max_lead=2)


def make_examples(n: int, seed: int, dist: VoteDistribution, prefix: str) -> list[dict[str, Any]]:
    """`n` normalised examples (see `melora.tasks.registry.Example`), the same for the same seed."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        k = rng.choice(dist.n_choices)
        shown = [rng.randrange(k) for _ in range(rng.randint(*dist.n_votes))]
        final = shown + [rng.randrange(k) for _ in range(dist.hidden_votes)]
        lead = _lead(shown, k)
        if _lead(final, k) == 0 or lead > dist.max_lead:
            continue  # a final tie, or a landslide: draw again
        rows.append(
            {
                "id": f"{prefix}-{len(rows)}",
                "question": f"Which number wins? Votes so far: {''.join(str(v + 1) for v in shown)}",
                "context": "",
                "choices": [str(c + 1) for c in range(k)],
                "label": max(range(k), key=final.count),
            }
        )
    return rows


def _lead(votes: list[int], k: int) -> int:
    counts = sorted((votes.count(c) for c in range(k)), reverse=True)
    return counts[0] - counts[1]


def in_distribution(split: str) -> list[dict[str, Any]]:
    """The `demo` task's hub-like split `split` ("train", "validation" or "test")."""
    return make_examples(SPLIT_SIZES[split], SEEDS[split], IN_DISTRIBUTION, split)


def out_of_distribution(split: str = "test") -> list[dict[str, Any]]:
    """The `demo_ood` task's only split, "test"."""
    return make_examples(OOD_SIZE, SEEDS["ood"], OUT_OF_DISTRIBUTION, "ood")


def small_in_distribution(split: str) -> list[dict[str, Any]]:
    """The `demo_small` task: `demo`'s first `SMALL_TRAIN_SIZE` training rows, its other splits whole."""
    rows = in_distribution(split)
    return rows[:SMALL_TRAIN_SIZE] if split == "train" else rows


def shifted(split: str = "test") -> list[dict[str, Any]]:
    """The `demo_shift` task's only split, "test": `demo`'s label space under a shift."""
    return make_examples(OOD_SIZE, SEEDS["shift"], SHIFTED, "shift")


def demo_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level `PreTrainedTokenizerFast`, built in memory (no download).

    Tokens: `<pad>`, `<s>` (BOS, prepended), `</s>`, `<unk>`, then each printable ASCII
    character. Left padding, as the batches need.
    """
    # why here: transformers is slow to import, and the task registry loads without it
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # An empty pattern splits between every two characters: one token per character.
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path="melora-demo-chars",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def demo_model_config(
    tokenizer: Any, hidden_size: int = 64, num_layers: int = 2, initializer_range: float = 0.1
) -> LlamaConfig:
    """The demo's tiny Llama, sized to `tokenizer`, with tied input and output embeddings.

    `initializer_range` is 0.1, not Llama's 0.02: with tied embeddings a logit is the final
    hidden state (RMS-normalised, norm about sqrt(hidden_size)) dotted with a token embedding,
    and embeddings drawn with std 0.02 keep every logit gap near 1, too small for the model to
    ever be confident.

    Measured with LoRA r 8 / alpha 16 on q_proj and v_proj only, AdamW lr 2e-3, batch 32,
    20 warm-up steps then linear decay, seed 0, one CPU thread (about 20 steps per second):

    - 200 steps: test accuracy 0.89-0.90 (picking the shown leader scores 0.89), `demo_ood`
      0.53-0.56; under-confident in distribution (mean confidence 0.77, ECE 0.12).
    - 600 steps: test 0.89, ECE 0.05; `demo_ood` 0.62 at confidence 0.70 (ECE 0.10):
      calibrated in distribution, over-confident under the shift.
    """
    from transformers import LlamaConfig  # why here: slow to import; only the demo model needs it

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
