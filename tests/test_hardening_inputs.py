"""Bad and hostile inputs: per-item faults, the EXIF policy, special files and sizes, warning
state under threads, single arrays, long texts and Ctrl-C."""

from __future__ import annotations

import io
import os
import re
import stat
import threading
import warnings
from unittest import mock

import numpy as np
import pytest
from PIL import Image

import clipfast
import clipfast.inputs.image_io as image_io
import clipfast.inputs.preprocess as pre
import clipfast.inputs.tokenizer as tokmod
from clipfast.errors import ImageLoadError, InputError
from clipfast.inputs.preprocess import (
    PreprocessConfig,
    load_image,
    preprocess_batch,
    preprocess_image,
)

CFG = PreprocessConfig(image_size=32, resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3)


def _png(size=(20, 10), color=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _rotated_jpeg() -> bytes:
    """40 x 20 stored grid, left half red, right half blue, EXIF Orientation 6."""
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _odd_width_fails(monkeypatch, width: int = 7) -> None:
    """Make resizing an image ``width`` pixels wide fail with a plain ZeroDivisionError."""
    real = pre.resize_and_crop

    def resize(img, cfg):
        if img.size[0] == width:
            raise ZeroDivisionError("division by zero")
        return real(img, cfg)

    monkeypatch.setattr(pre, "resize_and_crop", resize)


# --------------------------------------------------------------------------- per-item faults


def test_zero_size_image_is_a_failure_not_a_lost_batch(vitb32_engine, photos):
    items = [photos["astronaut"], Image.new("RGB", (0, 5)), photos["chelsea"]]
    res = vitb32_engine.encode_images(items, errors="skip")
    assert res.indices.tolist() == [0, 2]
    assert [f.index for f in res.failures] == [1]
    assert "empty" in res.failures[0].error
    with pytest.raises(ImageLoadError, match=r"image 1 .*empty") as info:
        vitb32_engine.encode_images(items)
    assert info.value.index == 1


def test_unforeseen_per_item_fault_is_a_failure_chained_from_its_cause(
        vitb32_engine, photos, monkeypatch):
    _odd_width_fails(monkeypatch)
    items = [photos["coffee"], Image.new("RGB", (7, 9)), photos["rocket"]]
    res = vitb32_engine.encode_images(items, errors="skip")
    assert res.indices.tolist() == [0, 2]
    assert res.failures[0].index == 1 and "ZeroDivisionError" in res.failures[0].error
    with pytest.raises(ImageLoadError, match="image 1") as info:
        vitb32_engine.encode_images(items)
    assert info.value.index == 1
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_engine_turns_any_item_exception_into_a_failure(vitb32_engine, monkeypatch):
    real = vitb32_engine.images.load

    def flaky(item, index, fast=False):
        if index == 1:
            raise RuntimeError("decoder exploded")
        return real(item, index, fast)

    monkeypatch.setattr(vitb32_engine.images, "load", flaky)
    items = [_png(), _png(), _png()]
    res = vitb32_engine.preprocess(items, errors="skip")
    assert res.indices.tolist() == [0, 2] and res.failures[0].index == 1
    assert "RuntimeError: decoder exploded" in res.failures[0].error
    with pytest.raises(ImageLoadError, match="image 1") as info:
        vitb32_engine.preprocess(items)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_preprocess_functions_name_the_index_for_any_fault(monkeypatch):
    with pytest.raises(ImageLoadError, match=r"image 1 .*empty \(0x5 pixels\)") as info:
        preprocess_batch([_png(), Image.new("RGB", (0, 5))], CFG)
    assert info.value.index == 1
    _odd_width_fails(monkeypatch)
    with pytest.raises(ImageLoadError, match="image 2") as info:
        preprocess_batch([_png(), _png(), Image.new("RGB", (7, 9))], CFG)
    assert info.value.index == 2 and isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(ImageLoadError) as info:
        preprocess_image(Image.new("RGB", (7, 9)), CFG, index=4)
    assert info.value.index == 4


class _BrokenPath(os.PathLike):
    def __fspath__(self):
        raise RuntimeError("no path today")


def test_load_image_raises_only_image_load_errors():
    with pytest.raises(ImageLoadError, match="RuntimeError: no path today") as info:
        load_image(_BrokenPath(), index=0)
    assert "_BrokenPath" in info.value.item
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(Image.new("L", (3, 0)))


def _cpu_gpu_preprocessor(monkeypatch, jpeg_decoder):
    """A GpuPreprocessor whose device work is stubbed with the CPU path (its per-item logic is
    what is under test)."""
    torch = pytest.importorskip("torch")
    import clipfast.kernels
    from clipfast.inputs.gpu_preprocess import GpuPreprocessor

    def preprocess_gpu(arrays, cfg, device=None):
        return torch.stack([torch.from_numpy(pre.normalize(
            pre.resize_and_crop(Image.fromarray(a), cfg), cfg)) for a in arrays])

    monkeypatch.setattr(clipfast.kernels, "preprocess_gpu", preprocess_gpu)
    gp = GpuPreprocessor.__new__(GpuPreprocessor)
    gp.cfg, gp.device = CFG, torch.device("cpu")
    gp.exif_transpose, gp.alpha_background, gp.max_bytes = True, (255, 255, 255), None
    gp._jpeg, gp.jpeg_reason = jpeg_decoder, None
    return gp


class _FailingJpegDecoder:
    def decode(self, data):
        raise RuntimeError("nvJPEG batch failed")


def test_gpu_preprocessor_per_item_faults_become_failures(monkeypatch):
    gp = _cpu_gpu_preprocessor(monkeypatch, _FailingJpegDecoder())
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 12), (1, 2, 3)).save(jpeg, "JPEG")
    items = [_png(), Image.new("RGB", (0, 5)), _BrokenPath(), jpeg.getvalue(), b"junk"]
    pixels, good, failures = gp(items, 10, "skip")
    assert good == [10, 13] and tuple(pixels.shape) == (2, 3, 32, 32)
    assert [f.index for f in failures] == [11, 12, 14]
    assert "empty" in failures[0].error and "no path today" in failures[1].error
    np.testing.assert_allclose(pixels[1].numpy(), preprocess_image(jpeg.getvalue(), CFG))
    with pytest.raises(ImageLoadError, match="image 12") as info:
        gp(items[2:], 12, "raise")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_gpu_jpeg_probe_never_raises_nor_reads_special_or_huge_files(tmp_path):
    from clipfast.inputs.gpu_preprocess import jpeg_bytes_for_gpu

    jpeg = io.BytesIO()
    Image.new("RGB", (16, 12)).save(jpeg, "JPEG")
    path = tmp_path / "a.jpg"
    path.write_bytes(jpeg.getvalue())
    assert jpeg_bytes_for_gpu(path, True) == jpeg.getvalue()
    assert jpeg_bytes_for_gpu(path, True, max_bytes=100) is None  # the CPU loader refuses it
    assert jpeg_bytes_for_gpu(_BrokenPath(), True) is None
    assert jpeg_bytes_for_gpu("/dev/zero", True) is None
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert jpeg_bytes_for_gpu(fifo, True) is None


