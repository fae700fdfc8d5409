"""Latent, mask and conditioning files (storage/latent_files.py, mask_files.py,
conditioning_files.py), with real files written under tmp_path."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
import safetensors.torch
from safetensors.torch import load_file, save_file

from maskfleet.storage import (
    InvalidFile, decode_conditioning_with_pooled, decode_latent, decode_mask, encode_latent,
    read_conditioning, read_conditioning_with_pooled, read_latent, read_mask, write_latent)


def latent(shape=(1, 4, 8, 8), dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


# --- latents ---------------------------------------------------------------------------

def test_latent_round_trip_writes_comfy_layout(tmp_path):
    x = latent((2, 4, 8, 16))
    path = tmp_path / "out" / "x.latent"
    write_latent(path.as_uri(), x)
    stored = load_file(path)
    assert set(stored) == {"latent_tensor", "latent_format_version_0"}
    assert stored["latent_format_version_0"].numel() == 0
    assert torch.equal(read_latent(path.as_uri()), x)


def test_readers_take_file_uris_plain_paths_and_path_objects(tmp_path, monkeypatch):
    x = latent()
    (tmp_path / "my dir").mkdir()
    path = tmp_path / "my dir" / "x#1.latent"
    write_latent(str(path), x)
    monkeypatch.chdir(tmp_path)
    for uri in (path.as_uri(), str(path), "my dir/x#1.latent", path):
        assert torch.equal(read_latent(uri), x)
    mask, cond = tmp_path / "m.safetensors", tmp_path / "c.safetensors"
    save_file({"m": torch.ones(1, 2, 2)}, mask)
    save_file({"prompt_embeds": torch.ones(1, 3, 4)}, cond)
    for uri in (mask.as_uri(), "m.safetensors", mask):
        assert read_mask(uri).shape == (1, 2, 2)
    for uri in (cond.as_uri(), "c.safetensors", cond):
        assert read_conditioning(uri, "positive").shape == (1, 3, 4)


def test_decoders_work_on_bytes_and_use_the_name_for_pickle_checks():
    data = encode_latent(latent(), ".latent")
    assert torch.equal(decode_latent(data, "latent", "x.latent"), latent())
    assert decode_mask(save_mask_bytes(), "mask", "m.bin.safetensors").shape == (1, 2, 2)
    with pytest.raises(InvalidFile, match=r"x\.pth: \.pth files are pickles") as info:
        decode_latent(data, "base_latent", "x.pth")
    assert info.value.field == "base_latent"
    with pytest.raises(InvalidFile, match="pickles"):
        decode_mask(save_mask_bytes(), "mask", "m.pkl")


def test_latent_without_version_marker_is_rescaled_like_comfyui(tmp_path):
    x = latent()
    path = tmp_path / "old.latent"
    save_file({"latent_tensor": x}, path)
    torch.testing.assert_close(read_latent(path), x * (1.0 / 0.18215))


def test_safetensors_output_uses_name_latent(tmp_path):
    x = latent()
    path = tmp_path / "x.safetensors"
    write_latent(path, x)
    assert list(load_file(path)) == ["latent"]
    assert torch.equal(read_latent(path), x)


def test_single_tensor_any_name_half_precision_is_read_unscaled(tmp_path):
    x = latent(dtype=torch.float16)
    path = tmp_path / "whatever.bytes"  # content decides, not the suffix
    save_file({"samples": x}, path)
    out = read_latent(path)
    assert out.dtype == torch.float32
    assert torch.equal(out, x.float())


def test_encode_rejects_other_suffixes():
    with pytest.raises(InvalidFile, match="suffix must be .latent or .safetensors") as info:
        encode_latent(latent(), ".png")
    assert info.value.field == "output"


def test_write_latent_bad_suffix_writes_nothing(tmp_path):
    with pytest.raises(InvalidFile):
        write_latent(tmp_path / "x.npy", latent())
    assert list(tmp_path.iterdir()) == []


def test_multi_tensor_file_is_rejected_with_names(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": latent(), "b": latent(), "c": latent()}, path)
    with pytest.raises(InvalidFile) as info:
        read_latent(path)
    assert info.value.reason == "holds 3 tensors (a, b, c); expected latent_tensor or exactly one tensor"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latent_is_rejected(tmp_path, bad):
    x = latent()
    x[0, 0, 0, 0] = bad
    path = tmp_path / "x.safetensors"
    save_file({"latent": x}, path)
    with pytest.raises(InvalidFile, match="NaN or infinite") as info:
        read_latent(path, field="base_latent")
    assert info.value.field == "base_latent"


@pytest.mark.parametrize("tensor, words", [
    (torch.zeros(4, 8, 8), "expected 4-D"),
    (torch.zeros(1, 1, 4, 8, 8), "expected 4-D"),
    (torch.zeros(1, 4, 8, 8, dtype=torch.int32), "dtype int32"),
    (torch.zeros(0, 4, 8, 8), "empty"),
])
def test_bad_latent_shapes_and_dtypes(tmp_path, tensor, words):
    path = tmp_path / "x.safetensors"
    save_file({"latent": tensor}, path)
    with pytest.raises(InvalidFile, match=words):
        read_latent(path)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".pth", ".bin", ".pkl", ".PT"])
def test_pickle_suffixes_are_refused_even_with_safetensors_content(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    save_file({"latent": latent()}, path)
    with pytest.raises(InvalidFile, match="pickles"):
        read_latent(path)


def test_torch_save_file_is_not_safetensors(tmp_path):
    path = tmp_path / "x.latent"
    torch.save({"latent_tensor": latent()}, path)
    with pytest.raises(InvalidFile, match="not a safetensors file"):
        read_latent(path)


def test_truncated_safetensors_is_rejected(tmp_path):
    path = tmp_path / "x.latent"
    path.write_bytes(encode_latent(latent(), ".latent")[:-10])
    with pytest.raises(InvalidFile, match="unreadable safetensors"):
        read_latent(path)


def test_latent_size_cap(tmp_path):
    path = tmp_path / "x.latent"
    write_latent(path, latent())
    with pytest.raises(InvalidFile, match="input cap"):
        read_latent(path, max_bytes=100)


# --- masks -----------------------------------------------------------------------------

def save_mask_bytes():
    return safetensors.torch.save({"m": torch.ones(1, 2, 2)})


def save_image(path, array, mode):
    Image.fromarray(np.asarray(array), mode=mode).save(path)
    return path


def test_png_with_alpha_uses_inverted_alpha(tmp_path):
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0      # transparent -> masked
    rgba[1, 2, 3] = 51     # partly transparent
    rgba[..., 0] = 255     # red is ignored when alpha exists
    mask = read_mask(save_image(tmp_path / "m.png", rgba, "RGBA"))
    assert mask.shape == (1, 2, 3) and mask.dtype == torch.float32
    assert mask[0, 0, 0] == 1.0 and mask[0, 0, 1] == 0.0
    assert mask[0, 1, 2] == pytest.approx(0.8)


def test_palette_png_transparency_counts_as_alpha(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 255, 255, 0, 0, 0])
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "m.png", transparency=1)
    assert read_mask(tmp_path / "m.png").tolist() == [[[0.0, 1.0]]]


def test_grayscale_png_uses_gray_value(tmp_path):
    gray = np.array([[0, 255], [128, 255]], dtype=np.uint8)
    mask = read_mask(save_image(tmp_path / "m.png", gray, "L"))
    expected = torch.tensor([[[0.0, 1.0], [128 / 255, 1.0]]])
    torch.testing.assert_close(mask, expected)


def test_rgb_png_uses_red_channel(tmp_path):
    rgb = np.zeros((1, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 255)
    mask = read_mask(save_image(tmp_path / "m.png", rgb, "RGB"))
    assert mask.tolist() == [[[1.0, 0.0]]]


def test_sixteen_bit_grayscale_png(tmp_path):
    gray = np.array([[0, 65535, 32768]], dtype=np.uint16)
    path = tmp_path / "m16.png"
    Image.fromarray(gray).save(path)
    mask = read_mask(path)
    torch.testing.assert_close(mask, torch.tensor([[[0.0, 1.0, 32768 / 65535]]]))


def test_jpeg_mask_is_accepted(tmp_path):
    gray = np.full((8, 8), 255, dtype=np.uint8)
    path = tmp_path / "m.jpg"
    Image.fromarray(gray, mode="L").save(path, quality=100)
    mask = read_mask(path)
    assert mask.shape == (1, 8, 8) and mask.min() > 0.99


def test_image_pixel_cap(tmp_path):
    path = save_image(tmp_path / "m.png", np.zeros((4, 5), dtype=np.uint8), "L")
    with pytest.raises(InvalidFile, match="5x4 pixels"):  # width x height
        read_mask(path, max_pixels=19)
    assert read_mask(path, max_pixels=20).shape == (1, 4, 5)


def png_header_only(width, height):
    """A PNG claiming width x height whose pixels were never written: cheap to make."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_default_pixel_cap_refuses_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(9000, 9000))
    with pytest.raises(InvalidFile, match="9000x9000 pixels"):
        read_mask(path)


