"""The fast training step equals the plain one: losses and gradients to 1e-5 (fp32).

Plain = right-padded rows and the model's full logits. Fast = one padding-free row
with attention kept inside each sequence, each pair's prompt shared by its two
completions, and label log-probs computed from hidden states in chunks.
"""

from __future__ import annotations

import pytest
import torch
from support import make_tiny_llama

from alignkit.config import LoraConfig, ModelConfig, TrainConfig
from alignkit.data.batching import (
    IGNORE,
    feedback_batch,
    flat_batch,
    pack_rows,
    pad_batch,
    pair_batch,
    with_kl_completions,
)
from alignkit.data.tokenize import TokenizedExample, TokenizedFeedback, TokenizedPair
from alignkit.losses.preference import LossParams, PairLogps, combined_loss
from alignkit.models import load_model
from alignkit.train.logps import chunked_logps, sequence_logps
from alignkit.train.sft import sft_batcher, sft_loss_sums

TOL = 1e-5


def random_pairs(seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, 400, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in [(7, 5, 9), (1, 4, 2), (12, 3, 6)]]


def random_examples() -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(1)
    return [
        TokenizedExample(
            torch.randint(3, 400, (n,), generator=g).tolist(), [i >= n // 3 for i in range(n)]
        )
        for n in (9, 5, 13, 7, 4)
    ]


@pytest.fixture(scope="module")
def untied_model_dir(smol_tokenizer, tmp_path_factory):
    """A tiny Llama whose output layer is its own trainable matrix."""
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(smol_tokenizer, tmp_path_factory.mktemp("untied"), seed=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 1.5)
    model.save_pretrained(path)
    return path


def loss_and_grads(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same(a, b) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert torch.allclose(loss_a, loss_b, atol=TOL, rtol=0), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], atol=TOL, rtol=0), name


def dpo_loss(model, batch, chunk: int) -> torch.Tensor:
    sums, counts = sequence_logps(model, batch, chunk)
    n = batch.units
    ref = torch.linspace(-30, -10, 2 * n)
    logps = PairLogps(sums[:n], sums[n:], counts[:n], counts[n:], ref[:n], ref[n:])
    losses, _, _ = combined_loss(logps, ["sigmoid"], [1.0], LossParams(beta=0.5))
    return losses.mean()


def test_chunked_logps_and_gradients_equal_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (11,))
    scale = torch.randn(11)  # a non-uniform upstream gradient

    def plain():
        logp = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
        return (logp.gather(1, targets[:, None])[:, 0] * scale).sum()

    def chunked():
        return (chunked_logps(hidden, weight, bias, targets, chunk=4) * scale).sum()

    for fn in (plain, chunked):
        for t in (hidden, weight, bias):
            t.grad = None
        fn().backward()
        grads = [t.grad.clone() for t in (hidden, weight, bias)]
        if fn is plain:
            expected = grads
    for got, want in zip(grads, expected, strict=True):
        assert torch.allclose(got, want, atol=TOL)
    # a frozen head: the hidden-state gradient is formed in forward and must still agree
    weight.requires_grad_(False), bias.requires_grad_(False)
    hidden.grad = None
    chunked().backward()
    assert torch.allclose(hidden.grad, expected[0], atol=TOL)


def test_shared_layout_puts_each_completion_after_its_prompt():
    pair = TokenizedPair([1, 5, 6], [7, 8], [9])
    batch = pair_batch([pair], pad_id=0, layout="shared")
    assert batch.input_ids[0].tolist() == [1, 5, 6, 7, 8, 6, 9]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3]
    assert batch.labels[0].tolist() == [IGNORE, IGNORE, IGNORE, 7, 8, IGNORE, 9]
    assert batch.owner[0].tolist() == [-1, -1, -1, 0, 0, -1, 1]
    block = batch.blocks[0]
    assert (block.start, block.end, block.shared, block.second) == (0, 7, 2, 5)
    # the rejected branch [6, 9] sees the shared [1, 5] and itself causally, never [6, 7, 8]
    assert block.tail_mask.tolist() == [[True, True, True, False], [True, True, True, True]]


