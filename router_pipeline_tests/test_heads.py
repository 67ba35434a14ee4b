"""Head routers: frozen encoders + small classifiers, fitted, saved, loaded and served."""

import json

import numpy as np
import pytest

from router_pipeline.routers.features import GemmaSpec, GemmaStates, MiniLM
from router_pipeline.routers.head import Head, HeadRouter, save_head_router
from router_pipeline.training.heads import fit_head
from router_pipeline.policies import AMBIGUOUS, COMPLEX, POLICIES, STANDARD
from router_pipeline.routers.registry import load_router


@pytest.fixture(scope="module")
def labelled(sample_questions):
    """24 real SimpleQA questions, their MiniLM embeddings, and policies in turn."""
    queries = list(sample_questions["query"])
    policies = [POLICIES[i % 3] for i in range(len(queries))]
    return queries, MiniLM().encode(queries), policies


def test_numpy_linear_heads_match_scikit_learn(labelled, tmp_path):
    """Logistic and shrinkage-LDA heads, stored as arrays, give scikit-learn's own
    probabilities, with 3 policies and with 2, also after a save and load."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression

    _, x, policies = labelled
    for labels in (policies, [COMPLEX if p == COMPLEX else STANDARD for p in policies]):  # 3 classes, then 2
        for classifier, hyper, ref in (
                ("logistic", {"c": 0.5}, LogisticRegression(C=0.5, max_iter=3000, class_weight="balanced",
                                                            random_state=0)),
                ("lda", {"shrinkage": 0.7}, LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.7))):
            head = fit_head(classifier, x, labels, **hyper)
            z = (x - head.arrays["mean"]) / head.arrays["scale"]
            expected = ref.fit(z, labels).predict_proba(z)
            head.save(tmp_path / "head.npz")
            for got in (head.proba(x), Head.load(tmp_path / "head.npz", classifier, head.classes, 5).proba(x)):
                for j, c in enumerate(ref.classes_):
                    np.testing.assert_allclose(got[:, POLICIES.index(c)], expected[:, j], atol=1e-6)
                assert np.allclose(got.sum(1), 1)


def test_numpy_knn_head_matches_scikit_learn(labelled):
    from sklearn.neighbors import KNeighborsClassifier

    _, x, policies = labelled
    head = fit_head("knn", x[:16], policies[:16], k=5)
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", weights="distance").fit(x[:16], policies[:16])
    expected = ref.predict_proba(x[16:])
    got = head.proba(x[16:])
    for j, c in enumerate(ref.classes_):
        np.testing.assert_allclose(got[:, POLICIES.index(c)], expected[:, j], atol=1e-5)
    assert np.allclose(head.proba(x[:3])[np.arange(3), [POLICIES.index(p) for p in policies[:3]]], 1)  # exact match


def test_single_class_and_bad_labels():
    x = np.eye(4)
    assert np.allclose(fit_head("logistic", x, [STANDARD] * 4).proba(x), [[1, 0, 0]] * 4)
    with pytest.raises(ValueError, match="unknown policies"):
        fit_head("logistic", x, ["Maybe"] * 4)
    with pytest.raises(ValueError, match="unknown classifier"):
        fit_head("svm", x, [STANDARD] * 4)


def test_the_fewest_blocks_within_one_standard_error_are_chosen():
    """A deeper block whose CV AUC is better by less than the folds' noise does not earn
    its routing cost; one better beyond that noise does. The rule only decides between
    layers: each layer keeps its own best shrinkage."""
    from router_pipeline.training.heads import fit_selected

    rng = np.random.default_rng(0)
    policies = [POLICIES[i % 3] for i in range(300)]
    signal = np.array([p == COMPLEX for p in policies], float)[:, None] * np.eye(6)[0]

    noise = rng.normal(size=signal.shape)
    x = {3: noise + signal, 9: noise + 1.1 * signal, 12: noise + 4 * signal}  # the same rows, more signal
    tried = [{"layer": layer, "shrinkage": s} for layer in (3, 9) for s in (0.1, 0.9)]

    def choose(grid, cost):
        return fit_selected(lambda p: x[p["layer"]], policies, "lda", grid, cv=True, folds=5, seed=0, cost=cost)

    plain_fit = choose(tried, None)
    plain, scored = plain_fit.params, plain_fit.grid
    auc = {(g["layer"], g["shrinkage"]): g["cv_auc"] for g in scored}
    assert plain["layer"] == 9 and max(auc.values()) - max(v for (l, _), v in auc.items() if l == 3) < scored[0]["cv_se"]
    cheap_fit = choose(tried, "layer")
    cheap, cheap_auc = cheap_fit.params, cheap_fit.cv_auc
    assert cheap_auc == max(v for (l, _), v in auc.items() if l == 3) > auc[(3, 0.1)]  # not the layer's first
    assert cheap == {"layer": 3, "shrinkage": 0.9}
    assert choose(tried + [{"layer": 12, "shrinkage": 0.9}], "layer").params["layer"] == 12


def test_calibration_fixes_an_overconfident_head_without_reordering_queries():
    """An overconfident head (LDA on Gemma's states is: P near 0 or 1) is calibrated on
    its out-of-fold predictions: P(Complex_Query) then matches how often queries are
    Complex_Query, the queries keep their order by it (what APGR and the threshold read),
    and a policy absent from the labels keeps P = 0."""
    from router_pipeline.evaluation.metrics import expected_calibration_error
    from router_pipeline.training.heads import fit_calibration
    from router_pipeline.routers.head import p_complex

    rng = np.random.default_rng(0)
    truth = rng.dirichlet([2, 1, 1], size=4000)  # the true P(policy), in POLICIES order
    labels = [POLICIES[rng.choice(3, p=t)] for t in truth]
    raw = truth ** 4 / (truth ** 4).sum(1, keepdims=True)  # the same ranking, far too sure

    def identity_head():  # a linear head whose raw P(policy) on the features log(p) is p
        return Head("logistic", list(POLICIES), {"mean": np.zeros(3), "scale": np.ones(3), "coef": np.eye(3),
                                                 "intercept": np.zeros(3)})

    x = np.log(raw)
    head = fit_calibration(identity_head(), raw, labels)
    np.testing.assert_allclose(head.raw_proba(x), raw, atol=1e-9)
    got, is_complex = head.proba(x), np.array(labels) == COMPLEX
    assert expected_calibration_error(p_complex(raw), is_complex) > 0.08
    assert expected_calibration_error(p_complex(got), is_complex) < 0.03
    assert (np.diff(p_complex(got)[np.argsort(p_complex(raw))]) >= 0).all()  # the same order
    assert np.allclose(got.sum(1), 1)

    never_ambiguous = [STANDARD if p == AMBIGUOUS else p for p in labels]
    head = fit_calibration(identity_head(), raw, never_ambiguous)
    assert np.allclose(head.proba(x)[:, POLICIES.index(AMBIGUOUS)], 0, atol=1e-9)
    assert head.decide(head.proba(x)).count(AMBIGUOUS) == 0

    earlier = identity_head()  # calibrated by an earlier release: one temperature over all policies
    earlier.arrays.update(temperature=np.array(2.0), bias=np.zeros(3), prior=np.full(3, 1 / 3))
    p = np.array([[0.64, 0.16, 0.20]])
    np.testing.assert_allclose(earlier.proba(np.log(p)), [np.sqrt(p[0]) / np.sqrt(p[0]).sum()], atol=1e-9)


def test_saved_head_router_routes_as_the_fitted_head(labelled, tmp_path):
    queries, x, policies = labelled
    head = fit_head("logistic", x, policies, c=1.0)
    path = save_head_router(tmp_path / "logistic", "logistic", {"encoder": "minilm"}, head, params={"c": 1.0})
    (path / "router_calibration.json").write_text(json.dumps({"threshold": 0.4}))
    router = load_router(path)
    assert isinstance(router, HeadRouter) and router.calibration["threshold"] == 0.4
    decisions = router.route_batch(queries[:6])
    expected = head.proba(x[:6])
    for d, row in zip(decisions, expected):
        assert d.parse_ok and d.mode == "head" and d.policy == POLICIES[int(np.argmax(row))]
        assert [d.probabilities[p] for p in POLICIES] == pytest.approx(row.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="without reasoning"):
        router.route(queries[0], with_reasoning=True)
    assert Head.load(path / "head.npz", "logistic", head.classes, 5).arrays.keys() == head.arrays.keys()


def test_broken_head_router_folders_are_refused_clearly(tmp_path):
    (tmp_path / "router.json").write_text('{"kind": "head", "encoder": {"encoder": "minilm"}}')
    with pytest.raises(FileNotFoundError, match="head.npz is missing"):
        load_router(tmp_path)
    (tmp_path / "router.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_router(tmp_path)


def test_a_release_is_checked_against_its_manifest_and_its_encoder(labelled, tmp_path, capsys):
    """Issue 29, 4: every file of a release is hashed in its manifest and checked at load, so a
    head with negated coefficients, classes reordered in router.json or a file added are
    refused naming the file; a head of the wrong width, a cut or a garbage head.npz are
    refused naming head.npz (no traceback, no numpy advice), and `serve` does not start."""
    from router_pipeline.routers.manifest import ReleaseIntegrityError, write_manifest
    from router_pipeline.serve import cli

    queries, x, policies = labelled
    head = fit_head("logistic", x, policies, c=1.0)
    path = save_head_router(tmp_path / "release", "logistic", {"encoder": "minilm"}, head)
    write_manifest(path)
    assert load_router(path).route(queries[0]).parse_ok
    npz, meta = (path / "head.npz").read_bytes(), (path / "router.json").read_text()
    Head("logistic", head.classes, {**head.arrays, "coef": -head.arrays["coef"]}).save(path / "head.npz")
    with pytest.raises(ReleaseIntegrityError, match=r"head\.npz was changed after the release"):
        load_router(path)
    (path / "head.npz").write_bytes(npz)
    (path / "router.json").write_text(meta.replace('"Standard_Query"', '"X"').replace('"Complex_Query"', '"Standard_Query"')
                                      .replace('"X"', '"Complex_Query"'))
    with pytest.raises(ReleaseIntegrityError, match=r"router\.json was changed"):
        load_router(path)
    (path / "router.json").write_text(meta)
    (path / "extra.json").write_text("{}")
    with pytest.raises(ReleaseIntegrityError, match=r"extra\.json was added"):
        load_router(path)
    (path / "extra.json").unlink()
    (path / "manifest.json").unlink()  # unchecked files: the head is still checked against the encoder
    Head("logistic", head.classes, {k: v[..., :100] if v.ndim else v for k, v in head.arrays.items()}).save(
        path / "head.npz")
    with pytest.raises(ValueError, match=r"head\.npz: the head reads 100 features, the encoder gives 384"):
        load_router(path)
    for broken in (npz[: len(npz) // 2], b"garbage" * 10):
        (path / "head.npz").write_bytes(broken)
        with pytest.raises(ValueError, match=r"head\.npz is not a head the pipeline wrote") as err:
            load_router(path)
        assert "allow_pickle" not in str(err.value)
    assert cli.main(["serve", "--adapter", str(path), "--port", "1"]) == 1
    assert "head.npz is not a head the pipeline wrote" in capsys.readouterr().err


def test_gemma_states_read_the_layer_they_name(tiny_model_dir):
    """Truncated to k blocks, the encoder gives the full model's hidden state after block
    k; mean pooling ignores padding (a query encodes the same alone and in a batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    queries = ["Who wrote Hamlet?", "In which year did the third Ballyhooly horse fair close for good?"]
    enc = GemmaStates(GemmaSpec(tiny_model_dir, layer=1, pooling="mean+last"), precision="fp32")
    assert len(enc.model.layers) == 1
    got = enc.encode(queries)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for i, q in enumerate(queries):
        ids = tok(q, return_tensors="pt")
        with torch.no_grad():
            h = full.model(**ids, output_hidden_states=True).hidden_states[1][0]
        np.testing.assert_allclose(got[i], torch.cat([h[1:].mean(0), h[-1]]).numpy(), atol=1e-4)
    np.testing.assert_allclose(enc.encode(queries[:1])[0], got[0], atol=1e-5)
    by_layer = GemmaStates(GemmaSpec(tiny_model_dir, layer=1, pooling="mean+last"), max_layer=2,
                           precision="fp32").encode_layers(queries, [1, 2])
    np.testing.assert_allclose(by_layer[1], got, atol=1e-5)
    with pytest.raises(ValueError, match="has 2 layers"):
        GemmaStates(GemmaSpec(tiny_model_dir, layer=3))


@pytest.fixture(scope="module")
def real_gemma_router(gemma_path, tmp_path_factory):
    """A Gemma head router trained through train_head_routers on the real Gemma 3 270M."""
    import pandas as pd

    from router_pipeline.training.heads import HeadConfig, train_head_routers

    queries = [f"What is {a} times {b}?" for a in range(2, 7) for b in range(3, 9)] + \
              [f"Who was the mayor of the village of Ballyhooly in {y}?" for y in range(1901, 1931)]
    policies = [STANDARD] * 30 + [COMPLEX] * 20 + [AMBIGUOUS] * 10
    examples = pd.DataFrame({"query": queries, "policy": policies})
    cfg = HeadConfig(layers=(3, 9), shrinkages=(0.9,), heads=("gemma",), folds=3)
    (result,) = train_head_routers(examples, cfg, {"gemma": tmp_path_factory.mktemp("heads") / "gemma"},
                                   log=lambda _: None)
    return result


def test_gemma_head_router_on_the_real_model(real_gemma_router):
    """The saved router reads the block it was chosen with and tells apart the two kinds
    of question it was shown."""
    result = real_gemma_router
    assert result.params["layer"] in (3, 9) and 0.5 < result.cv_auc <= 1 and len(result.grid) == 2
    router = load_router(result.path)
    meta = json.loads((result.path / "router.json").read_text())
    assert meta["encoder"]["layer"] == result.params["layer"] and len(router.encoder.model.layers) == result.params["layer"]
    arith, mayor = router.route_batch(["What is 7 times 8?", "Who was the mayor of the village of Ballyhooly in 1950?"])
    assert arith.probabilities[COMPLEX] < mayor.probabilities[COMPLEX]  # the two kinds of question it was shown


def test_exported_fast_path_decides_as_fp32_and_a_stale_export_is_refused(real_gemma_router, sample_questions,
                                                                          tmp_path):
    """Released with its encoder exported, the router decides through the fast path as
    the fp32 reference does on real queries; an export that no longer matches router.json
    (weights replaced, another block, missing) is refused, never used."""
    import shutil

    import torch

    from router_pipeline.routers.features import ExportError
    from router_pipeline.routers.head import export_head_router
    from router_pipeline.routers.contract import RouterConfig

    release = tmp_path / "router"
    shutil.copytree(real_gemma_router.path, release)
    export = export_head_router(release)
    assert export["layers"] == real_gemma_router.params["layer"] and len(export["sha256"]) == 64
    queries = list(sample_questions["query"]) + ["What is 7 times 8?", "Who was the mayor of Ballyhooly in 1950?"]
    fast = load_router(release, RouterConfig(precision="fast"))
    assert fast.encoder.model.embed_tokens.weight.dtype in (torch.bfloat16, torch.float32)
    ref = load_router(release, RouterConfig(precision="fp32"))
    assert ref.encoder.model.embed_tokens.weight.dtype == torch.float32
    got, want = fast.route_batch(queries), ref.route_batch(queries)
    assert [d.policy for d in got] == [d.policy for d in want]
    assert max(abs(a.p_complex - b.p_complex) for a, b in zip(got, want)) < 0.02

    meta = json.loads((release / "router.json").read_text())
    stale = {"weights replaced": {**meta["export"], "sha256": "0" * 64},
             "another block": {**meta["export"], "layers": meta["export"]["layers"] + 1}}
    for what, recorded in stale.items():
        (release / "router.json").write_text(json.dumps({**meta, "export": recorded}))
        with pytest.raises(ExportError, match="stale or was replaced" if what == "weights replaced" else "block"):
            load_router(release)
        load_router(release, RouterConfig(precision="fp32"))  # the reference never reads the export
    (release / "router.json").write_text(json.dumps(meta))
    (release / "encoder" / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="model.safetensors is missing"):
        load_router(release)


def test_token_batches_keep_a_long_query_from_padding_the_short_ones():
    from router_pipeline.routers.features import token_batches

    lengths = [12, 1200, 15, 9, 14, 11]
    batches = token_batches(lengths, batch_size=4, max_tokens=2048)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert [1] in batches  # the long one alone
    assert all(len(b) <= 4 and len(b) * max(lengths[i] for i in b) <= 2048 for b in batches)
    assert token_batches([], 4) == []


def test_a_query_of_many_tokens_is_read_as_its_head_and_tail(tiny_model_dir):
    """1,200 characters of digits are 1,200 tokens: the encoder reads ROUTER_MAX_TOKENS of
    them (head with BOS, and tail), the same state as the model gives on those ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from router_pipeline.routers.prompt import ROUTER_MAX_TOKENS, cut_tokens, router_query

    query = " ".join(str(i) for i in range(1000, 1400))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(router_query(query))["input_ids"]
    assert len(ids) > ROUTER_MAX_TOKENS
    cut = cut_tokens(ids)
    assert len(cut) == ROUTER_MAX_TOKENS and cut[0] == ids[0] and cut[-1] == ids[-1]
    enc = GemmaStates(GemmaSpec(tiny_model_dir, layer=1), precision="fp32")
    got = enc.encode([query, "Who wrote Hamlet?"])
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        h = full.model(input_ids=torch.tensor([cut]), output_hidden_states=True).hidden_states[1][0]
    np.testing.assert_allclose(got[0], h[1:].mean(0).numpy(), atol=1e-4)


def test_minilm_heads_are_saved_with_their_out_of_fold_scores(tmp_path):
    """LDA on MiniLM is trained, saved and routed like the other heads; every
    cross-validated head leaves its calibrated out-of-fold P(Complex_Query) on the same
    folds (the release's evidence), which rank the training rows as its CV AUC says."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from router_pipeline.artifacts import OOF_FILE
    from router_pipeline.training.heads import HeadConfig, train_head_routers

    queries = [f"What is {a} times {b}?" for a in range(2, 7) for b in range(3, 9)] + \
              [f"Who was the mayor of the village of Ballyhooly in {y}?" for y in range(1901, 1931)]
    policies = [STANDARD] * 30 + [COMPLEX] * 20 + [AMBIGUOUS] * 10
    examples = pd.DataFrame({"qid": [f"q{i:03d}" for i in range(60)], "query": queries, "policy": policies})
    cfg = HeadConfig(heads=("minilm_lda", "logistic"), folds=3)
    results = train_head_routers(examples, cfg, {n: tmp_path / n for n in cfg.heads}, log=lambda _: None)
    oof = {r.name: pd.read_csv(r.path / OOF_FILE, dtype={"qid": str}) for r in results}
    for r in results:
        frame = oof[r.name]
        assert list(frame["qid"]) == list(examples["qid"]) and set(frame["fold"]) == {0, 1, 2}
        assert frame["p_complex"].between(0, 1).all()
        assert roc_auc_score(examples["policy"] == COMPLEX, frame["p_complex"]) == pytest.approx(r.cv_auc)
    assert list(oof["minilm_lda"]["fold"]) == list(oof["logistic"]["fold"])  # the same folds: the scores pair up
    lda = next(r for r in results if r.name == "minilm_lda")
    assert json.loads((lda.path / "router.json").read_text())["classifier"] == "lda"
    arith, mayor = load_router(lda.path).route_batch(["What is 7 times 8?",
                                                      "Who was the mayor of the village of Ballyhooly in 1950?"])
    assert arith.probabilities[COMPLEX] < mayor.probabilities[COMPLEX]