def test_garbage_is_neither_image_nor_safetensors(tmp_path):
    path = tmp_path / "m.png"
    path.write_bytes(b"definitely not an image")
    with pytest.raises(InvalidFile, match="neither an image"):
        read_mask(path)


@pytest.mark.parametrize("shape, expected", [
    ((3, 4), (1, 3, 4)),
    ((2, 3, 4), (2, 3, 4)),
    ((2, 1, 3, 4), (2, 3, 4)),
])
def test_safetensors_masks(tmp_path, shape, expected):
    values = torch.linspace(0.0, 1.0, int(np.prod(shape))).reshape(shape)
    path = tmp_path / "m.safetensors"
    save_file({"anything": values}, path)
    mask = read_mask(path)
    assert mask.shape == expected
    torch.testing.assert_close(mask.flatten(), values.flatten())


@pytest.mark.parametrize("low, high", [(-0.5, 1.0), (0.0, 1.5), (0.0, 255.0)])
def test_safetensors_mask_values_outside_0_1_are_refused_not_clamped(tmp_path, low, high):
    path = tmp_path / "m.safetensors"
    save_file({"mask": torch.tensor([[low, 0.5], [0.25, high]])}, path)
    with pytest.raises(InvalidFile, match=r"^mask: values must lie in \[0, 1\], found"):
        read_mask(path)


