"""Our GGUF header reader against the gguf package's GGUFReader (the reference), field by field and byte by byte."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llmtune.models.gguf_fast import FastGGUFReader  # noqa: E402


def _same(path):
    ours, ref = FastGGUFReader(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(ref.fields)
    for key, field in ref.fields.items():
        a, b = ours.fields[key].contents(), field.contents()
        if isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-12), key
        else:
            assert a == b, key
    assert ours.data_offset == ref.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert (a.n_elements, a.n_bytes) == (int(b.n_elements), int(b.n_bytes)), a.name
        assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype, a.name
        assert np.array_equal(np.asarray(a.data).view(np.uint8), np.asarray(b.data).view(np.uint8)), a.name


def test_small_file_all_value_types(tmp_path):
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -3)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.arr_i", [1, 2, 3])
    w.add_array("t.arr_s", ["a", "bc", ""])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((5,)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same(path)


@pytest.mark.real
def test_real_model_header(real_model_path):
    _same(real_model_path)


def test_truncated_file_is_refused(tmp_path, real_model_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(real_model_path.read_bytes()[:2_000_000])
    with pytest.raises(ValueError, match="truncated|end of file"):
        FastGGUFReader(path)