# --------------------------------------------------------------------------- EXIF policy


def test_engine_exif_transpose_false_is_applied_once(vitb32_artifact, vitb32_engine):
    data = _rotated_jpeg()
    cfg = vitb32_engine.preprocess_config
    upright, stored = preprocess_image(data, cfg), preprocess_image(data, cfg,
                                                                    exif_transpose=False)
    assert not np.allclose(upright, stored)
    off = clipfast.Engine(vitb32_artifact, backend="onnxruntime", exif_transpose=False,
                          self_check=False)
    np.testing.assert_array_equal(off.preprocess([data])[0], stored)
    np.testing.assert_array_equal(off.preprocess([Image.open(io.BytesIO(data))])[0], stored)
    np.testing.assert_array_equal(vitb32_engine.preprocess([data])[0], upright)


# --------------------------------------------------------------------------- special files, sizes


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_path_is_refused_before_reading():
    with pytest.raises(ImageLoadError, match="character device, not a regular file") as info:
        load_image("/dev/zero", index=0)
    assert info.value.index == 0


def _without_blocking_on(fifo, fn, timeout: float = 20.0):
    """``fn()``'s result or exception; fails the test (after unblocking it) if ``fn`` is still
    blocked on ``fifo`` after ``timeout`` seconds."""
    outcome: list = []

    def run():
        try:
            outcome.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():  # hung in open() or read(): give it a writer and EOF, then fail
        for _ in range(8):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"blocked on the FIFO {fifo} for {timeout} s")
    return outcome[0]


