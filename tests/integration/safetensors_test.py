#!/usr/bin/python3
"""A model saved by `distval-worker --save` read with Python's standard library
alone (json + struct): names, shapes and layout of variables.safetensors,
and its values, checked by computing the MLP's forward pass here and
comparing it with the predictions of the saved model loaded in another
process (tests/integration/predict_saved_model). Run by meson with
BUILD_DIR set to the build directory."""
import gzip
import json
import math
import os
import struct
import subprocess
import tempfile
import unittest

BUILD = os.environ.get("BUILD_DIR", "build")
WORKER = os.path.join(BUILD, "worker", "distval-worker")
PREDICT = os.path.join(BUILD, "tests", "integration", "predict_saved_model")
DATA = "/usr/share/datasets/fashion-mnist"


def read_safetensors(path):
    """(header length, metadata, {name: (dtype, shape, (begin, end), values)})."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        values = struct.unpack("<%df" % ((end - begin) // 4), data[begin:end])
        tensors[name] = (entry["dtype"], entry["shape"], (begin, end), values)
    return n, len(data), metadata, tensors


def write_safetensors(path, tensors):
    """tensors: {name: (shape, flat values)}, written as F32."""
    header, blobs, offset = {}, [], 0
    for name, (shape, values) in tensors.items():
        blob = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": shape,
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header).encode("utf-8")
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_images(count):
    with gzip.open(os.path.join(DATA, "t10k-images-idx3-ubyte.gz"), "rb") as f:
        magic, n, rows, cols = struct.unpack(">IIII", f.read(16))
        assert magic == 2051 and n >= count
        pixels = f.read(count * rows * cols)
    size = rows * cols
    # float32(pixel) / 255 rounded to float32, as the C++ reader does.
    return [[struct.unpack("<f", struct.pack("<f", p / 255.0))[0]
             for p in pixels[i * size:(i + 1) * size]] for i in range(count)]


def dense(x, kernel, bias, n_in, n_out):
    out = list(bias)
    for i in range(n_in):
        xi = x[i]
        if xi == 0.0:
            continue
        row = kernel[i * n_out:(i + 1) * n_out]
        for j in range(n_out):
            out[j] += xi * row[j]
    return out


@unittest.skipUnless(os.path.exists(os.path.join(DATA, "t10k-images-idx3-ubyte.gz")),
                     "Fashion-MNIST not installed")
class SavedModelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model_dir = os.path.join(cls.tmp.name, "model")
        proc = subprocess.run(
            [WORKER, "--local", "--model", "mlp", "--train-limit", "2000", "--epochs", "1",
             "--optimizer", "adam", "--seed", "1", "--save", cls.model_dir],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f"distval-worker failed:\n{proc.stdout[-4000:]}")
        cls.output = proc.stdout

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_names_shapes_and_layout(self):
        self.assertIn("saved the model to " + self.model_dir, self.output)
        n, data_size, metadata, tensors = read_safetensors(
            os.path.join(self.model_dir, "variables.safetensors"))
        self.assertEqual((8 + n) % 8, 0)
        expected = {"dense_0/kernel": [784, 256], "dense_0/bias": [256],
                    "dense_1/kernel": [256, 128], "dense_1/bias": [128],
                    "dense_2/kernel": [128, 10], "dense_2/bias": [10]}
        self.assertEqual({k: v[1] for k, v in tensors.items()}, expected)
        self.assertTrue(all(v[0] == "F32" for v in tensors.values()))
        # Contiguous, in layer order, covering the data exactly.
        spans = sorted(v[2] for v in tensors.values())
        self.assertEqual(spans[0][0], 0)
        for (_, end), (begin, _) in zip(spans, spans[1:]):
            self.assertEqual(end, begin)
        self.assertEqual(spans[-1][1], data_size)
        self.assertEqual(tensors["dense_0/kernel"][2], (0, 784 * 256 * 4))
        # The metadata carries the architecture, equal to model.json.
        self.assertEqual(metadata["format"], "distval.model")
        with open(os.path.join(self.model_dir, "model.json")) as f:
            arch = json.load(f)
        self.assertEqual(json.loads(metadata["model"]), arch)
        self.assertEqual([l["type"] for l in arch["layers"]],
                         ["dense", "relu", "dense", "relu", "dense"])
        self.assertEqual(arch["layers"][2]["config"], {"in": 256, "out": 128})
        self.assertEqual(arch["compile"]["optimizer"]["kind"], "adam")
        self.assertEqual(arch["optimizer_state"], "not saved")

    def test_values(self):
        _, _, _, tensors = read_safetensors(os.path.join(self.model_dir, "variables.safetensors"))
        values = {k: v[3] for k, v in tensors.items()}
        for name, v in values.items():
            self.assertTrue(all(math.isfinite(x) for x in v), name)
        # Glorot-uniform kernels stay small; trained biases left zero.
        limit = math.sqrt(6.0 / (784 + 256))
        self.assertLess(max(abs(x) for x in values["dense_0/kernel"]), 3 * limit)
        self.assertGreater(sum(abs(x) for x in values["dense_2/bias"]), 1e-3)
        # The values ARE the model: this forward pass matches what the saved
        # model predicts in another process (which reads a file written here).
        images = test_images(4)
        inputs = os.path.join(self.tmp.name, "inputs.safetensors")
        outputs = os.path.join(self.tmp.name, "outputs.safetensors")
        write_safetensors(inputs, {"inputs": ([4, 784], [p for row in images for p in row])})
        proc = subprocess.run([PREDICT, self.model_dir, inputs, outputs],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        _, _, _, out = read_safetensors(outputs)
        self.assertEqual(out["outputs"][1], [4, 10])
        predicted = out["outputs"][3]
        for i, x in enumerate(images):
            h = [max(0.0, v) for v in dense(x, values["dense_0/kernel"], values["dense_0/bias"],
                                            784, 256)]
            h = [max(0.0, v) for v in dense(h, values["dense_1/kernel"], values["dense_1/bias"],
                                            256, 128)]
            logits = dense(h, values["dense_2/kernel"], values["dense_2/bias"], 128, 10)
            theirs = predicted[i * 10:(i + 1) * 10]
            for a, b in zip(logits, theirs):
                self.assertAlmostEqual(a, b, delta=1e-4 * max(1.0, abs(a)))
            self.assertEqual(logits.index(max(logits)), theirs.index(max(theirs)))


if __name__ == "__main__":
    unittest.main()
