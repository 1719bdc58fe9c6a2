"""Attribution against an independent computation: d(summed logit)/d(per-feature multiplier) at 1,
through a hand-spliced copy of the model; and the ranking's round trip through a real index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import random_adapter_set
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from tca import TcaError
from tca.adapted.attribute import AttributionResult, attribute
from tca.adapted.batches import token_batches
from tca.adapted.splice import adapted_model, set_mode
from tca.cache.harvest import HarvestConfig, harvest
from tca.cache.plan import PlanConfig
from tca.cli import main
from tca.query.attribution import read_attributions, write_attributions
from tca.query.sql import query
from tca.train.adapter import Adapter
from tca.train.checkpoint import AdapterSet, save_adapters

D, F, LAYERS = 64, 12, (0, 1, 2, 3)


def random_set(seed: int = 1) -> AdapterSet:
    return random_adapter_set(F, seed=seed, b_enc=-0.3, dec_scale=0.3, d_model=D, layers=LAYERS)


class ScaledAdapterMLP(nn.Module):
    """base MLP(x) + (s * relu(x W_enc + b_enc)) W_dec + b_dec, with a multiplier s per feature."""

    def __init__(self, base_mlp: nn.Module, ad: Adapter):
        super().__init__()
        self.base_mlp = base_mlp
        self.W_enc, self.b_enc = ad.W_enc.detach().clone(), ad.b_enc.detach().clone()
        self.W_dec, self.b_dec = ad.W_dec.detach().clone(), ad.b_dec.detach().clone()
        self.s = torch.ones(ad.cfg.n_features, requires_grad=True)
        self.acts: torch.Tensor | None = None

    def forward(self, x):
        self.acts = torch.relu(x @ self.W_enc + self.b_enc)
        return self.base_mlp(x) + (self.acts * self.s) @ self.W_dec + self.b_dec


@pytest.fixture(scope="module")
def world(tiny_pair, tiny_data, tmp_path_factory):
    base, target = tiny_pair
    root = tmp_path_factory.mktemp("attribute")
    aset = random_set()
    path = save_adapters(root / "adapters", aset)
    tok = AutoTokenizer.from_pretrained(target)
    batches = token_batches(str(tiny_data), tok, seq_len=64, max_tokens=400, batch=4)
    # The token the target predicts most often (but not everywhere) on these data.
    target_model = AutoModelForCausalLM.from_pretrained(target).eval()
    with torch.no_grad():
        preds = [target_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.argmax(-1) for b in batches]
    real = torch.cat([p[b.attention_mask.bool()] for p, b in zip(preds, batches)])
    token_id = int(real.mode().values)
    return {"base": base, "target": target, "aset": aset, "path": path, "tok": tok, "batches": batches,
            "preds": preds, "token_id": token_id, "data": tiny_data, "root": root}


def reference(world, contrast: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
    """Per layer dL/ds (s = 1) and active counts, with the adapted model spliced by hand; with
    ``contrast`` L subtracts the logit of the target's most likely other token."""
    target_model = AutoModelForCausalLM.from_pretrained(world["target"]).eval()
    model = AutoModelForCausalLM.from_pretrained(world["target"]).eval()
    base = AutoModelForCausalLM.from_pretrained(world["base"]).eval()
    for p in list(model.parameters()) + list(base.parameters()):
        p.requires_grad_(False)
    spliced = {}
    for layer in LAYERS:
        spliced[layer] = ScaledAdapterMLP(base.model.layers[layer].mlp, world["aset"].adapters[layer])
        model.model.layers[layer].mlp = spliced[layer]
    grads = {layer: torch.zeros(F, dtype=torch.float64) for layer in LAYERS}
    active = {layer: torch.zeros(F, dtype=torch.int64) for layer in LAYERS}
    n = 0
    for batch, pred in zip(world["batches"], world["preds"]):
        at = (pred == world["token_id"]) & batch.attention_mask.bool()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        chosen = logits[..., world["token_id"]][at].sum()
        if contrast:
            with torch.no_grad():
                target_logits = target_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            ranked = target_logits.topk(2, dim=-1).indices  # at these positions the first is the token
            chosen = chosen - logits.gather(-1, ranked[..., 1:])[..., 0][at].sum()
        for layer, g in zip(LAYERS, torch.autograd.grad(chosen, [spliced[i].s for i in LAYERS])):
            grads[layer] += g.double()
            active[layer] += (spliced[layer].acts[at] != 0).sum(0)
        n += int(at.sum())
    return grads, active, n