def test_fifo_path_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    error = _without_blocking_on(fifo, lambda: load_image(fifo, index=2))
    assert isinstance(error, ImageLoadError), error
    assert "named pipe (FIFO)" in str(error) and "image 2" in str(error)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_file_objects_and_paths_are_read_up_to_the_limit(tmp_path, monkeypatch):
    with open("/dev/zero", "rb") as endless:
        with pytest.raises(ImageLoadError, match="more than 65536 bytes") as info:
            load_image(endless, index=1, max_bytes=65536)
    message = str(info.value)
    assert "MAX_IMAGE_BYTES" in message and "max_bytes" in message and "max_image_bytes" in message

    data = _png((64, 64))
    assert load_image(io.BytesIO(data)).size == (64, 64)  # binary file objects are inputs
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert load_image(path, max_bytes=len(data)).size == (64, 64)
    with pytest.raises(ImageLoadError, match=f"file is {len(data)} bytes, above the limit of "
                                             f"{len(data) - 1} bytes"):
        load_image(path, max_bytes=len(data) - 1)
    monkeypatch.setattr(image_io, "MAX_IMAGE_BYTES", len(data) - 1)  # the module-wide default
    with pytest.raises(ImageLoadError, match="MAX_IMAGE_BYTES"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="above the limit"):
        load_image(io.BytesIO(data))
    monkeypatch.setattr(image_io, "MAX_IMAGE_BYTES", None)
    assert load_image(path).size == (64, 64)
    assert image_io.MAX_IMAGE_BYTES is None or image_io.MAX_IMAGE_BYTES >= 1 << 20