@pytest.mark.parametrize("adapter", ["none", "lora"])
@pytest.mark.parametrize("layout", ["flat", "shared"])
@pytest.mark.parametrize("chunk", [0, 5])
def test_pair_layouts_give_the_plain_loss_and_gradients(untied_model_dir, adapter, layout, chunk):
    config = ModelConfig(name_or_path=str(untied_model_dir), adapter=adapter)
    model = load_model(config, LoraConfig(dropout=0.0), trainable=True)  # as pref trains
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so every LoRA matrix gets a gradient
            param.data.normal_(0, 0.5)
    pairs = random_pairs()
    plain = loss_and_grads(model, lambda: dpo_loss(model, pair_batch(pairs, 0), 0))
    fast = loss_and_grads(model, lambda: dpo_loss(model, pair_batch(pairs, 0, layout), chunk))
    assert_same(plain, fast)
    assert any("lora_A" in name for name in fast[1]) == (adapter == "lora")
    # the model now routes attention through the block function; padded batches still
    # get ordinary masked SDPA there
    assert_same(plain, loss_and_grads(model, lambda: dpo_loss(model, pair_batch(pairs, 0), 0)))


@pytest.mark.parametrize("chunk", [0, 4])
def test_padding_free_sft_gives_the_plain_loss_and_gradients(tiny_model_dir, chunk):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))  # tied, trainable head
    examples = random_examples()

    def mean_loss(batch, chunk):
        loss_sum, count, _ = sft_loss_sums(model, batch, chunk)
        return loss_sum / count

    plain = loss_and_grads(model, lambda: mean_loss(pad_batch(examples, 0), 0))
    assert_same(plain, loss_and_grads(model, lambda: mean_loss(flat_batch(examples), chunk)))
    packed = sft_batcher(TrainConfig(packing=True), 0)(pack_rows(examples, 20))
    assert_same(plain, loss_and_grads(model, lambda: mean_loss(packed, chunk)))


def test_reference_pass_without_gradients_equals_the_plain_sums(untied_model_dir):
    model = load_model(ModelConfig(name_or_path=str(untied_model_dir)))
    pairs = random_pairs(5)
    with torch.no_grad():
        plain = sequence_logps(model, pair_batch(pairs, 0), 0)
        fast = sequence_logps(model, pair_batch(pairs, 0, "shared"), 3)
    for a, b in zip(plain, fast, strict=True):
        assert torch.allclose(a, b, atol=TOL)


def test_padding_free_feedback_gives_the_plain_sums(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    items = with_kl_completions(
        [TokenizedFeedback([1, 5, 6], [7, 8, 2], True), TokenizedFeedback([1, 9], [4, 2], False)],
        [],
    )
    plain = sequence_logps(model, feedback_batch(items, 0, 64), 0)[0]
    fast = sequence_logps(model, feedback_batch(items, 0, 64, flat=True), 4)[0]
    assert torch.allclose(plain, fast, atol=TOL)


def test_padding_free_rows_pass_through_gradient_checkpointing(tiny_model_dir):
    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    examples = random_examples()

    def mean_loss(batch, chunk):
        loss_sum, count, _ = sft_loss_sums(model, batch, chunk)
        return loss_sum / count

    plain = loss_and_grads(model, lambda: mean_loss(pad_batch(examples, 0), 0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert_same(plain, loss_and_grads(model, lambda: mean_loss(flat_batch(examples), 4)))


def test_a_sharded_output_layer_keeps_the_plain_path(tiny_model_dir):
    from alignkit.train.logps import linear_head

    model = load_model(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert linear_head(model) is model.lm_head
    model.lm_head.weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert linear_head(model) is None