def test_attribution_is_the_derivative_of_a_feature_multiplier(world):
    model = adapted_model(world["target"], world["base"], world["aset"], keep_target=True)
    set_mode(model, "hybrid", [1])  # attribution runs the adapted model whatever the modes, then restores them
    result = attribute(model, world["batches"], world["token_id"])
    grads, active, n = reference(world)
    assert 0 < result.n_positions == n < sum(b.n_tokens for b in world["batches"])
    for layer in LAYERS:
        torch.testing.assert_close(result.scores[layer], grads[layer], rtol=1e-4, atol=1e-4 * grads[layer].abs().max().item())
        assert torch.equal(result.active[layer], active[layer])
    assert any(grads[layer].abs().max() > 1e-2 for layer in LAYERS)  # a check that can fail
    assert [m.mlp.mode for m in model.model.layers] == ["adapted", "hybrid", "adapted", "adapted"]
    assert all(p.requires_grad for p in model.parameters())  # parameters left as they were loaded

    some = attribute(model, world["batches"], world["token_id"], layers=[1, 3])
    assert sorted(some.scores) == [1, 3]
    for layer in (1, 3):
        torch.testing.assert_close(some.scores[layer], result.scores[layer], rtol=1e-6, atol=1e-6)

    ranking = result.ranking()
    assert [r["rank"] for r in ranking] == list(range(1, len(LAYERS) * F + 1))
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores, reverse=True)
    for r in ranking:
        assert r["score"] == pytest.approx(float(grads[r["layer"]][r["feature"]]), rel=1e-4, abs=1e-3)
        assert r["mean_score"] == pytest.approx(r["score"] / n) and r["n_positions"] == n
    assert result.ranking(5) == ranking[:5]


def test_contrastive_attribution_is_the_derivative_of_the_logit_difference(world):
    model = adapted_model(world["target"], world["base"], world["aset"], keep_target=True)
    result = attribute(model, world["batches"], world["token_id"], contrast=True)
    plain = attribute(model, world["batches"], world["token_id"])
    grads, _, n = reference(world, contrast=True)
    assert result.n_positions == n
    for layer in LAYERS:
        torch.testing.assert_close(result.scores[layer], grads[layer], rtol=1e-4, atol=1e-4 * grads[layer].abs().max().item())
    assert any(not torch.allclose(result.scores[layer], plain.scores[layer]) for layer in LAYERS)


def test_attribution_refuses_what_it_cannot_do(world):
    model = adapted_model(world["target"], world["base"], world["aset"])
    with pytest.raises(TcaError, match="keep_target"):
        attribute(model, world["batches"], world["token_id"])
    partial = adapted_model(world["target"], world["base"], {2: world["aset"].adapters[2]}, keep_target=True)
    with pytest.raises(TcaError, match="no adapter at layer 0"):
        attribute(partial, world["batches"], world["token_id"], layers=[0])


# ---- the index ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def index(world) -> Path:
    """A real `tca index` of the adapters over a harvest of the tiny pair."""
    store, out = world["root"] / "store", world["root"] / "index.duckdb"
    harvest(HarvestConfig(base=str(world["base"]), target=str(world["target"]), out=str(store),
                          plan=PlanConfig(data=str(world["data"]), max_tokens=300), device="cpu",
                          block_rows=64, chunk_rows=32))
    res = CliRunner().invoke(main, ["index", "--store", str(store), "--adapters", f"tiny={world['path']}",
                                    "--out", str(out), "--target", str(world["target"])])
    assert res.exit_code == 0, res.output
    return out


