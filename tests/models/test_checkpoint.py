"""Reading users' checkpoints: XLM training checkpoints, format detection, refusals, safe writes."""

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from conformance.cli import main
from pkm_models import get_preset, make_weights
from pkm_models.checkpoint import read_checkpoint
from pkm_models.convert import ConversionError, convert_checkpoint, save_checkpoint
from pkm_models.torch_pkm import HashingMemory, PKMStack

DIM, K_DIM, HEADS, N_KEYS, KNN = 16, 8, 2, 8, 3
TINY = get_preset("tiny").config
CASES = Path(__file__).resolve().parents[2] / "conformance" / "cases"


# --- an XLM checkpoint, built the way XLM's trainer saves one ------------------------------
def xlm_memory_tensors(seed: int, *, batchnorm=True, bias=True, different_keys=True) -> dict[str, torch.Tensor]:
    """One memory's parameters under XLM's names (HashingMemoryProduct + QueryMLP)."""
    g = torch.Generator().manual_seed(seed)
    half = K_DIM // 2
    t = {}
    if different_keys:
        t["keys"] = torch.rand(HEADS, 2, N_KEYS, half, generator=g) * 2 - 1
    else:
        t["keys"] = torch.rand(N_KEYS, half, generator=g) * 2 - 1
    t["values.weight"] = torch.randn(N_KEYS**2, DIM, generator=g) * DIM**-0.5
    t["query_proj.query_mlps.0.weight"] = torch.randn(HEADS * K_DIM, DIM, generator=g) * DIM**-0.5
    if bias:
        t["query_proj.query_mlps.0.bias"] = torch.randn(HEADS * K_DIM, generator=g) * 0.1
    if batchnorm:
        t["query_proj.query_mlps.1.weight"] = torch.rand(HEADS * K_DIM, generator=g) + 0.5
        t["query_proj.query_mlps.1.bias"] = torch.randn(HEADS * K_DIM, generator=g) * 0.2
        t["query_proj.query_mlps.1.running_mean"] = torch.randn(HEADS * K_DIM, generator=g) * 0.2
        t["query_proj.query_mlps.1.running_var"] = torch.rand(HEADS * K_DIM, generator=g) + 0.25
        t["query_proj.query_mlps.1.num_batches_tracked"] = torch.tensor(1000)
    return t


def xlm_params(**changes) -> dict:
    params = {
        "emb_dim": DIM,
        "n_layers": 6,
        "use_memory": True,
        "mem_implementation": "pq_fast",
        "mem_enc_positions": [(4, "after"), (1, "in"), (4, "in")],
        "mem_dec_positions": [],
        "mem_k_dim": K_DIM,
        "mem_v_dim": -1,
        "mem_heads": HEADS,
        "mem_knn": KNN,
        "mem_n_keys": N_KEYS,
        "mem_query_layer_sizes": [0, 0],
        "mem_query_bias": True,
        "mem_query_batchnorm": True,
        "mem_use_different_keys": True,
        "mem_share_values": False,
        "mem_score_softmax": True,
        "mem_temperature": 1.0,
        "mem_keys_learn": True,
        "mem_input_dropout": 0.1,
        "mem_query_dropout": 0.0,
        "mem_value_dropout": 0.0,
    }
    params.update(changes)
    return params


