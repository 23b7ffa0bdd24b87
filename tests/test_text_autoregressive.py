"""The autoregressive baseline (loss, adapter, sampler) and the text evaluation helpers."""

import math

import pytest
import torch
import torch.nn.functional as F

from ditkit.data.tokenizers import CharTokenizer
from ditkit.diffusion.autoregressive import AutoregressiveLM
from ditkit.diffusion.masked import MaskedDiffusion
from ditkit.eval.text import autoregressive_nll, distinct_ngrams, fraction_valid, sampling_throughput, text_likelihood
from ditkit.models.text_dit import build_text_dit
from ditkit.samplers.autoregressive import autoregressive

V = 4


class Bigram:
    """Causal toy: next-token logits depend only on the previous input token (BOS = V)."""

    causal = True

    def __init__(self, seed: int = 0):
        self.table = torch.randn(V + 1, V, generator=torch.Generator().manual_seed(seed))

    def __call__(self, x, t, y=None):
        return self.table[x]  # (B, n, V)


def test_loss_is_exact_next_token_nll_with_bos():
    toy = Bigram()
    obj = AutoregressiveLM(V)
    x = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    terms = obj.loss_terms(toy, x, None)
    logp = torch.log_softmax(toy.table, -1)
    prev = torch.cat([torch.full((3, 1), V), x[:, :-1]], 1)
    manual = -logp[prev, x].sum(1)
    torch.testing.assert_close(terms["nll"], manual)
    torch.testing.assert_close(obj.loss(toy, x, None), manual / 7)
    res = autoregressive_nll(obj, toy, x, num_chars=42)
    assert res.exact and res.stderr_bits_per_char == 0
    assert res.bits_per_char == pytest.approx(float(manual.sum()) / math.log(2) / 42, rel=1e-6)
    assert text_likelihood(obj, toy, x, num_passes=3).bits_per_token == pytest.approx(res.bits_per_char * 42 / 21)


def test_objectives_refuse_the_wrong_attention():
    causal = build_text_dit("TextDiT-T", V, hidden_size=16, depth=1, num_heads=2, causal=True)
    bidir = build_text_dit("TextDiT-T", V, hidden_size=16, depth=1, num_heads=2)
    x = torch.randint(0, V, (2, 5))
    with pytest.raises(ValueError, match="causal=True"):
        AutoregressiveLM(V).loss(bidir, x, None)
    with pytest.raises(ValueError, match="causal=False"):
        MaskedDiffusion(V).loss(causal, x, None)
    assert AutoregressiveLM(V).loss(causal, x, None).shape == (2,)


def test_adapter_crops_to_the_training_window_and_sampler_follows_the_model():
    toy = Bigram(seed=2)
    obj = AutoregressiveLM(V)
    seen = []

    def net(x, t):
        seen.append(x.shape[1])
        return toy(x, t)

    next_token = obj.denoiser(net, context_len=5)
    out = autoregressive(next_token, torch.zeros(2000, 1, dtype=torch.long), 9, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2000, 10) and max(seen) == 5 and seen[0] == 2  # BOS + at most 4 tokens
    # Token frequencies after token 0 follow the bigram row of 0.
    after0 = out[:, 1]
    freq = torch.bincount(after0, minlength=V).double() / len(after0)
    assert (freq - torch.softmax(toy.table[0], -1).double()).abs().max() < 0.03
    greedy = autoregressive(next_token, torch.zeros(1, 0, dtype=torch.long), 3, temperature=0)
    expected, prev = [], V
    for _ in range(3):
        prev = int(toy.table[prev].argmax())
        expected.append(prev)
    assert greedy.tolist() == [expected]
    top1 = autoregressive(next_token, torch.zeros(1, 0, dtype=torch.long), 3, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)


def test_top_k_excludes_the_tail():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    out = autoregressive(lambda x: F.log_softmax(logits, -1).expand(x.shape[0], V), torch.zeros(3000, 0, dtype=torch.long), 1,
                         top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(out.flatten().tolist()) == {0, 1}


def test_validity_diversity_throughput():
    tok = CharTokenizer("0123456789+=")
    sep = tok.sep_id
    rows = [tok.encode("9=") + [sep] + tok.encode("1+2=3") + [sep] + tok.encode("2+2=5") + [sep] + tok.encode("4+")]
    res = fraction_valid(torch.tensor(rows), tok, lambda s: eval(s.split("=")[0]) == int(s.split("=")[1]))
    assert res["fraction_valid"] == 0.5 and res["num_documents"] == 2  # the cut ends are not judged
    assert distinct_ngrams([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert distinct_ngrams(torch.tensor([[1, 1, 1, 1]]), 1) == 0.25
    th = sampling_throughput(lambda: torch.zeros(4, 8))
    assert th["num_tokens"] == 32 and th["tokens_per_s"] > 0