def _result(seed: int) -> AttributionResult:
    g = torch.Generator().manual_seed(seed)
    return AttributionResult(
        token_id=5, n_positions=40,
        scores={layer: torch.randn(F, generator=g, dtype=torch.float64) for layer in LAYERS},
        active={layer: torch.randint(0, 40, (F,), generator=g) for layer in LAYERS},
    )


def test_write_attributions_joins_the_features_and_replaces(index):
    first, second, other = _result(0), _result(1), _result(2)
    assert write_attributions(index, "tiny", " Wait", first) == len(LAYERS) * F
    write_attributions(index, "tiny", " So", other)
    joined = query(index, """
        SELECT a.*, f.n_active AS feature_n_active, f.decoder_norm
        FROM attributions a JOIN features f USING (adapter, layer, feature)
        WHERE a.token = ' Wait' ORDER BY a.rank""").to_pylist()
    assert len(joined) == len(LAYERS) * F
    for row, want in zip(joined, first.ranking()):
        assert {k: row[k] for k in want} == pytest.approx(want)
        assert row["adapter"] == "tiny" and row["token"] == " Wait" and row["decoder_norm"] > 0

    write_attributions(index, "tiny", " Wait", second)  # a re-run replaces its rows, keeps the others
    again = read_attributions(index, "tiny", " Wait").to_pylist()
    assert [(r["layer"], r["feature"], r["score"]) for r in again] == \
        [(r["layer"], r["feature"], pytest.approx(r["score"])) for r in second.ranking()]
    assert len(read_attributions(index).to_pylist()) == 2 * len(LAYERS) * F
    assert read_attributions(index, token=" So").to_pylist()[0]["score"] == pytest.approx(other.ranking(1)[0]["score"])

    with pytest.raises(TcaError, match="holds no adapter 'adapters'"):
        write_attributions(index, "adapters", " Wait", first)
    wide = _result(3)
    wide.scores[0] = torch.zeros(F + 1, dtype=torch.float64)
    with pytest.raises(TcaError, match="features"):
        write_attributions(index, "tiny", " Wait", wide)
    with pytest.raises(TcaError, match="not an index file"):
        write_attributions(index.with_name("missing.duckdb"), "tiny", " Wait", first)


def test_cli_attribute_json_and_index(world, index):
    word = world["tok"].convert_ids_to_tokens(world["token_id"]).replace("Ġ", " ")
    args = ["attribute", "--adapters", f"tiny={world['path']}", "--base", str(world["base"]),
            "--target", str(world["target"]), "--data", str(world["data"]), "--device", "cpu",
            "--max-tokens", "400", "--seq-len", "64", "--batch", "4"]
    res = CliRunner().invoke(main, [*args, "--target-token", word, "--top", "5", "--index", str(index), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    grads, _, n = reference(world)
    assert out["token_id"] == world["token_id"] and out["n_positions"] == n and out["rows_written"] == len(LAYERS) * F
    assert len(out["top"]) == 5
    for r in out["top"]:
        assert r["score"] == pytest.approx(float(grads[r["layer"]][r["feature"]]), rel=1e-4, abs=1e-3)
    stored = read_attributions(index, "tiny", word).to_pylist()[:5]
    assert [(r["layer"], r["feature"]) for r in stored] == [(r["layer"], r["feature"]) for r in out["top"]]

    for extra, message in [
        (["--target-token", "Wait"], "not a single token"),
        (["--target-token", word, "--index", str(index.with_name("none.duckdb"))], "not an index file"),
        (["--target-token", word, "--index", str(index), "--adapters", str(world["path"])], "holds no adapter"),
        (["--target-token", word, "--layers", "9"], "out of range"),
    ]:
        res = CliRunner().invoke(main, [*args, *extra])
        assert res.exit_code == 2, res.output
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.stderr, res.stderr