def xlm_checkpoint(params=None, **memory_options) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(what torch.save gets, the raw memories by XLM name)."""
    memories = {name: xlm_memory_tensors(i, **memory_options) for i, name in enumerate(["4_after", "1_in", "4_in"])}
    model = {
        "module.embeddings.weight": torch.randn(40, DIM),
        "module.position_embeddings.weight": torch.randn(64, DIM),
        "module.ffns.0.lin1.weight": torch.randn(4 * DIM, DIM),
    }
    for name, tensors in memories.items():
        for sub, tensor in tensors.items():
            model[f"module.memories.{name}.{sub}"] = tensor
    data = {
        "epoch": 3,
        "n_total_iter": 1234,
        "best_metrics": {"valid_en_mlm_ppl": 12.5},
        "model": model,
        "model_optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1, 2]}]},
        "dico_id2word": {0: "<s>", 1: "</s>", 2: "the"},
        "dico_word2id": {"<s>": 0, "</s>": 1, "the": 2},
        "dico_counts": {"the": 17},
        "params": xlm_params() if params is None else params,
    }
    return data, memories


def write_xlm(tmp_path, params=None, name="xlm.pth", **memory_options):
    data, memories = xlm_checkpoint(params, **memory_options)
    path = tmp_path / name
    torch.save(data, path)
    return path, memories


def xlm_forward(x: torch.Tensor, t: dict[str, torch.Tensor], knn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """XLM's HashingMemoryProductFast.forward in eval mode, transcribed, on XLM's raw tensors.

    Returns (indices (bs*heads, knn), output (bs, v_dim)).
    """
    bs = x.shape[0]
    # QueryMLP: Linear, then BatchNorm1d with running statistics (eval)
    bias = t.get("query_proj.query_mlps.0.bias")
    q = F.linear(x, t["query_proj.query_mlps.0.weight"], bias)
    if "query_proj.query_mlps.1.weight" in t:
        q = (q - t["query_proj.query_mlps.1.running_mean"]) / torch.sqrt(
            t["query_proj.query_mlps.1.running_var"] + 1e-5
        ) * t["query_proj.query_mlps.1.weight"] + t["query_proj.query_mlps.1.bias"]
    q = q.view(bs * HEADS, K_DIM).view(bs, HEADS, K_DIM)
    keys = t["keys"]
    half = K_DIM // 2
    all_scores, all_indices = [], []
    for h in range(HEADS):
        k1, k2 = (keys[h][0], keys[h][1]) if keys.dim() == 4 else (keys, keys)  # use_different_keys
        q1, q2 = q[:, h, :half], q[:, h, half:]
        s1, i1 = F.linear(q1, k1).topk(knn, dim=1, largest=True, sorted=True)
        s2, i2 = F.linear(q2, k2).topk(knn, dim=1, largest=True, sorted=True)
        scores = (s1.view(bs, knn, 1) + s2.view(bs, 1, knn)).view(bs, -1)
        indices = (i1.view(bs, knn, 1) * len(k1) + i2.view(bs, 1, knn)).view(bs, -1)
        best_scores, best = scores.topk(knn, dim=1, largest=True, sorted=True)
        all_scores.append(best_scores)
        all_indices.append(indices.gather(1, best))
    scores = torch.stack(all_scores, 1).view(bs * HEADS, knn)
    indices = torch.stack(all_indices, 1).view(bs * HEADS, knn)
    weights = F.softmax(scores.float(), dim=-1)  # mem_score_softmax
    values = t["values.weight"][indices.view(bs, HEADS * knn)]  # (bs, heads*knn, v_dim)
    output = (values * weights.view(bs, HEADS * knn, 1)).sum(1)
    return indices, output


# --- XLM import ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, {"batchnorm": False, "bias": False, "different_keys": False}],
    ids=["xlm-pkm-defaults", "no-batchnorm-no-bias-shared-keys"],
)
def test_xlm_checkpoint_computes_what_xlm_computes(tmp_path, options):
    params = xlm_params(
        mem_query_batchnorm=options.get("batchnorm", True),
        mem_query_bias=options.get("bias", True),
        mem_use_different_keys=options.get("different_keys", True),
    )
    path, raw = write_xlm(tmp_path, params, **options)
    checkpoint = read_checkpoint(path)
    assert checkpoint.format == "xlm"
    assert checkpoint.memories == ("1_in", "4_in", "4_after")  # layer order, "in" before "after"
    assert checkpoint.config.knn == KNN and checkpoint.config.input_dropout == 0.1
    assert checkpoint.config.query_batchnorm is options.get("batchnorm", True)
    assert checkpoint.size == path.stat().st_size and len(checkpoint.sha256) == 64
    x = torch.randn(20, DIM, generator=torch.Generator().manual_seed(9))
    for name, weights in zip(checkpoint.memories, checkpoint.weights, strict=True):
        layer = HashingMemory.from_config(checkpoint.config, seed=None)
        layer.load_weights(weights)
        layer.eval()
        with torch.no_grad():
            taps = layer(x, return_taps=True)
            indices, output = xlm_forward(x, raw[name], KNN)
        np.testing.assert_array_equal(taps["indices"].numpy(), indices.numpy())
        np.testing.assert_allclose(taps["output"].numpy(), output.numpy(), rtol=1e-5, atol=1e-6)


def test_memories_are_picked_by_name_in_the_order_given(tmp_path):
    path, raw = write_xlm(tmp_path)
    checkpoint = read_checkpoint(path, memories=["4_after", "1_in"])
    assert checkpoint.memories == ("4_after", "1_in")
    np.testing.assert_array_equal(checkpoint.weights[0]["keys"], raw["4_after"]["keys"].numpy())
    np.testing.assert_array_equal(
        checkpoint.weights[1]["query_proj.1.running_var"], raw["1_in"]["query_proj.query_mlps.1.running_var"].numpy()
    )
    with pytest.raises(ConversionError, match=r"no memory '2_in'; available: \['1_in', '4_in', '4_after'\]"):
        read_checkpoint(path, memories=["2_in"])
    with pytest.raises(ConversionError, match="selected twice"):
        read_checkpoint(path, memories=["1_in", "1_in"])


def test_encoder_and_decoder_memories_are_qualified(tmp_path):
    data, _ = xlm_checkpoint(xlm_params(mem_dec_positions="4,0+"))  # the command line's form
    data["encoder"] = data.pop("model")
    data["decoder"] = {
        f"memories.{name}.{k}": v for name in ("4_in", "0_after") for k, v in xlm_memory_tensors(7).items()
    }
    torch.save(data, tmp_path / "mt.pth")
    checkpoint = read_checkpoint(tmp_path / "mt.pth")
    assert checkpoint.memories == (
        "encoder:1_in",
        "encoder:4_in",
        "encoder:4_after",
        "decoder:0_after",
        "decoder:4_in",
    )
    assert read_checkpoint(tmp_path / "mt.pth", memories=["0_after", "encoder:4_in"]).memories == (
        "decoder:0_after",
        "encoder:4_in",
    )
    with pytest.raises(ConversionError, match="ambiguous '4_in'; available:"):
        read_checkpoint(tmp_path / "mt.pth", memories=["4_in"])


def test_plain_stack_memories_are_indices(tmp_path):
    config = TINY.replace(output_dim=TINY.input_dim)
    save_checkpoint(make_weights(config, 0, layers=3), tmp_path / "s.pt", config)
    checkpoint = read_checkpoint(tmp_path / "s.pt", knn=config.knn, memories=["2", "0"])
    assert checkpoint.memories == ("2", "0") and checkpoint.config == config
    np.testing.assert_array_equal(checkpoint.weights[0]["keys"], make_weights(config, 0, layers=3)["layers.2.keys"])


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".keras"])
def test_convert_xlm_checkpoint_to_every_format(tmp_path, capsys, suffix):
    path, raw = write_xlm(tmp_path)
    dst = tmp_path / f"out{suffix}"
    assert main(["convert", str(path), str(dst), "--memories", "4_in", "1_in"]) == 0
    assert "wrote" in capsys.readouterr().out
    back = read_checkpoint(dst, knn=KNN)  # .pt and .npz do not record knn; .keras does
    assert back.memories == ("0", "1") and back.config.knn == KNN
    np.testing.assert_array_equal(back.weights[0]["values.weight"], raw["4_in"]["values.weight"].numpy())
    np.testing.assert_array_equal(
        back.weights[1]["query_proj.0.weight"], raw["1_in"]["query_proj.query_mlps.0.weight"].numpy()
    )


def test_knn_from_the_checkpoint_or_given_never_guessed(tmp_path, capsys):
    config = TINY.replace(knn=3)
    save_checkpoint(make_weights(config, 0), tmp_path / "a.pt", config)
    with pytest.raises(ConversionError, match=r"knn \(value rows read per head\) is not recorded"):
        read_checkpoint(tmp_path / "a.pt")
    assert read_checkpoint(tmp_path / "a.pt", knn=3).config == config
    # .keras records knn: the same value is fine, another one is an error naming both
    assert main(["convert", str(tmp_path / "a.pt"), str(tmp_path / "a.keras"), "--knn", "3"]) == 0
    assert main(["convert", str(tmp_path / "a.keras"), str(tmp_path / "b.npz")]) == 0
    assert read_checkpoint(tmp_path / "a.keras", knn=3).config == config
    with pytest.raises(
        ConversionError, match=r"knn=4 contradicts the checkpoint, which records knn=3 \(in the layer config\)"
    ):
        read_checkpoint(tmp_path / "a.keras", knn=4)


def test_keras_checkpoint_keeps_meta_options(tmp_path):
    """A .keras file of Meta's layers records their options in the layer config (an own
    value dim, SwiLU, gate, a bfloat16 table shared by three layers) and reads back as it was."""
    config = TINY.replace(
        output_dim=TINY.input_dim,
        value_dim=8,
        swilu_projection=True,
        gated=True,
        value_dtype="bfloat16",
        share_values=True,
    )
    weights = make_weights(config, 2, layers=3)
    save_checkpoint(weights, tmp_path / "meta.keras", config)
    back = read_checkpoint(tmp_path / "meta.keras")
    assert back.config == config and back.memories == ("0", "1", "2")
    stacked = back.stacked_weights()
    assert set(stacked) == set(weights)
    for name, array in weights.items():
        np.testing.assert_array_equal(stacked[name], array, err_msg=name)
    assert "converted bfloat16 weights to float32" in back.notes


def test_dtype_notes_and_refusals(tmp_path, capsys):
    w = make_weights(TINY, 0)
    np.savez(tmp_path / "half.npz", **{k: v.astype(np.float16) for k, v in w.items()})
    assert main(["convert", str(tmp_path / "half.npz"), str(tmp_path / "f32.npz"), "--knn", "4"]) == 0
    assert "note: converted float16 weights to float32" in capsys.readouterr().err
    with np.load(tmp_path / "f32.npz") as data:
        assert data["keys"].dtype == np.float32
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    np.savez(tmp_path / "double.npz", **w64)
    assert read_checkpoint(tmp_path / "double.npz", knn=4).notes == ("converted float64 weights to float32",)
    ints = dict(w, keys=w["keys"].astype(np.int64))
    np.savez(tmp_path / "ints.npz", **ints)
    with pytest.raises(ConversionError, match=r"ints\.npz: keys: int64 array where floats are expected"):
        read_checkpoint(tmp_path / "ints.npz", knn=4)
    flat = dict(w, keys=w["keys"].reshape(2, -1))
    np.savez(tmp_path / "rank.npz", **flat)
    with pytest.raises(ConversionError, match=r"keys must have 4 dimensions, got shape \(2, 64\)"):
        read_checkpoint(tmp_path / "rank.npz", knn=4)


def test_bf16_torch_weights_are_converted_with_a_note(tmp_path):
    path, _ = write_xlm(tmp_path)
    data = torch.load(path, weights_only=True)
    data["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in data["model"].items()}
    torch.save(data, tmp_path / "bf16.pth")
    assert "converted bfloat16 weights to float32" in read_checkpoint(tmp_path / "bf16.pth").notes


# --- every bad input: exit 2, one error line, nothing written -----------------------------
def _bad_pickle(tmp_path: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "code-ran"),))

    torch.save({"model": {}, "params": Payload()}, tmp_path / "evil.pth")
    return tmp_path / "evil.pth"


def _namespace_params(tmp_path: Path) -> Path:
    data, _ = xlm_checkpoint()
    data["params"] = argparse.Namespace(**data["params"])
    torch.save(data, tmp_path / "old.pth")
    return tmp_path / "old.pth"


def _xlm_with(**changes):
    def make(tmp_path):
        return write_xlm(tmp_path, xlm_params(**changes))[0]

    return make


def _nan(tmp_path):
    data, _ = xlm_checkpoint()
    data["model"]["module.memories.4_in.values.weight"][3, :5] = float("nan")
    torch.save(data, tmp_path / "nan.pth")
    return tmp_path / "nan.pth"


def _missing_bias(tmp_path):
    """params say mem_query_bias=True (as XLM's default does), the bias tensor is gone."""
    return write_xlm(tmp_path, xlm_params(mem_query_bias=True), bias=False)[0]


def _unexpected_bias(tmp_path):
    return write_xlm(tmp_path, xlm_params(mem_query_bias=False), bias=True)[0]


def _negative_variance(tmp_path):
    data, _ = xlm_checkpoint()
    data["model"]["module.memories.1_in.query_proj.query_mlps.1.running_var"][2] = -0.5
    torch.save(data, tmp_path / "negvar.pth")
    return tmp_path / "negvar.pth"


def _inf_variance_npz(tmp_path):
    weights = make_weights(get_preset("tiny").config.replace(query_batchnorm=True), 0)
    weights["query_proj.1.running_var"][0] = np.inf
    np.savez(tmp_path / "infvar.npz", **weights)
    return tmp_path / "infvar.npz"


def _plain_pt(tmp_path):
    save_checkpoint(make_weights(TINY, 0), tmp_path / "a.pt", TINY)
    return tmp_path / "a.pt"


def _npz_named_pt(tmp_path):
    np.savez(tmp_path / "w.npz", **make_weights(TINY, 0))
    os.replace(tmp_path / "w.npz", tmp_path / "w.pt")
    return tmp_path / "w.pt"


def _truncated(tmp_path):
    path = _plain_pt(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


BAD_INPUTS = {
    "hidden query layer": (_xlm_with(mem_query_layer_sizes="0,1024,0"), "mem_query_layer_sizes='0,1024,0'"),
    "no softmax": (_xlm_with(mem_score_softmax=False), "mem_score_softmax=False"),
    "temperature": (_xlm_with(mem_temperature=0.5), "mem_temperature=0.5"),
    "score subtract": (_xlm_with(mem_score_subtract="min"), "mem_score_subtract='min'"),
    "unknown option": (_xlm_with(mem_new_trick=3), "mem_new_trick=3"),
    "params contradict shapes": (_xlm_with(mem_heads=4), "mem_heads=4 but the tensors have 2"),
    "positions contradict": (_xlm_with(mem_enc_positions="4+,1"), "mem_enc_positions says ['1_in', '4_after']"),
    "code in the pickle": (_bad_pickle, "weights-only loader does not accept"),
    "namespace params": (_namespace_params, "argparse.Namespace"),
    "NaN weights": (_nan, "memories.4_in.values.weight: 5 NaN or Inf value(s) in 1024"),
    "bias the params promise is missing": (
        _missing_bias,
        "mem_query_bias=True says the query Linear has a bias, but there is no module.memories.1_in.query_proj",
    ),
    "bias the params rule out": (_unexpected_bias, "mem_query_bias=False says the query Linear has no bias"),
    "negative variance": (
        _negative_variance,
        "module.memories.1_in.query_proj.query_mlps.1.running_var: 1 negative BatchNorm running variance(s)",
    ),
    "infinite variance": (_inf_variance_npz, "query_proj.1.running_var: 1 NaN or Inf value(s)"),
    "knn missing": (_plain_pt, "knn (value rows read per head) is not recorded"),
    "suffix and content disagree": (_npz_named_pt, "the suffix '.pt' says a PyTorch torch.save archive, but the file"),
    "truncated": (_truncated, "truncated or corrupt"),
    "missing": (lambda tmp_path: tmp_path / "gone.pt", "gone.pt: no such file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    src = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(src), str(tmp_path / "out.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err
    assert sorted(os.listdir(tmp_path)) == before
    assert not (tmp_path / "code-ran").exists()


def test_a_pickle_that_would_run_code_is_refused_by_the_name_of_what_it_calls(tmp_path, capsys):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": {}, "params": Payload()}, tmp_path / "evil.pth")
    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out.npz"), "--knn", "4"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.count("\n") == 1 and "evil.pth: refused: it holds " in err
    called = f"{os.system.__module__}.system"  # posix.system: how a pickle names os.system
    assert f"it holds {called}," in err, err
    assert "Check the documentation" not in err


def test_the_refused_global_is_named_whatever_the_loaders_wording(tmp_path):
    """Another PyTorch version's message that names nothing: the pickle's own opcodes say."""
    from pkm_models.checkpoint import _refused_globals

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"params": Payload()}, tmp_path / "evil.pth")
    assert _refused_globals("Weights only load failed.", tmp_path / "evil.pth") == f"{os.system.__module__}.system"
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02 not a pickle")
    assert _refused_globals("Weights only load failed.", tmp_path / "junk.pth") == "non-tensor Python objects"


def test_the_refusal_names_only_what_the_pickle_calls(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (eval, ("1",))

    torch.save({"model": {}, "params": Payload()}, tmp_path / "evil.pth")
    assert main(["convert", str(tmp_path / "evil.pth"), str(tmp_path / "out.npz"), "--knn", "4"]) == 2
    err = capsys.readouterr().err
    assert "it holds eval, which" in err, err  # was "eval, by, if": words of the loader's message


def test_knn_contradicting_the_xlm_params(tmp_path, capsys):
    path, _ = write_xlm(tmp_path)
    assert main(["convert", str(path), str(tmp_path / "o.npz"), "--knn", "5"]) == 2
    err = capsys.readouterr().err
    assert "knn=5 contradicts the checkpoint, which records knn=3 (in params['mem_knn'])" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize(
    ("dst", "message"),
    [("no/such/folder/o.npz", "the folder"), ("adir.npz", "is a directory"), ("o.bin", "unknown checkpoint format")],
)
def test_bad_destinations(tmp_path, capsys, dst, message):
    src = _plain_pt(tmp_path)
    (tmp_path / "adir.npz").mkdir()
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(src), str(tmp_path / dst), "--knn", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_a_failed_write_leaves_the_old_destination_intact(tmp_path, monkeypatch, suffix):
    import pkm_models.convert as convert

    src = _plain_pt(tmp_path)
    dst = tmp_path / f"old{suffix}"
    dst.write_bytes(b"the old checkpoint")

    def fail_midway(weights, tmp, fmt, config, layers):
        tmp.write_bytes(b"half a checkpoint")
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "_write", fail_midway)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_checkpoint(src, dst, knn=4)
    assert dst.read_bytes() == b"the old checkpoint"
    assert sorted(os.listdir(tmp_path)) == ["a.pt", f"old{suffix}"]


# --- the shipped trained model ------------------------------------------------------------
def test_shipped_trained_checkpoint_loads_and_runs():
    pth, npy = CASES / "trained.pth", CASES / "trained-input.npy"
    assert pth.stat().st_size + npy.stat().st_size < 2_000_000
    checkpoint = read_checkpoint(pth)
    assert checkpoint.format == "xlm" and checkpoint.memories == ("0_after", "1_after")
    x = np.load(npy)
    assert x.dtype == np.float32 and x.ndim == 3 and x.shape[-1] == checkpoint.config.input_dim
    stack = PKMStack(checkpoint.config, checkpoint.layers)
    stack.load_weights(checkpoint.stacked_weights())
    with torch.no_grad():
        out = stack.eval()(torch.from_numpy(x))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.slow
def test_training_is_deterministic_and_reproduces_the_shipped_files(tmp_path):
    from pkm_models import train

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        assert train.main(["--out", str(tmp_path / name)]) == 0
    for file in ("trained.pth", "trained-input.npy"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    # the shipped input is the same real activations (the weights may differ across CPUs' float sums)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "trained-input.npy"), np.load(CASES / "trained-input.npy"))


def _npz_bomb(path, elements: int = 25_000_000) -> None:
    """An .npz whose one member inflates ~1,000 times: a float32 array of zeros, deflated."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (elements,)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("values.weight.npy", "w") as f:
        f.write(header.getvalue())
        for _ in range(elements * 4 // (1 << 22)):
            f.write(bytes(1 << 22))


def test_an_npz_bomb_is_refused_before_a_member_is_read(tmp_path, capsys):
    """A 9 MB .npz made convert use 2.7 GB; this one (100 MB from ~100 KB) is refused from the
    archive's declared sizes."""
    _npz_bomb(tmp_path / "bomb.npz")
    assert main(["convert", str(tmp_path / "bomb.npz"), str(tmp_path / "out.npz"), "--knn", "4"]) == 2
    err = capsys.readouterr().err
    import re

    said = r"member 'values.weight.npy' declares [\d,]+ bytes from [\d,]+ \(1,0\d\dx\): not a tensor's data"
    assert re.search(said, err), err
    assert "refused before reading it" in err and err.count("\n") == 1
    from pkm_models.checkpoint import check_npz_members

    np.savez(tmp_path / "plain.npz", a=np.zeros(10, np.float32))
    check_npz_members(tmp_path / "plain.npz", available=1 << 30)
    with pytest.raises(ConversionError, match=r"more than the 0\.0 GiB of memory available"):
        check_npz_members(tmp_path / "plain.npz", available=10)


# --- fuzzing the checkpoint reader -----------------------------------------------------------
def test_no_state_dict_makes_the_reader_raise_anything_but_a_pkm_error(tmp_path_factory):
    """Whatever tensors a PyTorch file or an .npz holds under whatever of the names a PKM
    checkpoint uses (XLM's, Meta's, ours), reading it ends in a checkpoint or a PKMError
    (one line), never another exception."""
    import contextlib

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from pkm_models.errors import PKMError

    names = [
        *("keys", "values.weight", "query_proj.0.weight", "query_proj.0.bias", "query_proj.1.running_var"),
        *("layers.0.keys", "layers.1.values.weight", "memories.0_in.keys", "memories.0_in.values.weight"),
        *("layers.3.feed_forward.keys", "layers.3.feed_forward.values.weight"),
        *("layers.3.feed_forward.query_proj.query_mlps.0.weight", "layers.3.feed_forward.query_proj.query_mlps.0.bias"),
        "junk",
    ]
    shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
    dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int64, torch.bool])
    tensor = st.builds(lambda s, d: torch.zeros(s, dtype=d), shapes, dtypes)
    state = st.dictionaries(st.sampled_from(names), tensor, max_size=6)
    wrapper = st.sampled_from(["plain", "model", "xlm", "npz"])
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(state, wrapper)
    def read(state, wrapper):
        if wrapper == "npz":
            path = folder / "fuzzed.npz"
            np.savez(path, **{k: v.float().numpy() for k, v in state.items()})
        else:
            path = folder / "fuzzed.pth"
            obj = {"model": state} if wrapper == "model" else state
            if wrapper == "xlm":
                obj = {"model": state, "params": {"mem_knn": 2}}
            torch.save(obj, path)
        with contextlib.suppress(PKMError):
            read_checkpoint(path, knn=2)

    read()