def test_engine_refuses_special_and_oversized_files(vitb32_artifact, vitb32_engine, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    big = tmp_path / "big.png"
    big.write_bytes(_png((64, 64)))
    items = [_png(), "/dev/zero", str(fifo), big]
    res = _without_blocking_on(fifo, lambda: vitb32_engine.preprocess(items, errors="skip"))
    assert res.indices.tolist() == [0, 3]
    assert [f.index for f in res.failures] == [1, 2]
    assert "character device" in res.failures[0].error
    assert "named pipe" in res.failures[1].error
    small = clipfast.Engine(vitb32_artifact, backend="onnxruntime", max_image_bytes=100,
                            self_check=False)
    with pytest.raises(ImageLoadError, match="image 0 .*above the limit of 100 bytes"):
        small.preprocess([big])
    with pytest.raises(clipfast.ClipfastError, match="max_image_bytes"):
        clipfast.Engine(vitb32_artifact, backend="onnxruntime", max_image_bytes=-1,
                        self_check=False)


# --------------------------------------------------------------------------- warning state


def test_decode_never_touches_warning_filters(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the decode path changed the process's warning filters")

    def no_filter_changes():
        return mock.patch.multiple(warnings, catch_warnings=forbidden, simplefilter=forbidden,
                                   filterwarnings=forbidden, resetwarnings=forbidden)

    with no_filter_changes():
        assert load_image(_png()).size == (20, 10)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: Pillow only warns
    bomb = _png((40, 40))
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow's own warning, as always
        with no_filter_changes(), pytest.raises(ImageLoadError, match="1600 pixels"):
            load_image(bomb)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_threaded_encode_leaves_warning_filters_alone(vitb32_engine, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    items = [_png((64, 48)), _png((400, 300)), _png((30, 90)), _png((320, 320))]  # 2 bombs
    before = list(warnings.filters)
    errors: list[BaseException] = []

    def run():
        try:
            for _ in range(3):
                res = vitb32_engine.preprocess(items, errors="skip")
                assert res.indices.tolist() == [0, 2]
            res = vitb32_engine.encode_images(items[:2], errors="skip")
            assert res.indices.tolist() == [0]
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert warnings.filters == before


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit", [1000, 700])  # Pillow warns above 1000, raises above 2 x 700
def test_bomb_message_quotes_one_limit(monkeypatch, limit):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageLoadError) as info:
        load_image(_png((40, 40)), index=3)
    message = str(info.value)
    problem = message.split("): ", 1)[1]  # after "image 3 (<bytes of N bytes>)"
    assert set(re.findall(r"\d+", problem)) == {"1600", str(limit)}, message
    assert f"MAX_IMAGE_PIXELS = {limit}" in problem


# --------------------------------------------------------------------------- smaller ones


@pytest.mark.parametrize("array", [
    np.zeros((224, 224, 3), np.float32),
    np.zeros((3, 224, 224), np.float32),
    np.zeros((224, 224), np.float64),
    np.zeros((224, 224, 3), np.uint16),
    np.zeros((224, 224, 3), np.uint8),
])
def test_a_single_array_must_be_wrapped_in_a_list(vitb32_engine, array):
    for call in (vitb32_engine.encode_images, vitb32_engine.preprocess):
        with pytest.raises(InputError, match="wrap it in a list"):
            call(array)
        with pytest.raises(InputError, match="wrap it in a list"):
            call(array, errors="skip")


def test_a_4d_uint8_array_is_still_a_batch(vitb32_engine, photos):
    batch = np.stack([photos["chelsea"][:200, :200], photos["coffee"][:200, :200]])
    np.testing.assert_allclose(vitb32_engine.encode_images(batch),
                               vitb32_engine.encode_images(list(batch)), atol=1e-6)


def test_empty_path_failure_is_printable(vitb32_engine):
    res = vitb32_engine.encode_images([""], errors="skip")
    assert res.failures[0].item == "'' (empty path)"
    assert "empty path" in res.failures[0].error
    weird = vitb32_engine.encode_images(["bad\nname.jpg"], errors="skip").failures[0]
    assert weird.item == repr("bad\nname.jpg")


def test_ctrl_c_does_not_wait_for_the_chunk(vitb32_engine, monkeypatch):
    monkeypatch.setattr(vitb32_engine.images, "workers", 2)
    release = threading.Event()
    progress = threading.Condition()
    started, finished = [], []
    h, w = vitb32_engine.preprocess_config.image_size

    def stub(item, index, fast=False):
        if index == 0:
            raise KeyboardInterrupt
        with progress:
            started.append(index)
        # held until the test has seen preprocess return (the timeout only guards a hang)
        release.wait(60)
        with progress:
            finished.append(index)
            progress.notify_all()
        return np.zeros((3, h, w), np.float32)

    monkeypatch.setattr(vitb32_engine.images, "load", stub)
    try:
        with pytest.raises(KeyboardInterrupt):
            vitb32_engine.preprocess([_png()] * 8)
        # Returned while the items already running were still blocked, and the rest never ran.
        assert finished == []
        assert len(started) < 7
    finally:
        release.set()
        with progress:  # the workers that started end before the stub is unpatched
            progress.wait_for(lambda: len(finished) == len(started), timeout=60)


# --------------------------------------------------------------------------- long texts


@pytest.fixture(scope="module")
def vitb32_tokenizer():
    from clipfast.export.tokenization import open_clip_tokenizer

    config, tokenizer_json, _ = open_clip_tokenizer("ViT-B-32")
    return config, tokenizer_json


def _whole_text_ids(tok, texts):
    """The ids as computed before long texts were cut: clean everything, split, then BPE."""
    words = [tok._pattern.findall(tokmod.clean_text(t, tok.config.clean)) for t in texts]
    encodings = tok._backend.encode_batch(words, is_pretokenized=True)
    return np.array([e.ids for e in encodings], dtype=np.int64)


def _long_text() -> str:
    return "\n".join(
        f"Line {i}: a &amp;amp; photo   of a CAT\u2019s  \u00c3\u00a9t\u00c3\u00a9 "
        f"\u03a3\u039f\u03a3 <b>{i}</b> caf\u00e9_na\u00efve!!\t" for i in range(400))


# Computed with the tokenizer before it cut long texts (whole text cleaned, then truncated).
_LONG_TEXT_IDS = [
    49406, 1148, 271, 281, 320, 261, 1125, 539, 320, 2368, 568, 3459, 39694, 139, 225, 138, 123,
    139, 480, 283, 321, 285, 271, 34308, 321, 285, 15304, 318, 1097, 35689, 563, 748, 1148, 272,
    281, 320, 261, 1125, 539, 320, 2368, 568, 3459, 39694, 139, 225, 138, 123, 139, 480, 283,
    321, 285, 272, 34308, 321, 285, 15304, 318, 1097, 35689, 563, 748, 1148, 273, 281, 320, 261,
    1125, 539, 320, 2368, 568, 3459, 39694, 139, 49407,
]


def test_long_text_ids_are_those_of_the_whole_text(vitb32_tokenizer):
    import dataclasses

    config, tokenizer_json = vitb32_tokenizer
    tok = tokmod.Tokenizer.from_str(config, tokenizer_json)
    text = _long_text()
    assert len(text) > 20_000
    ids = tok([text, "   \n" * 3000 + text])["input_ids"]
    assert ids.tolist() == [_LONG_TEXT_IDS, _LONG_TEXT_IDS]

    texts = [
        text,
        "a" + " " * 30_000 + "b c",  # cleaning shrinks 30k characters to one space
        "!" * 20_000 + "\n" + "word " * 200,  # canonicalize removes the first line entirely
        "x <\n" + "&amp;amp;lt; tag\n" * 2000,  # ftfy stops unescaping after the first "<"
        "\n" * 20_000 + "\u00c3\u00a9t\u00c3\u00a9 " * 100,
        ("\u65e5\u672c\u8a9e\u3002 " * 50 + "\r\n") * 100,
    ]
    for clean in ("lower", "whitespace", "canonicalize", "none"):
        tok = tokmod.Tokenizer.from_str(dataclasses.replace(config, clean=clean), tokenizer_json)
        want = _whole_text_ids(tok, texts)
        for chars in (16, 1):  # the default pieces, and the smallest
            with mock.patch.object(tokmod, "_PIECE_CHARS_PER_TOKEN", chars):
                got = tok(texts)["input_ids"]
            np.testing.assert_array_equal(got, want, err_msg=f"clean={clean} pieces={chars}")


def test_million_character_texts_tokenize(vitb32_tokenizer):
    config, tokenizer_json = vitb32_tokenizer
    tok = tokmod.Tokenizer.from_str(config, tokenizer_json)
    texts = ["a photo of a cat " * 60_000, "a photo\n" * 125_000, "x" * 1_000_000]
    ids = tok(texts)["input_ids"]
    assert ids.shape == (3, 77)
    assert (ids[:, 0] == config.sot_id).all() and (ids[:, -1] == config.eot_id).all()
    np.testing.assert_array_equal(ids[0], tok(["a photo of a cat " * 40])["input_ids"][0])