@pytest.mark.parametrize("tensors, words", [
    ({"m": torch.zeros(2, 3, 4, 5)}, "expected [H, W]"),
    ({"m": torch.zeros(5)}, "expected [H, W]"),
    ({"m": torch.tensor([[0.0, float("nan")]])}, "NaN"),
    ({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, "expected exactly one tensor"),
])
def test_bad_safetensors_masks(tmp_path, tensors, words):
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    with pytest.raises(InvalidFile) as info:
        read_mask(path)
    assert words in info.value.reason and info.value.field == "mask"


# --- conditioning ----------------------------------------------------------------------

def test_conditioning_prompt_embeds_ignores_pooled(tmp_path):
    embeds = torch.randn(2, 77, 32)
    path = tmp_path / "c.safetensors"
    save_file({"prompt_embeds": embeds, "pooled_prompt_embeds": torch.randn(2, 32)}, path)
    assert torch.equal(read_conditioning(path, "positive"), embeds)


def test_conditioning_single_2d_tensor_gets_batch_dim(tmp_path):
    embeds = torch.randn(77, 32, dtype=torch.bfloat16)
    path = tmp_path / "c.safetensors"
    save_file({"cond": embeds}, path)
    out = read_conditioning(path, "negative")
    assert out.shape == (1, 77, 32) and out.dtype == torch.float32
    assert torch.equal(out[0], embeds.float())


@pytest.mark.parametrize("tensors, words", [
    ({"prompt_embeds": torch.zeros(1, 2, 3, 4)}, "expected [B, T, D]"),
    ({"prompt_embeds": torch.zeros(1, 2, 3, dtype=torch.int64)}, "dtype int64"),
    ({"prompt_embeds": torch.full((1, 2, 3), float("inf"))}, "NaN or infinite"),
    ({"a": torch.zeros(1, 2, 3), "b": torch.zeros(1, 2, 3)}, "expected prompt_embeds or exactly one"),
])
def test_bad_conditioning(tmp_path, tensors, words):
    path = tmp_path / "c.safetensors"
    save_file(tensors, path)
    with pytest.raises(InvalidFile) as info:
        read_conditioning(path, "positive")
    assert words in info.value.reason and info.value.field == "positive"


def cond_bytes(tensors):
    return safetensors.torch.save(tensors)


def test_conditioning_with_pooled(tmp_path):
    embeds, pooled = torch.randn(2, 77, 32), torch.randn(2, 1280, dtype=torch.float16)
    path = tmp_path / "c.safetensors"
    save_file({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, path)
    got, got_pooled = read_conditioning_with_pooled(path.as_uri(), "positive")
    assert torch.equal(got, embeds)
    assert got_pooled.dtype == torch.float32 and torch.equal(got_pooled, pooled.float())
    single = cond_bytes({"prompt_embeds": torch.ones(77, 8), "pooled_prompt_embeds": torch.ones(8)})
    got, got_pooled = decode_conditioning_with_pooled(single, "negative", "c.safetensors")
    assert got.shape == (1, 77, 8) and got_pooled.shape == (1, 8)
    assert decode_conditioning_with_pooled(cond_bytes({"x": torch.ones(1, 3, 4)}), "negative", "c")[1] is None


@pytest.mark.parametrize("tensors, words", [
    ({"prompt_embeds": torch.zeros(2, 3, 4), "pooled_prompt_embeds": torch.zeros(1, 4)},
     "pooled_prompt_embeds has shape [1, 4]; expected [2, D]"),
    ({"prompt_embeds": torch.zeros(1, 3, 4), "pooled_prompt_embeds": torch.zeros(1, 1, 4)},
     "pooled_prompt_embeds has shape [1, 1, 4]"),
    ({"prompt_embeds": torch.zeros(1, 3, 4), "pooled_prompt_embeds": torch.zeros(1, 4, dtype=torch.int32)},
     "pooled_prompt_embeds has dtype int32"),
    ({"prompt_embeds": torch.zeros(1, 3, 4), "pooled_prompt_embeds": torch.full((1, 4), float("nan"))},
     "pooled_prompt_embeds contains 4 NaN"),
    ({"pooled_prompt_embeds": torch.zeros(1, 4)}, "holds only pooled_prompt_embeds"),
])
def test_bad_pooled_conditioning(tensors, words):
    with pytest.raises(InvalidFile) as info:
        decode_conditioning_with_pooled(cond_bytes(tensors), "mask_sampler.positive", "c.safetensors")
    assert words in info.value.reason and info.value.field == "mask_sampler.positive"
