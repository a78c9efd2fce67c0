import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_one_line_error, needs_tf, run_python

pytestmark = needs_tf


def _keras_logits(bundle, inputs):
    import keras

    return np.asarray(keras.models.load_model(bundle / "training" / "model.keras", compile=False)(inputs))


@pytest.mark.parametrize("batch", [1, 3])
def test_saved_model_and_onnx_match_keras(tiny_bundle, batch):
    import onnxruntime as ort

    from charrnn_export.export import onnx_step, saved_model_step
    from charrnn_export.validate import step_through
    from charrnn_runtime.bundle import state_spec

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    spec = state_spec(manifest)
    inputs = np.random.default_rng(batch).integers(0, manifest["vocab_size"], (batch, 40)).astype(np.int32)
    reference = _keras_logits(tiny_bundle, inputs)
    session = ort.InferenceSession(str(tiny_bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    for step in (saved_model_step(tiny_bundle / "saved_model", spec), onnx_step(session, spec)):
        assert np.abs(step_through(step, inputs, spec) - reference).max() < 1e-4


def test_manifest_records_validation_and_hashes(tiny_bundle, tiny_run):
    from charrnn_runtime.files import sha256_file

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for fmt in ("saved_model", "onnx", "onnx-reference"):
        assert manifest["validation"][fmt]["max_abs_logit_diff"] <= 1e-4
        assert len(manifest["validation"][fmt]["cases"]) == 4
    int8 = manifest["validation"]["int8"]
    assert int8["cost_bits_per_char"] <= 0.01 and int8["max_abs_logit_diff"] > 0
    assert int8["rows"]["identical"] and int8["rows"]["max_abs_diff"] == 0
    assert manifest["sampling_loops"] == {"int8": "loop.int8.onnx"}
    loop = manifest["validation"]["loop"]["int8"]
    assert loop["identical_chars"] and loop["max_abs_diff"] <= 1e-4 and len(loop["cases"]) == 4
    on_disk = {str(p.relative_to(tiny_bundle)) for p in tiny_bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(sha256_file(tiny_bundle / name) == digest for name, digest in manifest["files"].items())
    assert manifest["tensors"] == {"char": "char", "logits": "logits"}
    assert manifest["state"] == [{"input": "hidden", "output": "next_hidden", "size": 32, "layer": 0,
                                  "role": "hidden"}]  # a one-layer GRU keeps the report's cell signature
    assert manifest["training"]["epochs_trained"] == 2 and "loss" in manifest["training"]["final"]
    assert manifest["training"]["model_epoch"] == manifest["training"]["final"]["epoch"] == tiny_run.best_epoch


def test_saved_model_reloads_in_a_fresh_process_at_batch_1_and_64(tiny_bundle):
    code = f"""
import numpy as np, tensorflow as tf
serve = tf.saved_model.load({str(tiny_bundle / "saved_model")!r}).signatures["serving_default"]
units = serve.structured_input_signature[1]["hidden"].shape[1]
for batch in (1, 64):
    out = serve(char=tf.zeros([batch], tf.int32), hidden=tf.zeros([batch, units]))
    assert out["logits"].shape[0] == batch and out["next_hidden"].shape == (batch, units)
print("ok")
"""
    result = run_python(code)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_onnx_is_standard_self_contained_and_self_describing(tiny_bundle, tiny_run):
    import onnx
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(tiny_bundle / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert [i.name for i in model.graph.input] == ["char", "hidden"]
    assert [o.name for o in model.graph.output] == ["logits", "next_hidden"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch

    facts = json.loads({p.key: p.value for p in model.metadata_props}["charrnn"])
    assert facts["vocab"] == tiny_run.vocab and facts["variant"] == "fp32"
    units = facts["state"][0]["size"]
    out = ReferenceEvaluator(model).run(None, {"char": np.array([1, 2], np.int32),
                                               "hidden": np.zeros((2, units), np.float32)})
    assert out[0].shape == (2, len(tiny_run.vocab)) and out[1].shape == (2, units)


def test_runtime_reads_the_vocabulary_from_the_bare_onnx_file(tiny_bundle, tiny_run):
    import charrnn_runtime

    for variant in ("fp32", "int8"):
        model = charrnn_runtime.load(tiny_bundle / f"model{'' if variant == 'fp32' else '.int8'}.onnx",
                                     provider="cpu")
        assert model.vocab == tiny_run.vocab and model.variant == variant


def _export_cli(args):
    from charrnn_export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])




def test_failed_validation_writes_nothing(tiny_run, tmp_path):
    result = _export_cli([tiny_run.path, tmp_path / "bundle", "--tolerance", "1e-12"])
    assert result.exit_code == 2
    assert "over tolerance" in result.output and "FAILED" in result.output
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary directory


def test_failed_validation_keeps_the_previous_bundle(tiny_run, tiny_bundle, tmp_path):
    import shutil

    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    before = (target / "manifest.json").read_text()
    assert _export_cli([tiny_run.path, target, "--force", "--tolerance", "1e-12"]).exit_code == 2
    assert (target / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_killed_export_leaves_no_bundle(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    process = subprocess.Popen([sys.executable, "-m", "charrnn_export", str(tiny_run.path), str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any((p / "saved_model").exists() for p in tmp_path.glob(".bundle.*.tmp")):
            assert time.monotonic() < deadline and process.poll() is None, "export never started writing"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not out.exists()


def test_cli_exports_with_default_output(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.path, run)
    result = _export_cli([run])
    assert result.exit_code == 0, result.output
    assert "onnx         max |Δlogit|" in result.output
    assert (run / "bundle" / "model.onnx").is_file()
    assert_one_line_error(_export_cli([run]), "output exists")
    assert _export_cli([run, "--force"]).exit_code == 0


def test_runtime_only_bundle_leaves_out_the_savedmodel_and_keras_model(tiny_run, tmp_path):
    import charrnn_runtime

    result = _export_cli([tiny_run.path, tmp_path / "bundle", "--runtime-only"])
    assert result.exit_code == 0, result.output
    assert "saved_model  max |Δlogit|" in result.output  # still validated
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["loop.int8.onnx", "model.int8.onnx", "model.onnx", "prefill.int8.onnx",
                                         "prefill.onnx", "training/config.json",
                                         "training/history.json", "training/loss.png", "training/vocab.json"]
    assert sorted(str(p.relative_to(tmp_path / "bundle")) for p in (tmp_path / "bundle").rglob("*")
                  if p.is_file()) == sorted([*manifest["files"], "manifest.json"])
    assert charrnn_runtime.load(tmp_path / "bundle").generate("", 10, seed=1)


def test_loop_validation_refuses_a_loop_that_draws_differently(tiny_bundle):
    """The sampling loop is held to the cell it wraps: identical characters, state within tolerance."""
    import onnx
    from onnx import numpy_helper

    from charrnn_export import loop
    from charrnn_export.export import cpu_session, onnx_step
    from charrnn_export.validate import ValidationFailed
    from charrnn_runtime.bundle import state_spec
    from charrnn_train.data import encode, read_corpus

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    spec, cell = state_spec(manifest), onnx.load(str(tiny_bundle / "model.int8.onnx"))
    ids = encode(read_corpus(manifest["training"]["config"]["corpus"])[:2000], manifest["vocab"])
    step = onnx_step(cpu_session(cell.SerializeToString()), spec)
    wrapped = loop.wrap(cell, spec, {"char": "char", "logits": "logits"})
    assert loop.compare(cpu_session(wrapped.SerializeToString()), step, ids, spec, log=lambda line: None)["identical_chars"]
    body = wrapped.graph.node[0].attribute[0].g
    bias = next(i for i in body.initializer if numpy_helper.to_array(i).shape == (len(manifest["vocab"]),))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 3 * np.eye(len(manifest["vocab"]))[5]
                                          .astype(np.float32), bias.name))  # character 5 favoured
    with pytest.raises(ValidationFailed, match="sampling loop"):
        loop.compare(cpu_session(wrapped.SerializeToString()), step, ids, spec, log=lambda line: None)


def test_stacked_lstm_exports_every_layers_state(tiny_stacked_lstm_bundle):
    import onnx

    manifest = json.loads((tiny_stacked_lstm_bundle / "manifest.json").read_text())
    assert manifest["network"]["layers"] == [{"cell": "lstm", "units": 32}] * 2
    assert [(t["input"], t["output"], t["layer"], t["role"]) for t in manifest["state"]] == [
        ("hidden_0", "next_hidden_0", 0, "hidden"), ("cell_0", "next_cell_0", 0, "cell"),
        ("hidden_1", "next_hidden_1", 1, "hidden"), ("cell_1", "next_cell_1", 1, "cell")]
    for fmt in ("saved_model", "onnx", "onnx-reference"):
        assert manifest["validation"][fmt]["max_abs_logit_diff"] <= 1e-4
    assert "cost_bits_per_char" in manifest["validation"]["int8"]
    model = onnx.load(str(tiny_stacked_lstm_bundle / "model.int8.onnx"))
    facts = json.loads({p.key: p.value for p in model.metadata_props}["charrnn"])
    assert facts["state"] == manifest["state"] and facts["variant"] == "int8"
    assert [i.name for i in model.graph.input] == ["char", "hidden_0", "cell_0", "hidden_1", "cell_1"]
    loop = onnx.load(str(tiny_stacked_lstm_bundle / "loop.int8.onnx"))
    assert [i.name for i in loop.graph.input] == ["steps", "logits", "hidden_0", "cell_0", "hidden_1", "cell_1",
                                                  "noise", "inv_temperature"]
    assert [o.name for o in loop.graph.output] == ["next_logits", "next_hidden_0", "next_cell_0", "next_hidden_1",
                                                   "next_cell_1", "chars"]
    assert manifest["validation"]["loop"]["int8"]["identical_chars"]


def test_int8_rows_do_not_depend_on_their_neighbours(tiny_bundle):
    """A row's int8 logits are the same bits alone and beside any neighbours, even a state far outside the
    hidden range (bundles exported before took one activation scale from the whole batch)."""
    import onnx

    import charrnn_runtime
    from charrnn_runtime.state import State

    ops = {node.op_type for node in onnx.load(str(tiny_bundle / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "MatMulIntegerToFloat"} <= ops and "DynamicQuantizeLinear" not in ops
    model = charrnn_runtime.load(tiny_bundle, provider="cpu", variant="int8")
    row = model.feed(model.initial_state(), "".join(model.vocab[10:30]))
    neighbours = State({name: np.linspace(-50, 50, 3 * a.shape[1], dtype=np.float32).reshape(3, -1)
                        for name, a in row.arrays.items()}, np.zeros((3, len(model.vocab)), np.float32))
    alone, together = model.step(row, [4]), model.step(State.concat([neighbours, row]), [1, 2, 3, 4])
    assert np.array_equal(together.logits[3], alone.logits[0])
    assert all(np.array_equal(together.arrays[name][3], a[0]) for name, a in alone.arrays.items())


def test_upgrade_gives_an_old_bundle_independent_int8_rows_and_prefill_without_tensorflow(tiny_bundle, tmp_path):
    """Bundles exported before took their int8 model from onnxruntime's dynamic quantization and had no
    prefill graphs: they still load, and `charrnn-export --upgrade` derives the new int8 model, sampling
    loop and prefill graphs from their fp32 model in place, without importing TensorFlow; the fp32 model
    is kept as it was."""
    import shutil

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import charrnn_runtime
    from charrnn_export import writing
    from charrnn_runtime.files import sha256_file

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for name in manifest.pop("prefill").values():
        (old / name).unlink()
        del manifest["files"][name]
    quantize_dynamic(old / "model.onnx", old / "model.int8.onnx", op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8)
    facts = {key: value for key, value in manifest.items() if key not in writing.MODEL_ENTRIES}
    writing.save_model(onnx.load(str(old / "model.int8.onnx")), old / "model.int8.onnx", {**facts, "variant": "int8"})
    writing.write_manifest(old, facts, names=manifest["files"])
    before = charrnn_runtime.load(old, provider="cpu", variant="int8")
    assert before.prefill_session is None and len(before.generate("ab", 20, seed=1)) == 20

    result = run_python("import sys; from charrnn_export.cli import main\n"
                        f"try: main([{str(old)!r}, '--upgrade'])\n"
                        "except SystemExit as e: assert e.code == 0, e.code\n"
                        "assert 'tensorflow' not in sys.modules")
    assert result.returncode == 0, result.stderr
    assert "rows stepped together = alone" in result.stderr
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["validation"]["int8"]["rows"]["identical"]
    assert set(manifest["files"]) == set(json.loads((tiny_bundle / "manifest.json").read_text())["files"])
    assert all(sha256_file(old / name) == digest for name, digest in manifest["files"].items())
    assert sha256_file(old / "model.onnx") == sha256_file(tiny_bundle / "model.onnx")
    ops = {node.op_type for node in onnx.load(str(old / "model.int8.onnx")).graph.node}
    assert "MatMulIntegerToFloat" in ops and "DynamicQuantizeLinear" not in ops
    model = charrnn_runtime.load(old, provider="cpu", variant="int8")
    assert model.loop_session is not None and model.prefill_session is not None
    assert len(model.generate("", 20, seed=1)) == 20
    assert set(manifest["validation"]["prefill"]) == {"fp32", "int8"}
    assert_one_line_error(_export_cli([old, tmp_path / "out", "--upgrade"]), "give no OUT")
    assert_one_line_error(_export_cli([tmp_path / "missing", "--requantize"]), "not a charrnn model bundle")


def test_bad_sources(tmp_path, tiny_run):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(_export_cli([tmp_path / "missing"]), "no such run or model")
    assert_one_line_error(_export_cli([tmp_path / "notes.txt"]), "not a trained model or run")
    assert_one_line_error(_export_cli([tmp_path / "empty", tmp_path / "out"]), "not a charrnn training run")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    (tmp_path / "vocab.json").write_text(json.dumps(tiny_run.vocab))
    assert_one_line_error(_export_cli([broken, tmp_path / "out"]), "cannot load Keras model")


@pytest.mark.parametrize("layer, message", [
    ("SimpleRNN(8, return_sequences=True)", "unsupported architecture Embedding → SimpleRNN → Dense"),
    ("GRU(8, return_sequences=True, reset_after=False)", "reset_after=False"),
    ("LSTM(8, return_sequences=True, activation='relu')", "activation='relu'"),
])
def test_unsupported_architecture(tmp_path, tiny_run, layer, message):
    import keras

    model = keras.Sequential([keras.Input((None,), dtype="int32"), keras.layers.Embedding(10, 4),
                              eval(f"keras.layers.{layer}"), keras.layers.Dense(10)])
    model.save(tmp_path / "model.keras")
    (tmp_path / "vocab.json").write_text(json.dumps([str(i) for i in range(10)]))
    (tmp_path / "text.txt").write_text("0123456789" * 20)
    assert_one_line_error(_export_cli([tmp_path / "model.keras", tmp_path / "out",
                                       "--validation-text", tmp_path / "text.txt"]), message)


def test_bare_keras_model_needs_validation_text(tiny_bundle, tmp_path):
    import shutil

    shutil.copy(tiny_bundle / "training" / "model.keras", tmp_path / "model.keras")
    shutil.copy(tiny_bundle / "training" / "vocab.json", tmp_path / "vocab.json")
    assert_one_line_error(_export_cli([tmp_path / "model.keras", tmp_path / "out"]), "--validation-text")


def test_int8_matmuls_compute_exact_integer_sums_on_any_cpu():
    """Hidden states at ±1 (uint8 0 and 255) against each column's largest weights: the worst case for
    onnxruntime's uint8 × int8 kernel on CPUs without VNNI, whose 16-bit pair sums saturated with 8-bit
    weights. The quantized graph must give the exact integer arithmetic on whatever CPU runs the test."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from charrnn_export.quantize import ACTIVATION_SCALE, ACTIVATION_ZERO_POINT, WEIGHT_MAX, quantize_int8

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(512, 96)).astype(np.float32)
    weight[:, :48] = np.abs(weight[:, :48])  # columns whose products all add up with one sign
    bias = rng.normal(size=96).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "cell",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 96])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    cell = quantize_int8(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.stack([np.ones(512), -np.ones(512), np.sign(rng.normal(size=512)), rng.uniform(-1, 1, 512)]).astype(np.float32)
    got = ort.InferenceSession(cell.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    weights = {i.name: numpy_helper.to_array(i) for i in cell.graph.initializer}
    quantized, scale = weights["w/int8"].astype(np.int64), weights["w/int8_scale"].astype(np.float64)
    assert np.abs(quantized).max() <= WEIGHT_MAX == 63
    inputs = np.clip(np.rint(x / ACTIVATION_SCALE) + ACTIVATION_ZERO_POINT, 0, 255).astype(np.int64)
    exact = (inputs - ACTIVATION_ZERO_POINT) @ quantized * ACTIVATION_SCALE * scale + bias
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)
