"""The output ensemble: the mean of its members' next-token probabilities, also when it
generates (each member with its own KV cache), and when members are weights swapped into one
live model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.study_factory import make_tiny_study


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """Tiny base, s1 and s2 (with a tokenizer) in a folder."""
    root = tmp_path_factory.mktemp("ens")
    make_tiny_study(root)
    return root / "models"


def test_ensemble_is_the_mean_of_the_parents_probabilities(models):
    from transformers import AutoModelForCausalLM

    from evomerge.ensemble import EnsembleForCausalLM

    parents = [AutoModelForCausalLM.from_pretrained(models / s).eval() for s in ("s1", "s2")]
    x = torch.tensor([[2, 5, 7, 9, 11], [3, 4, 8, 8, 20]])
    with torch.no_grad():
        probs = torch.stack([torch.softmax(m(x).logits.double(), -1) for m in parents]).mean(0)
    ens = EnsembleForCausalLM.of_models(parents)
    torch.testing.assert_close(ens(x).logits.double(), probs.log(), rtol=0, atol=1e-5)
    live = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    states = [m.state_dict() for m in parents]
    swap = EnsembleForCausalLM.swapping(live, [lambda s=s: live.load_state_dict(s) for s in states])
    assert torch.equal(swap(x).logits, ens(x).logits)
    # generation on a left-padded batch: positions follow the mask and each member keeps its own
    # KV cache; a duplicated member generates what the model does, two members what greedy
    # decoding of the mean distribution (recomputed in full every step) gives
    x = torch.tensor([[1, 1, 2, 5, 7], [3, 4, 8, 8, 20], [1, 9, 9, 30, 31]])
    mask = (x != 1).long()
    kw = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": 1}
    twice = EnsembleForCausalLM.of_models([parents[0], parents[0]]).generate(input_ids=x, **kw)
    assert torch.equal(twice, parents[0].generate(input_ids=x, **kw))
    seq, m = x, mask
    with torch.no_grad():
        for _ in range(5):
            pos = (m.cumsum(-1) - 1).clamp_min(0)
            p = torch.stack(
                [torch.softmax(mm(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1].double(), -1)
                 for mm in parents]
            ).mean(0)  # fmt: skip
            seq = torch.cat([seq, p.argmax(-1, keepdim=True)], dim=1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(swap.generate(input_ids=x, **kw), seq)


GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{q}}}} A:"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_ensemble_generates_through_lm_eval(models, tmp_path):
    """generate_until through HFLM: an ensemble of one model twice generates what the model
    does (targets = s1's own greedy answers for half the questions), and swapping weights into
    one live model generates what separate members do."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.ensemble import EnsembleForCausalLM
    from evomerge.scoring import Scorer, ScoringSettings
    from tests.study_factory import WORDS

    tok = AutoTokenizer.from_pretrained(models / "s1")
    s1, s2 = (AutoModelForCausalLM.from_pretrained(models / s).eval() for s in ("s1", "s2"))
    rows = []
    for i in range(8):
        q = " ".join(WORDS[3 * i : 3 * i + 3])
        ids = tok(f"Q: {q} A:", return_tensors="pt").input_ids
        gen = s1.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        answer = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append({"q": q, "a": answer if i % 2 == 0 else "nope"})
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tiny_gen.yaml").write_text(GEN_TASK.format(data=tmp_path / "g.jsonl"))
    config = ScoringSettings(tasks=("tiny_gen",), include_paths=(str(tmp_path),), batch_size=4)

    def score(model):
        return Scorer(model, tok, config, fitness=False).score().metrics["tiny_gen"]["exact_match"]

    assert score(s1) == 0.5
    assert score(EnsembleForCausalLM.of_models([s1, s1])) == 0.5
    separate = score(EnsembleForCausalLM.of_models([s1, s2]))
    live = AutoModelForCausalLM.from_pretrained(models / "base").eval()
    states = [s1.state_dict(), s2.state_dict()]
    swap = EnsembleForCausalLM.swapping(live, [lambda s=s: live.load_state_dict(s) for s in states])
    assert score(swap) == separate
